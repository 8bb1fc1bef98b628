"""Resumable training state (model, optimizer, scheduler, RNG, step), without pickle.

A training-state folder is replaced as a whole, so a kill at any moment leaves either the previous or the
new complete checkpoint on disk. Layout::

    model.safetensors      the model's full state dict (unsharded, also when trained under FSDP)
    optimizer.safetensors  tensors of the optimizer ('state.<i>.<name>', 'param_groups.<i>.<name>'), its state
                           keyed by parameter name (torch.distributed.checkpoint's form, so a checkpoint
                           does not depend on how the parameters were sharded), of the scheduler
                           ('scheduler.<...>') and of ``extra`` ('extra.<...>')
    rng.safetensors        torch CPU RNG state ('torch'), CUDA RNG states ('cuda.<i>')
    state.json             everything else, in a typed JSON encoding (written last), with the sha256 of each file
                           above and of itself (distill.durable.checked_json)

Every file is checked on loading (each safetensors file against the sha256 in its metadata and in state.json):
a damaged state is refused with one line, never used and never silently replaced by a fresh start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from distill.checkpoint import CHECKSUM_KEY, _read_safetensors, load_weights, write_safetensors
from distill.durable import _digest, atomic_write_text, checked_json, fsync_dir as _fsync_dir, writing
from distill.errors import UserError

__all__ = ["gather_training_state", "has_training_state", "load_training_state", "save_training_state"]

STATE_FORMAT = "distill-training-state"
STATE_VERSION = 3  # 3: sha256 of every file; 2: optimizer state keyed by parameter name (1: by parameter id)
# a state written by the distill before checksums (version 2) is still resumed, unverified: upgrading distill
# must not cost a user the run in progress (it is rewritten as version 3 at its next save)
UNVERIFIED_VERSION = 2
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
_STATE_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)


# ----------------------------------------------------------------------------- typed JSON encoding
#
# Every JSON object in the encoding is a tag: {"__dict__": [[key, value], ...]} (keeps int keys and order),
# {"__tuple__": [...]}, {"__tensor__": "<name in a safetensors file>"}. Lists, str, int, float (also
# nan/inf), bool and None are themselves. So decoding gives back exactly the types that were saved.


def _encode(obj: Any, tensors: dict[str, Tensor], key: str, where: str) -> Any:
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    for base in (bool, int, float, str):  # subclasses such as numpy.float64 or IntEnum: store the plain value
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}", where) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}", where) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        pairs = []
        for k, v in obj.items():
            if isinstance(k, Tensor):
                raise TypeError(f"{where}: {key!r} has a tensor as a dict key, which cannot be stored")
            pairs.append([_encode(k, tensors, f"{key}.<key>", where), _encode(v, tensors, f"{key}.{k}", where)])
        return {"__dict__": pairs}
    raise TypeError(f"{where}: {key!r} is a {type(obj).__name__}, which cannot be stored as JSON")


class _Corrupt(Exception):
    pass


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict) and len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "__tensor__" and isinstance(val, str):
            if val not in tensors:
                raise _Corrupt(f"tensor {val!r} is missing")
            return tensors[val]
        if tag == "__tuple__" and isinstance(val, list):
            return tuple(_decode(v, tensors) for v in val)
        if tag == "__dict__" and isinstance(val, list):
            out = {}
            for pair in val:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise _Corrupt("a dict entry is malformed")
                k = _decode(pair[0], tensors)
                try:
                    out[k] = _decode(pair[1], tensors)
                except TypeError:  # unhashable key
                    raise _Corrupt("a dict key is malformed") from None
            return out
    raise _Corrupt("an entry has an unknown form")


# ----------------------------------------------------------------------------- training state


def _rng_state(rng_tensors: dict[str, Tensor]) -> dict:
    np_state = np.random.get_state()
    rng_tensors["torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng_tensors[f"cuda.{i}"] = s
            n_cuda += 1
    return {
        "python": _encode(random.getstate(), {}, "python", "random.getstate()"),
        "numpy": [str(np_state[0]), np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "cuda_devices": n_cuda,
    }


def _restore_rng(rng: dict, rng_tensors: dict[str, Tensor]) -> None:
    random.setstate(_decode(rng["python"], {}))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(rng_tensors["torch"].to(torch.uint8))
    if torch.cuda.is_available():
        for i in range(min(int(rng.get("cuda_devices", 0)), torch.cuda.device_count())):
            torch.cuda.set_rng_state(rng_tensors[f"cuda.{i}"].to(torch.uint8), device=i)


def _sibling_re(directory: Path) -> re.Pattern:
    return re.compile(re.escape(directory.name) + r"\.(tmp|old)-(\d+)$")


def _siblings(directory: Path) -> list[tuple[Path, int]]:
    """Leftovers of interrupted saves: ``<directory>.tmp-<pid>`` and ``<directory>.old-<pid>``."""
    parent = directory.parent
    if not parent.is_dir():
        return []
    pat = _sibling_re(directory)
    out = []
    for p in parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir():
            out.append((p, int(m.group(2))))
    return out


def _read_state_json(folder: Path) -> dict:
    """state.json of a complete checkpoint folder; raises _Corrupt otherwise."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise _Corrupt(f"{STATE_FILE} is missing")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        raise _Corrupt(f"{STATE_FILE} is not valid JSON") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise _Corrupt(f"{STATE_FILE} is not a distill training state")
    if state.get("version") == UNVERIFIED_VERSION:
        for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE):
            if not (folder / name).is_file():
                raise _Corrupt(f"{name} is missing")
        return state
    if state.get("version") != STATE_VERSION:
        raise _Corrupt(f"{STATE_FILE} has unsupported version {state.get('version')!r}")
    body = {k: v for k, v in state.items() if k != "sha256"}
    if state.get("sha256") != _digest(body):
        raise _Corrupt(f"{STATE_FILE}'s sha256 does not match its content")
    files = state.get("files")
    if not isinstance(files, dict) or set(files) != {MODEL_FILE, OPTIMIZER_FILE, RNG_FILE}:
        raise _Corrupt(f"{STATE_FILE} does not list its files")
    for name in files:
        if not (folder / name).is_file():
            raise _Corrupt(f"{name} is missing")
    return body


