"""The teacher run once over a dataset, its outputs stored for later epochs and later students.

A cache folder (built as `<out>.partial/`, renamed to `<out>/` only when complete):

    manifest.json              what is stored, for which teacher and data, with the sha256 of every file
    shard-00000.logits.npy     full logits (rows, C), float16 or float32                        (top_k None)
    shard-00000.values.npy     the row's k largest logits (rows, k), largest first              (top_k = k)
    shard-00000.indices.npy    their classes (rows, k): uint8 / int16 / int32, the smallest type holding C-1
    shard-00000.logsumexp.npy  float32 logsumexp of the row's FULL float32 logits (rows,)

Why the logsumexp: with L = logsumexp_c(t_c) the teacher's probability of a kept class c is exp(t_c - L), and
the mass outside the top k is 1 - Σ_{c in top k} exp(t_c - L). So the "rest" bucket of top-k KD
(distill.losses.topk, rest="bucket") is exact at temperature T = 1. At T != 1 it is not: the bucket needs
logsumexp_c(t_c / T), which the top k and L do not determine; use a full cache or rest="renormalize" there.
With float16 values the kept probabilities carry float16's relative rounding (about 5e-4 per logit unit).

Shards are NumPy .npy files, read memory-mapped with allow_pickle=False. Every file is written under a
temporary name and os.replace'd, and the manifest (listing only finished shards) is rewritten atomically after
each shard, so a killed write resumes at the first unfinished shard (after re-checking the finished ones).
Caches are matched to their teacher and data by sha256 (see teacher_sha256, dataset_sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.checkpoint import atomic_write_text
from distill.errors import UserError

__all__ = [
    "CachedDataset",
    "CachedTeacher",
    "TeacherCache",
    "dataset_sha256",
    "index_dtype",
    "open_cache",
    "teacher_sha256",
    "write_cache",
    "write_summary",
]

FORMAT = "distill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
VALUE_DTYPES = ("float16", "float32")
FULL_KINDS = ("logits",)
TOPK_KINDS = ("values", "indices", "logsumexp")
_FILE_NAME = re.compile(r"^shard-\d{5,}\.(logits|values|indices|logsumexp)\.npy$")
_FP16_MAX = float(np.finfo(np.float16).max)
# What a resumed or reused cache must share with the request (num_classes follows from the teacher).
_IDENTITY = {"teacher_sha256": "teacher", "dataset_sha256": "dataset", "n_rows": "row count",
             "input_shape": "input shape", "top_k": "top_k", "value_dtype": "dtype"}


# ----------------------------------------------------------------------------- identities and layout


def index_dtype(num_classes: int) -> np.dtype:
    """Smallest integer type that holds every class index 0..C-1: uint8 (C <= 256), int16 (C <= 32768), int32.
    int16 rather than uint16 because torch supports few operations on uint16; int16 still covers 32k vocabularies."""
    for dt in (np.uint8, np.int16, np.int32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise UserError(f"{num_classes} classes do not fit 32-bit class indices; a cache holds at most 2**31 classes")


def teacher_sha256(teacher: nn.Module) -> str:
    """sha256 over the teacher's tensors in name order (state_dict plus non-persistent buffers: name, shape,
    dtype and bytes of each), then its module tree (name, type and extra_repr of each module), so the same
    weights in another architecture (another activation, say) hash differently too."""
    h = hashlib.sha256()
    tensors = dict(teacher.named_buffers())
    tensors.update(teacher.state_dict())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"tensor {name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    for name, module in teacher.named_modules():
        kind = type(module)
        h.update(f"module {name} {kind.__module__}.{kind.__qualname__} {module.extra_repr()}\n".encode())
    return h.hexdigest()


def dataset_sha256(dataset) -> str:
    """sha256 of the dataset's x and y: shape, dtype and bytes of each, in that order."""
    h = hashlib.sha256()
    for name in ("x", "y"):
        t = _tensor_field(dataset, name).detach().to("cpu").contiguous()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _tensor_field(dataset, name: str) -> Tensor:
    value = getattr(dataset, name, None)
    if not isinstance(value, Tensor):
        raise UserError(f"a teacher cache needs an in-memory dataset with tensors .x and .y (distill.data.ArrayDataset), "
                        f"got {type(dataset).__name__} without tensor .{name}")
    return value


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _kinds(top_k: int | None) -> tuple[str, ...]:
    return FULL_KINDS if top_k is None else TOPK_KINDS


