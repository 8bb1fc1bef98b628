"""Saving and loading model weights without pickle, and writing files atomically.

Weights are safetensors with the model's description (JSON) in the metadata. Nothing read here is
unpickled or executed: ``torch.load`` and ``pickle`` are never used. Files are written atomically (temp
file in the same folder, fsync, ``os.replace``). Resumable training state is in training_state.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.durable import atomic_write_bytes, atomic_write_text  # noqa: F401 (atomic_write_text: kept importable here)
from distill.errors import UserError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "save_model",
    "load_model_file",
    "load_weights",
]

CONFIG_KEY = "distill_config"
CHECKSUM_KEY = "distill_sha256"  # sha256 of the whole file with this value's 64 digits written as zeros
_SLOT = b'"' + CHECKSUM_KEY.encode() + b'":"'

_NOT_SAFETENSORS = "distill reads only safetensors (re-save with safetensors.torch.save_file)"
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


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


def _slot(raw: bytes | bytearray, header_len: int) -> int | None:
    """Where the checksum's 64 hex digits start in a safetensors file's bytes, or None if it has no checksum. In
    the header's JSON an unescaped quote only delimits a string, so the key can appear once, as a metadata key."""
    at = bytes(raw[8:8 + header_len]).find(_SLOT)
    return None if at < 0 else 8 + at + len(_SLOT)


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None, what: str) -> str:
    """Write a safetensors file atomically, its sha256 in its own metadata (verified by every read); returns it.
    Serialised in memory and written by Python, so a full disk is one WriteError like any other write."""
    from safetensors.torch import save

    prepared = _prepare_tensors(tensors, what)
    raw = bytearray(save(prepared, metadata={**(metadata or {}), CHECKSUM_KEY: "0" * 64}))
    at = _slot(raw, struct.unpack("<Q", raw[:8])[0])
    digest = hashlib.sha256(raw).hexdigest()
    raw[at:at + 64] = digest.encode()
    atomic_write_bytes(path, raw)
    return digest


def _verify_checksum(path: Path, raw: bytes, header: dict, header_len: int) -> str | None:
    """The file's recorded sha256 after checking it; None if it records none (a file from another tool)."""
    recorded = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    if recorded is None:
        return None
    at = _slot(raw, header_len)
    if at is None or raw[at:at + 64] != recorded.encode():
        raise _damaged(path, "its checksum is unreadable")
    h = hashlib.sha256()
    h.update(raw[:at])
    h.update(b"0" * 64)
    h.update(memoryview(raw)[at + 64:])
    if h.hexdigest() != recorded:
        raise _damaged(path, "its sha256 does not match its content: bytes were changed after distill wrote it")
    return recorded


def _damaged(path, why: str) -> UserError:
    return UserError(f"{path} is damaged ({why}); delete it and write it again (for a run: rerun it, or rerun "
                     "without --resume)")


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
    """Validated read of a safetensors file: (tensors on CPU, metadata). Its bytes are read once, checked against
    the sha256 distill wrote into it (if it has one), and the tensors are made from those same bytes."""
    from safetensors.torch import load

    path = Path(path)
    header, header_len = _read_header(path)
    raw = path.read_bytes()
    _verify_checksum(path, raw, header, header_len)
    try:
        tensors = dict(sorted(load(raw).items()))  # in name order, as safetensors.load_file gives them
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


_MAX_UNSAVED_BYTES = 256 << 20  # non-persistent buffers (masks, rotary tables) a described model may add


def built_to_fit(build, path, source: str | None = None, *, own_code: bool = False) -> nn.Module:
    """``build()``, but only after the same call on the meta device (no memory) gives a model whose tensor names and
    shapes are those in the safetensors file at ``path`` (read from its header alone). So a description in a file's
    metadata cannot make us allocate more than the file's own weights (plus a bounded margin of unsaved buffers).
    own_code: the model is the user's own class (allowed by --allow-import), which may not build on the meta
    device (e.g. it computes a size with a tensor); then it is built as the user's code says, and loading the
    weights still checks every shape."""
    import torch

    source = source or str(path)
    header, _ = _read_header(Path(path))
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    try:
        with torch.device("meta"):
            ghost = build()
    except Exception:
        if not own_code:
            raise
        return build()
    expected = ghost.state_dict()
    problems = _mismatches({k: tuple(t.shape) for k, t in expected.items()}, shapes)
    if problems:
        raise UserError(f"{source}: its model description does not match its weights ({problems}); the file is "
                        "damaged or was edited: save the model again with distill")
    unsaved = sum(b.numel() * b.element_size() for name, b in ghost.named_buffers() if name not in expected)
    if unsaved > _MAX_UNSAVED_BYTES:
        raise UserError(f"{source}: its model description needs {unsaved / 2**20:.0f} MiB of buffers beyond its "
                        "weights; the file is damaged or was edited: save the model again with distill")
    del ghost
    return build()


def _mismatches(expected: dict[str, tuple], given: dict[str, tuple]) -> str:
    """Missing keys, unexpected keys and shape differences (given vs expected) in words; '' if none."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {given[k]} vs {expected[k]}" for k in expected if k in given and given[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model) {_first(shapes)}")
    return "; ".join(problems)


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def load_weights(model: nn.Module, state_dict, source: str) -> None:
    """``model.load_state_dict(strict=True)``, with mismatches turned into a UserError naming ``source``."""
    def shape(t):
        return tuple(t.shape) if isinstance(t, Tensor) else None

    problems = _mismatches({k: shape(t) for k, t in model.state_dict().items()},
                           {k: shape(t) for k, t in state_dict.items()})
    fix = "use a checkpoint saved with the same model settings or change the model in the recipe to match it"
    if problems:
        raise UserError(f"{source}: the checkpoint does not match the model in the recipe: {problems}; {fix}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"{source}: the checkpoint does not match the model in the recipe: {msg}; {fix}") from None