def _is_complete(folder: Path) -> bool:
    try:
        _read_state_json(folder)
        return True
    except _Corrupt:
        return False


def _resolve(directory: Path) -> Path | None:
    """The folder holding the newest complete checkpoint for ``directory``.

    Normally ``directory`` itself. If a save was killed between moving the old folder away and moving the
    new one in, ``directory`` is missing and the checkpoint is in a ``.old-<pid>``/``.tmp-<pid>`` sibling
    (each complete: a temp folder gets state.json only after everything else is written)."""
    if directory.exists():
        return directory if _is_complete(directory) else None
    best, best_time = None, None
    for p, _ in _siblings(directory):
        try:
            saved_at = _read_state_json(p).get("saved_at", 0)
        except _Corrupt:
            continue
        if best is None or saved_at > best_time:
            best, best_time = p, saved_at
    return best


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are stale: we are not saving right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _looks_like_checkpoint(folder: Path) -> bool:
    """Only replace folders we wrote: empty, or containing nothing but our files."""
    return all(p.name in _STATE_FILES or p.name.startswith(".") and p.name.endswith(".tmp") for p in folder.iterdir())


def has_training_state(directory) -> bool:
    """True if ``directory`` (or the leftover of a save interrupted while swapping folders) is a complete checkpoint;
    False if nothing was saved. A damaged one is refused (UserError), never silently replaced by a fresh start:
    saves swap whole folders, so only damage after the fact leaves ``directory`` incomplete."""
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()):
        try:
            _read_state_json(directory)
        except _Corrupt as e:
            raise _damaged(directory, str(e)) from None
    return _resolve(directory) is not None


def _damaged(folder: Path, why: str) -> UserError:
    return UserError(f"{folder} holds a damaged training state ({why}); delete that folder to train this stage "
                     "again from its start, or rerun without --resume")