def _layout(manifest: dict, kind: str, rows: int) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of one shard file of `kind` holding `rows` rows."""
    if kind == "logits":
        return np.dtype(manifest["value_dtype"]), (rows, manifest["num_classes"])
    if kind == "values":
        return np.dtype(manifest["value_dtype"]), (rows, manifest["top_k"])
    if kind == "indices":
        return np.dtype(manifest["index_dtype"]), (rows, manifest["top_k"])
    return np.dtype(np.float32), (rows,)  # logsumexp


def _differs(manifest: dict, header: dict) -> str | None:
    """The first identity field in which a stored manifest differs from the request, in words."""
    for key, words in _IDENTITY.items():
        if manifest.get(key) != header[key]:
            return f"another {words}" if key.endswith("sha256") else f"{words}={manifest.get(key)!r} (now {header[key]!r})"
    return None


# ----------------------------------------------------------------------------- writing


def write_cache(teacher: nn.Module, dataset, out_dir, *, top_k: int | None = None, dtype: str = "float16",
                shard_rows: int = 65536, batch_size: int = 1024, resume: bool = True, device="cpu") -> dict:
    """Run `teacher` (eval mode, inference_mode, moved to `device`) over every row of `dataset` (.x, .y
    tensors) and store its outputs in `out_dir`; return the manifest plus "stats" (rows computed, seconds in
    the teacher forward and in I/O, bytes; not saved).

    top_k None stores full logits; top_k = k stores per row the k largest logits (`dtype`), their classes and
    the float32 logsumexp of all logits (see the module docstring). A complete `out_dir` with the same teacher,
    data and settings is reused without recomputing; one of anything else is refused. With resume, a
    `<out_dir>.partial` left by a killed write is continued after its finished shards are re-checked;
    resume=False discards it.
    """
    _check_settings(top_k, dtype, shard_rows, batch_size)
    out = Path(out_dir)
    if out.name.endswith(".partial"):
        raise UserError(f"the cache folder {out} must not end in .partial (that names half-written caches): choose another name")
    t0 = time.perf_counter()
    x, n_rows = _tensor_field(dataset, "x"), len(_tensor_field(dataset, "y"))
    if n_rows == 0 or len(x) != n_rows:
        raise UserError(f"the dataset to cache has {len(x)} inputs and {n_rows} labels: it needs rows, as many of each")
    header = {
        "format": FORMAT, "version": VERSION, "complete": False,
        "teacher_sha256": teacher_sha256(teacher), "dataset_sha256": dataset_sha256(dataset),
        "n_rows": n_rows, "input_shape": list(x.shape[1:]), "num_classes": None,
        "top_k": top_k, "value_dtype": dtype, "index_dtype": None, "shards": [],
    }
    stats = {"rows_computed": 0, "shards_computed": 0, "teacher_seconds": 0.0, "io_seconds": 0.0,
             "hash_seconds": time.perf_counter() - t0, "reused": False}
    if out.exists():
        manifest = _reuse(out, header)
        stats.update(reused=True, bytes=_total_bytes(manifest), total_seconds=time.perf_counter() - t0)
        return {**manifest, "stats": stats}

    partial = _partial_path(out)
    manifest = _start_or_resume(partial, header, resume)
    was_training = teacher.training
    teacher.eval().to(device)
    try:
        done = sum(s["rows"] for s in manifest["shards"])
        while done < n_rows:
            rows = min(shard_rows, n_rows - done)
            entry = _write_shard(teacher, x, manifest, partial, len(manifest["shards"]), done, rows, batch_size, device, stats)
            t_io = time.perf_counter()
            manifest["shards"].append(entry)
            atomic_write_text(partial / MANIFEST, json.dumps(manifest, indent=1))
            stats["io_seconds"] += time.perf_counter() - t_io
            stats["rows_computed"] += rows
            stats["shards_computed"] += 1
            done += rows
    except BaseException:
        if not manifest["shards"]:  # nothing finished: leave no half-written folder behind
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        teacher.train(was_training)
    manifest["complete"] = True
    atomic_write_text(partial / MANIFEST, json.dumps(manifest, indent=1))
    os.rename(partial, out)
    stats.update(bytes=_total_bytes(manifest), total_seconds=time.perf_counter() - t0)
    return {**manifest, "stats": stats}


def _check_settings(top_k, dtype, shard_rows, batch_size) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be an integer >= 1 (classes kept per row) or None for full logits, got {top_k!r}")
    if dtype not in VALUE_DTYPES:
        raise UserError(f"cache dtype must be one of {', '.join(VALUE_DTYPES)}, got {dtype!r}")
    for name, value in (("shard_rows", shard_rows), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def _total_bytes(manifest: dict) -> int:
    return sum(f["bytes"] for s in manifest["shards"] for f in s["files"].values())


def _reuse(out: Path, header: dict) -> dict:
    """The manifest of an existing complete cache that matches the request; anything else is refused."""
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out} exists and is not a teacher cache: choose another output folder or delete {out}")
    cache = open_cache(out)  # checks completeness, every file's sha256
    diff = _differs(cache.manifest, header)
    if diff:
        raise UserError(f"{out} already holds a cache of {diff}: choose another output folder or delete {out}")
    return cache.manifest


def _start_or_resume(partial: Path, header: dict, resume: bool) -> dict:
    """The manifest to continue: the partial folder's with its finished shards re-checked, or a fresh one."""
    manifest = _read_json(partial / MANIFEST) if resume and partial.is_dir() else None
    if (manifest is None or manifest.get("format") != FORMAT or manifest.get("version") != VERSION
            or not manifest.get("shards")):
        shutil.rmtree(partial, ignore_errors=True)  # no finished shard to keep: start over
        try:
            partial.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create the cache folder {partial} ({e.strerror}): choose a writable output folder") from None
        atomic_write_text(partial / MANIFEST, json.dumps(header, indent=1))
        return dict(header)
    diff = _differs(manifest, header)
    if diff:  # refused rather than discarded: it may hold hours of teacher work under the earlier settings
        raise UserError(f"{partial} was started for {diff}: rerun with the same settings, or start over with "
                        "resume=False (`distill cache --restart`)")
    kept = []
    for shard in manifest.get("shards", []):  # keep the finished shards up to the first damaged one
        files = [partial / f["name"] for f in shard["files"].values()]
        if not all(p.is_file() and _file_sha256(p) == f["sha256"] for p, f in zip(files, shard["files"].values())):
            break
        kept.append(shard)
    manifest["shards"], manifest["complete"] = kept, False
    listed = {f["name"] for s in kept for f in s["files"].values()} | {MANIFEST}
    for p in partial.iterdir():  # half-written shards and temp files of the killed write
        if p.name not in listed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    atomic_write_text(partial / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _write_shard(teacher, x, manifest, partial: Path, index: int, start: int, rows: int, batch_size: int,
                 device, stats: dict) -> dict:
    """Compute rows [start, start + rows) into temp files, then move them into place; return the shard entry."""
    kinds = _kinds(manifest["top_k"])
    names = {kind: f"shard-{index:05d}.{kind}.npy" for kind in kinds}
    temps = {kind: partial / f".{name}.tmp" for kind, name in names.items()}
    arrays: dict[str, np.ndarray] = {}
    try:
        for a in range(start, start + rows, batch_size):
            b = min(a + batch_size, start + rows)
            t_teacher = time.perf_counter()
            parts = _teacher_rows(teacher, x[a:b], manifest, a, device)
            t_io = time.perf_counter()
            stats["teacher_seconds"] += t_io - t_teacher
            if not arrays:  # opened after the first batch: it gives num_classes
                for kind in kinds:
                    dt, shape = _layout(manifest, kind, rows)
                    arrays[kind] = open_memmap(temps[kind], mode="w+", dtype=dt, shape=shape)
            for kind in kinds:
                arrays[kind][a - start:b - start] = parts[kind]
            stats["io_seconds"] += time.perf_counter() - t_io
        t_io = time.perf_counter()
        for arr in arrays.values():
            arr.flush()
        arrays.clear()  # unmap before the rename
        files = {}
        for kind in kinds:
            final = partial / names[kind]
            files[kind] = {"name": names[kind], "bytes": temps[kind].stat().st_size, "sha256": _file_sha256(temps[kind])}
            os.replace(temps[kind], final)
        stats["io_seconds"] += time.perf_counter() - t_io
    finally:
        arrays.clear()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return {"start": start, "rows": rows, "files": files}


def _teacher_rows(teacher, xb: Tensor, manifest: dict, first_row: int, device) -> dict[str, np.ndarray]:
    """The teacher's outputs for one batch, encoded as they are stored (num_classes set on the first batch)."""
    with torch.inference_mode():
        logits = teacher(xb.to(device)).float()
    where = f"rows {first_row}..{first_row + len(xb) - 1}"
    if logits.dim() != 2 or logits.shape[0] != len(xb):
        raise UserError(f"the teacher returned shape {tuple(logits.shape)} for {len(xb)} inputs: a cache needs (rows, classes) logits")
    C, k = logits.shape[1], manifest["top_k"]
    if manifest["num_classes"] is None:
        if k is not None and k > C:
            raise UserError(f"top_k={k} is more than the teacher's {C} classes: choose top_k <= {C}")
        manifest["num_classes"] = C
        manifest["index_dtype"] = None if k is None else index_dtype(C).name
    elif C != manifest["num_classes"]:
        raise UserError(f"the teacher gave {C} classes for {where} but {manifest['num_classes']} before")
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"the teacher gave non-finite logits (nan or inf) for {where}: a cache cannot store them; check the teacher")
    if k is None:
        stored = {"logits": logits}
    else:
        values, indices = logits.topk(k, dim=-1)  # sorted, largest first
        stored = {"values": values, "indices": indices.to(getattr(torch, manifest["index_dtype"])),
                  "logsumexp": torch.logsumexp(logits, dim=-1)}
    main = stored["logits" if k is None else "values"]
    if manifest["value_dtype"] == "float16":
        peak = float(main.abs().max())
        if peak > _FP16_MAX:
            raise UserError(f"the teacher's logits reach {peak:.4g} in {where}, beyond float16's range: use dtype float32")
        stored["logits" if k is None else "values"] = main.half()
    return {kind: t.cpu().numpy() for kind, t in stored.items()}


