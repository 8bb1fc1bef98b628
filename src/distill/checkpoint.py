"""Saving and loading model weights without pickle, and writing files atomically.

Weights are safetensors with the model's description (JSON) in the metadata. Nothing read here is
unpickled or executed: ``torch.load`` and ``pickle`` are never used. Files are written atomically (temp
file in the same folder, fsync, ``os.replace``). Resumable training state is in training_state.py.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.errors import UserError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "save_model",
    "load_model_file",
    "load_weights",
]

CONFIG_KEY = "distill_config"

_NOT_SAFETENSORS = "distill reads only safetensors (re-save with safetensors.torch.save_file)"
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (best effort; not possible on Windows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class AtomicTarget:
    """Context manager giving a temp path next to ``path``; on success it is fsynced and moved over ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(parent), prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                _fsync_file(self.tmp)
                os.replace(self.tmp, self.path)
            except BaseException:
                self.tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.path.parent)
        else:
            self.tmp.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one."""
    with AtomicTarget(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path, text: str) -> None:
    """UTF-8 version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- safetensors


def _prepare_tensors(tensors: dict[str, Any], what: str) -> dict[str, Tensor]:
    """CPU, contiguous, no two tensors sharing memory (safetensors refuses shared storage)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: entry {name!r} is a {type(t).__name__}, not a tensor; only tensors can be saved")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()  # tied / shared weights: store each name with its own copy
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen.add(ptr)
        out[name] = t
    return out


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None, what: str) -> None:
    from safetensors.torch import save_file

    prepared = _prepare_tensors(tensors, what)
    with AtomicTarget(path) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)


def _corrupt(path, why: str) -> UserError:
    return UserError(f"{path} is truncated or corrupt ({why}); save or download it again")


def _read_header(path: Path) -> tuple[dict, int]:
    """Check that ``path`` is a whole safetensors file; return its JSON header and the header length."""
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"{path} is not a file; give the path of a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise UserError(f"{path} is not a safetensors file (it is only {size} bytes long); {_NOT_SAFETENSORS}")
        (n,) = struct.unpack("<Q", head[:8])
        if not (head[8:9] == b"{" and n <= _MAX_HEADER):
            # only now guess what it is: a valid header length may well start with byte 0x80
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                raise UserError(f"{path} is not a safetensors file (it looks like a torch.save/pickle file); {_NOT_SAFETENSORS}")
            raise UserError(f"{path} is not a safetensors file; {_NOT_SAFETENSORS}")
        if 8 + n > size:
            raise _corrupt(path, f"its header claims {n} bytes but the file has only {size - 8} after the length field")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and (
                not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())
            ):
                raise _corrupt(path, "its __metadata__ is not a map of strings")
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise _corrupt(path, f"tensor {name!r} has no dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r} has invalid data offsets")
        if offsets[1] > data_len:
            raise _corrupt(path, f"tensor {name!r} ends at byte {offsets[1]} of data but the file holds only {data_len}")
        itemsize = _ITEMSIZE.get(info["dtype"])
        if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise _corrupt(path, f"tensor {name!r} has {offsets[1] - offsets[0]} bytes, not what its shape needs")
    return header, n


def _read_safetensors(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Validated read of a safetensors file: (tensors on CPU, metadata)."""
    from safetensors.torch import load_file

    path = Path(path)
    header, _ = _read_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, unknown dtype, ...: the file is at fault
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _corrupt(path, f"safetensors says: {msg}") from None
    metadata = header.get("__metadata__") or {}
    return tensors, dict(metadata)


def save_model(path, model: nn.Module, config: dict) -> None:
    """Weights as safetensors (state_dict, contiguous, shared tensors handled), with ``config`` (a JSON-able
    dict describing how to rebuild the model) stored as JSON in the metadata under "distill_config". Atomic."""
    try:
        config_json = json.dumps(config, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_model: the model config must be JSON-able ({e})") from None
    write_safetensors(Path(path), model.state_dict(), {"format": "pt", CONFIG_KEY: config_json}, "save_model")


def load_model_file(path) -> tuple[dict[str, Tensor], dict]:
    """Returns (state_dict, config); config is {} if the file has no distill_config metadata."""
    tensors, metadata = _read_safetensors(path)
    return tensors, _config(metadata, path)


def read_model_record(path) -> dict:
    """The distill_config of a model file, from its header alone (no tensor is read); {} if it has none."""
    header, _ = _read_header(Path(path))
    return _config(header.get("__metadata__") or {}, path)


def _config(metadata: dict, path) -> dict:
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise _corrupt(path, f"its {CONFIG_KEY} metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise _corrupt(path, f"its {CONFIG_KEY} metadata is not a JSON object")
    return config


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def load_weights(model: nn.Module, state_dict, source: str) -> None:
    """``model.load_state_dict(strict=True)``, with mismatches turned into a UserError naming ``source``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and isinstance(state_dict[k], Tensor) and isinstance(expected[k], Tensor)
        and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model) {_first(shapes)}")
    fix = "use a checkpoint saved with the same model settings or change the model in the recipe to match it"
    if problems:
        raise UserError(f"{source}: the checkpoint does not match the model in the recipe: {'; '.join(problems)}; {fix}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"{source}: the checkpoint does not match the model in the recipe: {msg}; {fix}") from None