def is_sharded(model: nn.Module) -> bool:
    """True if FSDP (version 1 or 2) shards some of the model's parameters."""
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def gather_training_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) as full tensors keyed by parameter name, ready to save.

    For a model sharded by FSDP this is a collective: every process must call it; the main process gets the
    tensors, the others empty dicts. For any other model it reads the local tensors (no communication)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save_training_state(
    directory, *, model, optimizer, scheduler=None, step: int, epoch: int, extra: dict | None = None,
    gathered: tuple[dict, dict] | None = None,
) -> None:
    """Write a resumable checkpoint to ``directory``, replacing any previous one atomically.

    gathered: the output of gather_training_state(model, optimizer), for a sharded model, whose state every
    process had to gather while only the main process saves."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a checkpoint folder; choose another output folder")
    if directory.is_dir() and not _looks_like_checkpoint(directory):
        raise UserError(
            f"{directory} exists and holds files that are not a distill checkpoint; "
            "choose another output folder or empty this one"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)

    # Build everything in memory first, so non-JSON-able state fails before anything is touched.
    model_sd, opt_sd = gathered if gathered is not None else gather_training_state(model, optimizer)
    state, opt_tensors, rng_tensors = _state_in_memory(opt_sd, scheduler, step, epoch, extra)
    _swap_in(directory, {MODEL_FILE: (model_sd, {"format": "pt"}, "model.state_dict()"),
                         OPTIMIZER_FILE: (opt_tensors, None, "optimizer state"),
                         RNG_FILE: (rng_tensors, None, "RNG state")}, state)


def _state_in_memory(opt_sd: dict, scheduler, step: int, epoch: int, extra: dict | None):
    """(state.json text, optimizer + scheduler + extra tensors, RNG tensors) of a checkpoint."""
    opt_tensors: dict[str, Tensor] = {}
    opt_state = {
        "param_groups": _encode(opt_sd["param_groups"], opt_tensors, "param_groups", "optimizer.state_dict()"),
        "state": {
            "__dict__": [
                [name, _encode(values, opt_tensors, f"state.{i}", "optimizer.state_dict()")]
                for i, (name, values) in enumerate(opt_sd["state"].items())
            ]
        },
    }
    # Any other keys some optimizers add next to 'state'/'param_groups'.
    others = {k: v for k, v in opt_sd.items() if k not in ("state", "param_groups")}
    if others:
        opt_state["other"] = _encode(others, opt_tensors, "other", "optimizer.state_dict()")
    sched_state = None
    if scheduler is not None:
        sched_state = _encode(scheduler.state_dict(), opt_tensors, "scheduler", "scheduler.state_dict()")
    extra_enc = _encode(dict(extra or {}), opt_tensors, "extra", "extra")
    rng_tensors: dict[str, Tensor] = {}
    rng = _rng_state(rng_tensors)
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "saved_at": time.time_ns(),
        "optimizer": opt_state,
        "scheduler": sched_state,
        "extra": extra_enc,
        "rng": rng,
    }
    return state, opt_tensors, rng_tensors


def _swap_in(directory: Path, files: dict, state: dict) -> None:
    """Write the checkpoint's files into a temporary sibling folder, then swap it for `directory`; at every instant
    a complete checkpoint exists on disk."""
    # If an earlier save died mid-swap, first put its newest complete checkpoint back in place.
    if not directory.exists():
        found = _resolve(directory)
        if found is not None:
            os.replace(found, directory)
            _fsync_dir(directory.parent)

    pid = os.getpid()
    tmp = directory.with_name(f"{directory.name}.tmp-{pid}")
    old = directory.with_name(f"{directory.name}.old-{pid}")
    if tmp.exists():
        shutil.rmtree(tmp)
    with writing(tmp):
        tmp.mkdir()
    try:
        digests = {name: write_safetensors(tmp / name, tensors, metadata, what)
                   for name, (tensors, metadata, what) in files.items()}
        # last: its presence marks the folder complete
        atomic_write_text(tmp / STATE_FILE, checked_json({**state, "files": digests}))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # Swap: old away, new in, old deleted. At every instant a complete checkpoint exists on disk.
    had_old = directory.exists()
    if had_old:
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        if had_old and not directory.exists():
            try:
                os.replace(old, directory)  # roll back; if this fails too, loading recovers from the siblings
            except OSError:
                pass
        raise
    _fsync_dir(directory.parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)
    for p, other_pid in _siblings(directory):
        if not _pid_alive(other_pid):
            shutil.rmtree(p, ignore_errors=True)


def _read_verified(folder: Path, name: str, state: dict) -> dict[str, Tensor]:
    """The tensors of one file of a state, which must be the very file state.json lists (by its sha256)."""
    try:
        tensors, metadata = _read_safetensors(folder / name)
    except UserError as e:
        raise _damaged(folder, f"{name}: {str(e).partition(' (')[2].partition(');')[0] or e}") from None
    if state.get("version") != UNVERIFIED_VERSION and metadata.get(CHECKSUM_KEY) != state["files"][name]:
        raise _damaged(folder, f"{name} is not the file its {STATE_FILE} lists")
    return tensors


def load_training_state(directory, *, model, optimizer, scheduler=None, restore_rng: bool = True) -> dict:
    """Inverse of :func:`save_training_state`; returns {"step", "epoch", "extra"}. Every process calls it; a
    model sharded by FSDP takes its shards of the saved full tensors."""
    directory = Path(directory)
    folder = _resolve(directory)
    if folder is None:
        if not directory.exists():
            raise UserError(f"{directory} does not exist; give the folder a previous run saved its checkpoint in")
        if not directory.is_dir():
            raise UserError(f"{directory} is not a folder; give the checkpoint folder a previous run saved")
        try:
            _read_state_json(directory)
        except _Corrupt as e:
            raise _damaged(directory, str(e)) from None
    try:
        state = _read_state_json(folder)
    except _Corrupt as e:
        raise _damaged(folder, str(e)) from None

    def bad(why: str) -> UserError:
        return UserError(f"{folder} holds a corrupt training checkpoint ({why}); resume from another checkpoint or start afresh")

    model_sd, opt_tensors, rng_tensors = (_read_verified(folder, name, state) for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE))
    try:
        opt = state["optimizer"]
        opt_sd = {
            "state": _decode(opt["state"], opt_tensors),
            "param_groups": _decode(opt["param_groups"], opt_tensors),
        }
        if "other" in opt:
            opt_sd.update(_decode(opt["other"], opt_tensors))
        sched_sd = _decode(state.get("scheduler"), opt_tensors)
        extra = _decode(state.get("extra"), opt_tensors)
        step, epoch, rng = state["step"], state["epoch"], state["rng"]
    except (_Corrupt, KeyError, TypeError, ValueError) as e:
        raise bad(str(e) or type(e).__name__) from None
    if not isinstance(opt_sd["state"], dict) or not isinstance(opt_sd["param_groups"], list):
        raise bad("optimizer state has the wrong form")
    if not all(isinstance(k, str) for k in opt_sd["state"]):
        raise bad("optimizer state keys are not parameter names")

    if is_sharded(model):
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    else:
        load_weights(model, model_sd, str(folder / MODEL_FILE))  # strict, with one-line errors
    try:
        # strict=False: a parameter that never had a gradient has no optimizer state to restore
        set_optimizer_state_dict(model, optimizer, opt_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise UserError(
            f"{folder}: the saved optimizer state does not match the optimizer in the recipe ({msg}); "
            "resume with the same training settings or start afresh"
        ) from None
    if scheduler is not None:
        if sched_sd is None:
            raise UserError(
                f"{folder} has no learning-rate scheduler state but the run uses a scheduler; "
                "resume with the same training settings or start afresh"
            )
        try:
            scheduler.load_state_dict(sched_sd)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f"{folder}: the saved scheduler state does not match the scheduler in the recipe ({e}); "
                "resume with the same training settings or start afresh"
            ) from None
    if restore_rng:
        try:
            _restore_rng(rng, rng_tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise bad(f"RNG state: {e}") from None
    return {"step": step, "epoch": epoch, "extra": extra if extra is not None else {}}