def write_summary(manifest: dict, out) -> str:
    """One line for the CLI: rows, bytes, seconds, rows/s and where the time went."""
    s = manifest["stats"]
    what = "full logits" if manifest["top_k"] is None else f"top-{manifest['top_k']}"
    size = f"{s['bytes'] / 1e6:.2f} MB" if s["bytes"] >= 1e5 else f"{s['bytes'] / 1e3:.1f} kB"
    if s["reused"]:
        return f"cache {out}: already complete for this teacher and data, reused ({manifest['n_rows']} rows, {what} {manifest['value_dtype']}, {size})"
    total = max(s["total_seconds"], 1e-9)
    resumed = manifest["n_rows"] - s["rows_computed"]
    return (f"cache {out}: {manifest['n_rows']} rows ({s['rows_computed']} computed"
            + (f", {resumed} resumed" if resumed else "")
            + f"), {what} {manifest['value_dtype']}, {size} in {total:.2f} s, {s['rows_computed'] / total:.0f} rows/s; "
            f"teacher forward {100 * s['teacher_seconds'] / total:.0f}%, I/O {100 * s['io_seconds'] / total:.0f}%, "
            f"hashing {100 * s['hash_seconds'] / total:.0f}%")


# ----------------------------------------------------------------------------- reading


def open_cache(out_dir, *, teacher: nn.Module | None = None, dataset=None, top_k: int | None = None,
               verify: Literal["open", "lazy"] = "open") -> TeacherCache:
    """Open a complete cache written by write_cache, refusing (one-line UserError) a folder that is not one,
    one not finished, one of another teacher or dataset (when given), and missing or corrupt shard files.

    top_k: serve at most k classes per row (a full cache, or one stored with a larger k, serves any smaller k).
    verify="open" checks every file's sha256 now; "lazy" checks each shard's files on its first read.
    """
    path = Path(out_dir)
    manifest = _read_manifest(path)
    if teacher is not None and teacher_sha256(teacher) != manifest["teacher_sha256"]:
        raise UserError(f"{path} was written by another teacher (its weights or architecture differ): "
                        "use the cache of this teacher, or write one with `distill cache`")
    if dataset is not None:
        n = len(_tensor_field(dataset, "y"))
        if n != manifest["n_rows"]:
            raise UserError(f"{path} holds {manifest['n_rows']} rows but the dataset has {n}: use the cache of this dataset and split")
        if dataset_sha256(dataset) != manifest["dataset_sha256"]:
            raise UserError(f"{path} was written for other data (the dataset's sha256 differs): "
                            "use the cache of this dataset and split, or write one with `distill cache`")
    if verify not in ("open", "lazy"):
        raise UserError(f"verify must be 'open' or 'lazy', got {verify!r}")
    return TeacherCache(path, manifest, top_k=top_k, verify=verify)


