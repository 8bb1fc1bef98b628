"""Writing a model as ONNX or TorchScript, and running the written file (for `distill export`, export.py).

ONNX goes through torch.onnx.export's TorchScript-based exporter (`dynamo=False`): it exports every model kind of
distill (MLP, CNN, TextCNN, BiLSTM with packed sequences, transformers classifiers and taggers) with a dynamic batch
axis (and sequence axis for text), checked on real test batches of other sizes, and needs no package beyond onnx. The
torch.export-based exporter (`dynamo=True`, which needs onnxscript; tried with 0.7.2) exports MLP, TextCNN and BERT
but stops at BiLSTM's data-dependent padding check (GuardOnDataDependentSymNode). TorchScript is torch.jit.trace of the
model: the file takes the same inputs as the model (a tensor, or the dict of token tensors) and runs without distill.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from distill.errors import UserError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
QUANTIZATIONS = ("int8",)
ONNX_PINS = "pip install onnx==1.23.2 onnxruntime==1.32.0"
OPSET = 17  # LayerNormalization is an ONNX op from 17 on; onnxruntime 1.32 runs opsets up to 23


def check_options(fmt: str, quantize: str | None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use --format onnx or --format torchscript")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantize!r}: the one offered is --quantize int8 (dynamic, weights int8)")
    if fmt == "onnx":
        for name in ("onnx", "onnxruntime"):  # the exporter writes through onnx; onnxruntime runs the check
            try:
                importlib.import_module(name)
            except ImportError:
                raise UserError(f"--format onnx needs the packages onnx and onnxruntime ({name} is missing): "
                                f"{ONNX_PINS}") from None


def model_kind(model: nn.Module) -> str:
    return type(model.hf).__name__ if hasattr(model, "hf") else type(model).__name__


def input_names(example) -> list[str]:
    """ONNX input names: the keys of a text batch (input_ids, attention_mask[, word_mask]), else `input`."""
    return list(example) if isinstance(example, dict) else ["input"]


class _PositionalInputs(nn.Module):
    """The model with its dict of inputs given as positional tensors in `keys` order, so the ONNX graph has one named
    input per key (a dict as the last argument of torch.onnx.export would be read as keyword arguments)."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors):
        return self.model(dict(zip(self.keys, tensors)))


def write_onnx(model: nn.Module, example, path: Path, quantize: str | None) -> None:
    """`model` (eval mode) as ONNX at `path`: dynamic batch axis, and sequence axis for text; rows of the output are
    dynamic too (a tagger gives one row per counted word). int8: onnxruntime's dynamic quantization of the weights."""
    keys = input_names(example)
    text = isinstance(example, dict)
    wrapped = _PositionalInputs(model, keys).eval() if text else model
    args = tuple(example[k] for k in keys) if text else (example,)
    axes = {k: ({0: "batch", 1: "sequence"} if text else {0: "batch"}) for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx" if quantize else path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
            torch.onnx.export(wrapped, args, str(fp32), dynamo=False, input_names=keys, output_names=["logits"],
                              dynamic_axes={**axes, "logits": {0: "rows"}}, opset_version=OPSET)
        model.eval()  # the exporter restores the wrapper's mode, which reaches the model too
        if quantize:
            _quantize_onnx(fp32, path)


def _quantize_onnx(source: Path, path: Path) -> None:
    """Weights of MatMul/Gemm/Conv/LSTM as signed int8 (QInt8), activations quantized on the fly per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice (pre-processing) and shape notes on the root logger
    try:
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def write_torchscript(model: nn.Module, example, path: Path, quantize: str | None) -> None:
    """torch.jit.trace of the model (same inputs: a tensor or the dict of token tensors). int8: nn.Linear layers
    dynamically quantized first (torch.ao.quantization.quantize_dynamic). nn.LSTM stays float32: a traced dynamically
    quantized LSTM keeps the batch size it was traced with."""
    if quantize:
        if torch.backends.quantized.engine == "none":
            raise UserError("--quantize int8 with --format torchscript needs a quantized CPU engine (fbgemm, x86 or "
                            "qnnpack) and this torch build has none: use --format onnx --quantize int8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's notice that it moves to torchao
            model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")  # tracer warnings (input checks become constants), torch.jit's deprecation
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs notes while a model is traced (its loss type); the user needs none of them."""
    if "transformers" not in sys.modules:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript}


def write_export(model: nn.Module, example, path: Path, fmt: str, quantize: str | None) -> None:
    """One line naming the model kind when the exporter cannot handle it."""
    try:
        WRITERS[fmt](model, example, path, quantize)
    except UserError:
        raise
    except Exception as e:  # the exporters raise many types; the user gets one line, the kind and the reason
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{model_kind(model)} cannot be exported to {fmt}{' int8' if quantize else ''}: {reason}") from None


class OnnxModel(nn.Module):
    """An ONNX file under onnxruntime (CPU), called like the PyTorch model: inputs in, logits tensor out."""

    def __init__(self, path: Path, keys: list[str], threads: int):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # as many as torch uses, so the latency comparison is fair
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.keys = keys

    def feed(self, inputs) -> dict:
        if isinstance(inputs, dict):
            return {k: inputs[k].cpu().numpy() for k in self.keys}
        return {self.keys[0]: inputs.cpu().numpy()}

    def forward(self, inputs) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feed(inputs))[0])


def load_exported(path: Path, fmt: str, example) -> nn.Module:
    """The file just written, as a callable model. (A TorchScript file is only ever loaded here, right after distill
    wrote it: loading one runs its code, so distill never loads one it did not write.)"""
    if fmt == "onnx":
        return OnnxModel(path, input_names(example), torch.get_num_threads())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice (torch.export is its successor)
        return torch.jit.load(str(path))


def runtime_name(fmt: str) -> str:
    if fmt == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__.split('+')[0]} (TorchScript)"


def default_output(source: Path, role: str, run: bool, fmt: str, quantize: str | None) -> Path:
    """RUN/export/ROLE.onnx for a run; beside the model otherwise (runs/x/student.safetensors -> runs/x/student.onnx)."""
    suffix = (f".{quantize}" if quantize else "") + FORMATS[fmt]
    if run:
        return source / "export" / f"{role}{suffix}"
    stem = source.name if source.is_dir() else source.stem
    return source.parent / f"{stem}{suffix}"


def writable_folder(folder: Path) -> bool:
    """Make sure files can be created in `folder` (made if missing); returns whether it was made. One line if not."""
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".distill-export.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror or type(e).__name__}): "
                        "choose a writable place with --out") from None
    return made


def usual_permissions(path: Path) -> None:
    """The mode a plain open() would give (0644 under umask 022), not the temporary file's private 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