def _read_manifest(path: Path) -> dict:
    rerun = "rerun `distill cache` to finish it"
    if path.name.endswith(".partial"):
        raise UserError(f"{path} is a half-written cache: {rerun}, then open {path.name[:-len('.partial')]}")
    if not path.is_dir():
        if _partial_path(path).is_dir():
            raise UserError(f"no cache at {path}: it is half-written in {_partial_path(path)}; {rerun}")
        raise UserError(f"no cache at {path}: write one with `distill cache ... --out {path}`")
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a teacher cache (no {MANIFEST}): give a folder written by `distill cache`")
    manifest = _read_json(path / MANIFEST)
    if manifest is None or manifest.get("format") != FORMAT:
        raise UserError(f"{path / MANIFEST} is not a teacher-cache manifest: give a folder written by `distill cache`")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} has cache format version {manifest.get('version')!r}, this distill reads {VERSION}: write it again with `distill cache`")
    if manifest.get("complete") is not True:
        raise UserError(f"{path} is not complete: {rerun}")
    why = _manifest_problem(manifest)
    if why:
        raise UserError(f"{path / MANIFEST} is corrupt ({why}): write the cache again with `distill cache`")
    return manifest


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _manifest_problem(m: dict) -> str | None:
    """Why a complete manifest cannot be read, or None: every field the reader relies on is checked."""
    if not _is_int(m.get("n_rows"), 1) or not _is_int(m.get("num_classes"), 1):
        return "n_rows and num_classes must be positive integers"
    k = m.get("top_k")
    if k is not None and not (_is_int(k, 1) and k <= m["num_classes"]):
        return "top_k must be null or an integer in 1..num_classes"
    if m.get("value_dtype") not in VALUE_DTYPES:
        return f"value_dtype must be one of {VALUE_DTYPES}"
    if k is not None and m.get("index_dtype") != index_dtype(m["num_classes"]).name:
        return "index_dtype does not match num_classes"
    if not all(isinstance(m.get(key), str) for key in ("teacher_sha256", "dataset_sha256")):
        return "the teacher and dataset hashes are missing"
    shards, start = m.get("shards"), 0
    if not isinstance(shards, list) or not shards:
        return "no shards listed"
    for s in shards:
        if not isinstance(s, dict) or s.get("start") != start or not _is_int(s.get("rows"), 1):
            return f"the shards do not cover the rows in order (at row {start})"
        files = s.get("files")
        if not isinstance(files, dict) or set(files) != set(_kinds(k)):
            return f"shard at row {start} must list the files {', '.join(_kinds(k))}"
        for f in files.values():
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and _FILE_NAME.match(f["name"])
                    and _is_int(f.get("bytes")) and isinstance(f.get("sha256"), str)):
                return f"shard at row {start} has a bad file entry"
        start += s["rows"]
    if start != m["n_rows"]:
        return f"the shards hold {start} rows, not n_rows={m['n_rows']}"
    return None


class TeacherCache:
    """Read access to a complete cache, by dataset row index (use open_cache to get one).

    logits(indices)  -> (B, C) float32: the full logits, or for a top-k cache the k logits scattered into a row
                        of -inf, so softmax of it is the teacher's distribution renormalised on its top k
                        (what torch.topk-based truncation gives).
    topk(indices)    -> (values (B, k) float32 largest first, classes (B, k) int64, logsumexp (B,) float32 of
                        the full logits at T = 1; see the module docstring for what it makes exact).
    Shard files are memory-mapped on first use and re-opened after pickling (DataLoader workers).
    """

    def __init__(self, path: Path, manifest: dict, *, top_k: int | None = None, verify: str = "open"):
        self.path, self.manifest, self.verify = Path(path), manifest, verify
        self.n_rows, self.num_classes = manifest["n_rows"], manifest["num_classes"]
        self.stored_top_k = manifest["top_k"]
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.num_classes:
                raise UserError(f"top_k must be an integer in 1..{self.num_classes}, got {top_k!r}")
            if self.stored_top_k is not None and top_k > self.stored_top_k:
                raise UserError(f"{path} stores the top {self.stored_top_k} classes per row, fewer than top_k={top_k}: "
                                f"write a cache with --top-k {top_k} (or full logits)")
        self.top_k = top_k if top_k is not None else self.stored_top_k  # None: full logits
        self._starts = np.array([s["start"] for s in manifest["shards"]], dtype=np.int64)
        self._verified: set[int] = set()
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        for i, shard in enumerate(manifest["shards"]):  # cheap checks for all files now; hashes per `verify`
            for f in shard["files"].values():
                p = self.path / f["name"]
                if not p.is_file():
                    raise UserError(f"{p} is missing: the cache is damaged; write it again with `distill cache`")
                if p.stat().st_size != f["bytes"]:
                    raise UserError(f"{p} has {p.stat().st_size} bytes, the manifest says {f['bytes']}: the cache is damaged; write it again with `distill cache`")
            if verify == "open":
                self._shard(i)

    def __len__(self) -> int:
        return self.n_rows

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}}  # memory maps are re-opened in the receiving process

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._arrays:
            shard = self.manifest["shards"][i]
            arrays = {}
            for kind, f in shard["files"].items():
                p = self.path / f["name"]
                damaged = f"{p} is corrupt ({{}}): write the cache again with `distill cache`"
                if i not in self._verified and _file_sha256(p) != f["sha256"]:
                    raise UserError(damaged.format("its sha256 differs from the manifest"))
                try:
                    arr = np.load(p, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError) as e:
                    raise UserError(damaged.format(f"not a readable .npy file: {e}")) from None
                dt, shape = _layout(self.manifest, kind, shard["rows"])
                if arr.dtype != dt or arr.shape != shape:
                    raise UserError(damaged.format(f"holds {arr.dtype} {arr.shape}, expected {dt} {shape}"))
                arrays[kind] = arr
            self._verified.add(i)
            self._arrays[i] = arrays
        return self._arrays[i]

    def _rows(self, indices) -> np.ndarray:
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"cache rows must be a 1-D sequence of integer indices, got shape {idx.shape} {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_rows):
            raise IndexError(f"cache row indices must be in 0..{self.n_rows - 1}, got {idx.min()}..{idx.max()}")
        return idx

    def _gather(self, kind: str, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of one kind of file, across shards, in the order asked."""
        dt, shape = _layout(self.manifest, kind, len(idx))
        out = np.empty(shape, dtype=dt)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for i in np.unique(shard_of):
            where = np.flatnonzero(shard_of == i)
            out[where] = self._shard(int(i))[kind][idx[where] - self._starts[i]]
        return out

    def topk(self, indices) -> tuple[Tensor, Tensor, Tensor]:
        idx = self._rows(indices)
        if self.stored_top_k is None:
            full = torch.from_numpy(self._gather("logits", idx)).float()
            values, classes = full.topk(self.top_k or self.num_classes, dim=-1)
            return values, classes, torch.logsumexp(full, dim=-1)
        k = self.top_k
        values = torch.from_numpy(self._gather("values", idx)[:, :k]).float()  # stored largest first
        classes = torch.from_numpy(self._gather("indices", idx)[:, :k].astype(np.int64))
        return values, classes, torch.from_numpy(self._gather("logsumexp", idx))

    def logits(self, indices) -> Tensor:
        if self.top_k is None:
            return torch.from_numpy(self._gather("logits", self._rows(indices))).float()
        values, classes, _ = self.topk(indices)
        return torch.full((len(values), self.num_classes), float("-inf")).scatter_(1, classes, values)


# ----------------------------------------------------------------------------- training on a cache


class CachedDataset(Dataset):
    """A dataset whose items carry the cached teacher logits: (x, y, teacher_logits), for one row or, from
    __getitems__, for a whole batch (the training loop gathers batches with it; see distill.train.make_loader).
    Refuses a cache written for other data."""

    def __init__(self, dataset, cache: TeacherCache):
        n = len(_tensor_field(dataset, "y"))
        if n != cache.n_rows or dataset_sha256(dataset) != cache.manifest["dataset_sha256"]:
            raise UserError(f"the cache {cache.path} was written for other data ({cache.n_rows} rows; this dataset has {n} "
                            "rows or other contents): use the cache of this dataset and split")
        self.dataset, self.cache = dataset, cache

    @property
    def x(self) -> Tensor:
        return self.dataset.x

    @property
    def y(self) -> Tensor:
        return self.dataset.y

    def __len__(self) -> int:
        return self.cache.n_rows

    def __getitem__(self, i):
        i = range(len(self))[i]  # negative indices and bounds as for a list
        return self.dataset.x[i], self.dataset.y[i], self.cache.logits([i])[0]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.dataset.x[idx], self.dataset.y[idx], self.cache.logits(idx)


class CachedTeacher:
    """A teacher signal (like LiveTeacher) that answers with cached logits handed to it per batch.

    The training loop calls feed(teacher_logits, inputs=x) before the method runs on a batch; the method then
    calls teacher(x) and gets those logits. `model` is None: there is no teacher network in memory, so methods
    that need one (intermediate features, input gradients) refuse through their own `.model` check.
    """

    model = None

    def __init__(self):
        self._logits: Tensor | None = None
        self._inputs: Tensor | None = None

    def feed(self, teacher_logits: Tensor, inputs: Tensor | None = None) -> None:
        """Logits for the next batch. With `inputs`, only that very tensor may be asked for (not a perturbed copy)."""
        if not isinstance(teacher_logits, Tensor) or teacher_logits.dim() != 2:
            got = tuple(teacher_logits.shape) if isinstance(teacher_logits, Tensor) else type(teacher_logits).__name__
            raise UserError(f"CachedTeacher.feed needs (batch, classes) logits, got {got}")
        self._logits, self._inputs = teacher_logits, inputs

    def __call__(self, x: Tensor) -> Tensor:
        if self._logits is None:
            raise UserError("CachedTeacher was called before any logits were fed: train on CachedDataset(data, cache) "
                            "so each batch brings its teacher logits")
        if self._inputs is not None and x is not self._inputs:
            raise UserError("CachedTeacher was asked about inputs other than the batch it was fed: cached outputs exist "
                            "only for the dataset's rows; a method that changes its inputs needs the live teacher")
        if self._logits.shape[0] != len(x):
            raise UserError(f"CachedTeacher holds logits for {self._logits.shape[0]} rows but was asked about {len(x)}: "
                            "feed the logits of this very batch")
        return self._logits
