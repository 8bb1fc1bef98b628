"""Writing a teacher-output cache: the teacher run once over a dataset, its outputs stored for later epochs and
later students (the files are described in distill.signals.cache_format; reading is distill.signals.cached).

Every file is written under a temporary name and os.replace'd, and the manifest (listing only finished shards)
is rewritten atomically after each shard, so a killed write resumes at the first unfinished shard (after
re-checking the finished ones).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device
from numpy.lib.format import open_memmap
from torch import Tensor, nn

from distill.durable import atomic_write_text, checked_json, writing
from distill.errors import UserError
from distill.features import capture, resolve_layers
from distill.signals.cache_format import (
    FORMAT,
    MANIFEST,
    VALUE_DTYPES,
    VERSION,
    dataset_sha256,
    example_inputs,
    differs,
    file_sha256,
    index_dtype,
    kinds,
    layout,
    partial_path,
    read_json,
    row_counts,
    teacher_sha256,
    tensor_field,
    total_bytes,
)
from distill.signals.cached import open_cache

__all__ = ["write_cache", "write_summary"]

_FP16_MAX = float(np.finfo(np.float16).max)


def write_cache(teacher: nn.Module, dataset, out_dir, *, top_k: int | None = None, dtype: str = "float16",
                features: Sequence[str] = (), shard_rows: int = 65536, batch_size: int = 1024, resume: bool = True,
                device="cpu") -> dict:
    """Run `teacher` (eval mode, inference_mode, moved to `device`) over every row of `dataset` (.x, .y
    tensors) and store its outputs in `out_dir`; return the manifest plus "stats" (rows computed, seconds in
    the teacher forward and in I/O, bytes; not saved).

    top_k None stores full logits; top_k = k stores per row the k largest logits (`dtype`), their classes and
    the float32 logsumexp of all logits (see distill.signals.cache_format). `features` names teacher layers (as
    in dict(teacher.named_modules())) whose outputs are stored too (`dtype`), for feature methods such as hints
    and attention transfer. A complete `out_dir` with the same teacher, data and settings is reused without
    recomputing; one of anything else is refused. With resume, a `<out_dir>.partial` left by a killed write is
    continued after its finished shards are re-checked; resume=False discards it.
    """
    _check_settings(top_k, dtype, shard_rows, batch_size)
    features = list(features)
    if len(set(features)) != len(features):
        raise UserError(f"features lists a layer twice ({', '.join(features)}): list each teacher layer once")
    resolve_layers(teacher, features, role="teacher")  # an unknown layer fails now, listing the valid names
    out = Path(out_dir)
    if out.name.endswith(".partial"):
        raise UserError(f"the cache folder {out} must not end in .partial (that names half-written caches): choose another name")
    t0 = time.perf_counter()
    tensors = isinstance(getattr(dataset, "x", None), Tensor)  # images and tables; else token ids collated per batch
    if tensors:
        x, n = tensor_field(dataset, "x"), len(tensor_field(dataset, "y"))
        if n == 0 or len(x) != n:
            raise UserError(f"the dataset to cache has {len(x)} inputs and {n} labels: it needs rows, as many of each")
    elif features:
        raise UserError("features of a text model are per token and not cached yet: cache logits only (--features with no name)")
    offsets = np.concatenate([[0], np.cumsum(row_counts(dataset))])  # example i owns rows offsets[i]..offsets[i+1]-1
    n_rows = int(offsets[-1])
    if n_rows == 0:
        raise UserError("the dataset to cache has no rows")
    header = {
        "format": FORMAT, "version": VERSION, "complete": False,
        "teacher_sha256": teacher_sha256(teacher), "dataset_sha256": dataset_sha256(dataset),
        "n_rows": n_rows, "input_shape": list(x.shape[1:]) if tensors else [], "num_classes": None,
        "top_k": top_k, "value_dtype": dtype, "index_dtype": None,
        "features": features, "feature_shapes": None, "shards": [],
    }
    stats = {"rows_computed": 0, "shards_computed": 0, "teacher_seconds": 0.0, "io_seconds": 0.0,
             "hash_seconds": time.perf_counter() - t0, "reused": False}
    if out.exists():
        manifest = _reuse(out, header)
        stats.update(reused=True, bytes=total_bytes(manifest), total_seconds=time.perf_counter() - t0)
        return {**manifest, "stats": stats}

    partial = partial_path(out)
    manifest = _start_or_resume(partial, header, resume)
    was_training = teacher.training
    teacher.eval().to(device)
    try:
        first = int(np.searchsorted(offsets, sum(s["rows"] for s in manifest["shards"])))  # first example not stored
        while first < len(offsets) - 1:
            last = min(first + shard_rows, len(offsets) - 1)  # shards hold whole examples
            rows = int(offsets[last] - offsets[first])
            entry = _write_shard(teacher, dataset, offsets, manifest, partial, len(manifest["shards"]), first, last,
                                 batch_size, device, stats)
            t_io = time.perf_counter()
            manifest["shards"].append(entry)
            atomic_write_text(partial / MANIFEST, checked_json(manifest, indent=1))
            stats["io_seconds"] += time.perf_counter() - t_io
            stats["rows_computed"] += rows
            stats["shards_computed"] += 1
            first = last
    except BaseException:
        if not manifest["shards"]:  # nothing finished: leave no half-written folder behind
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        teacher.train(was_training)
    manifest["complete"] = True
    atomic_write_text(partial / MANIFEST, checked_json(manifest, indent=1))
    os.rename(partial, out)
    stats.update(bytes=total_bytes(manifest), total_seconds=time.perf_counter() - t0)
    return {**manifest, "stats": stats}


def _check_settings(top_k, dtype, shard_rows, batch_size) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be an integer >= 1 (classes kept per row) or None for full logits, got {top_k!r}")
    if dtype not in VALUE_DTYPES:
        raise UserError(f"cache dtype must be one of {', '.join(VALUE_DTYPES)}, got {dtype!r}")
    for name, value in (("shard_rows", shard_rows), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def _reuse(out: Path, header: dict) -> dict:
    """The manifest of an existing complete cache that matches the request; anything else is refused."""
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out} exists and is not a teacher cache: choose another output folder or delete {out}")
    cache = open_cache(out)  # checks completeness and every file's sha256
    diff = differs(cache.manifest, header)
    if diff:
        raise UserError(f"{out} already holds a cache of {diff}: choose another output folder or delete {out}")
    return cache.manifest


def _start_or_resume(partial: Path, header: dict, resume: bool) -> dict:
    """The manifest to continue: the partial folder's with its finished shards re-checked, or a fresh one."""
    manifest = read_json(partial / MANIFEST) if resume and partial.is_dir() else None
    if resume and manifest is None and (partial / MANIFEST).exists():  # writes are atomic: this is damage, not a kill
        raise UserError(f"{partial / MANIFEST} is damaged (unreadable, or its sha256 does not match): delete "
                        f"{partial} or start over with `distill cache --restart`")
    if (manifest is None or manifest.get("format") != FORMAT or manifest.get("version") != VERSION
            or not manifest.get("shards")):
        shutil.rmtree(partial, ignore_errors=True)  # no finished shard to keep: start over
        try:
            partial.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create the cache folder {partial} ({e.strerror}): choose a writable output folder") from None
        atomic_write_text(partial / MANIFEST, checked_json(header, indent=1))
        return dict(header)
    diff = differs(manifest, header)
    if diff:  # refused rather than discarded: it may hold hours of teacher work under the earlier settings
        raise UserError(f"{partial} was started for {diff}: rerun with the same settings, or start over with "
                        "resume=False (`distill cache --restart`)")
    kept = []
    for shard in manifest.get("shards", []):  # keep the finished shards up to the first damaged one
        files = [partial / f["name"] for f in shard["files"].values()]
        if not all(p.is_file() and file_sha256(p) == f["sha256"] for p, f in zip(files, shard["files"].values())):
            break
        kept.append(shard)
    manifest["shards"], manifest["complete"] = kept, False
    listed = {f["name"] for s in kept for f in s["files"].values()} | {MANIFEST}
    for p in partial.iterdir():  # half-written shards and temp files of the killed write
        if p.name not in listed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    atomic_write_text(partial / MANIFEST, checked_json(manifest, indent=1))
    return manifest


def _write_shard(teacher, dataset, offsets, manifest, partial: Path, index: int, first: int, last: int,
                 batch_size: int, device, stats: dict) -> dict:
    """Compute the rows of examples [first, last) into temp files, then move them into place; return the shard entry."""
    arrays: dict[str, np.ndarray] = {}
    temps: dict[str, Path] = {}
    start, rows = int(offsets[first]), int(offsets[last] - offsets[first])
    try:
        for e in range(first, last, batch_size):
            e_end = min(e + batch_size, last)
            a, b = int(offsets[e]), int(offsets[e_end])  # the batch's rows
            t_teacher = time.perf_counter()
            parts = _teacher_rows(teacher, example_inputs(dataset, e, e_end), b - a, manifest, a, device)
            t_io = time.perf_counter()
            stats["teacher_seconds"] += t_io - t_teacher
            if not arrays:  # opened after the first batch: it gives num_classes and the feature shapes
                for kind in kinds(manifest):
                    temps[kind] = partial / f".shard-{index:05d}.{kind}.npy.tmp"
                    dt, shape = layout(manifest, kind, rows)
                    with writing(temps[kind]):
                        arrays[kind] = open_memmap(temps[kind], mode="w+", dtype=dt, shape=shape)
                        _reserve(temps[kind])
            for kind, arr in arrays.items():
                arr[a - start:b - start] = parts[kind]
            stats["io_seconds"] += time.perf_counter() - t_io
        t_io = time.perf_counter()
        for arr in arrays.values():
            arr.flush()
        arrays.clear()  # unmap before the rename
        files = {}
        for kind, tmp in temps.items():
            name = f"shard-{index:05d}.{kind}.npy"
            files[kind] = {"name": name, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
            os.replace(tmp, partial / name)
        stats["io_seconds"] += time.perf_counter() - t_io
    finally:
        arrays.clear()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return {"start": start, "rows": rows, "files": files}


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a new (sparse) memory-mapped file now: on a full disk this is an OSError here,
    where writing into its pages later would be a SIGBUS."""
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # (a file system that cannot: carry on)
                raise
        finally:
            os.close(fd)


def _teacher_rows(teacher, xb, n: int, manifest: dict, first_row: int, device) -> dict[str, np.ndarray]:
    """The teacher's outputs (n rows) for one batch of inputs, encoded as they are stored (num_classes and the
    feature shapes are set on the first batch)."""
    layers = manifest["features"]
    with torch.inference_mode(), capture(teacher, layers, role="teacher") as feats:
        logits = teacher(send_to_device(xb, device)).float()
    where = f"rows {first_row}..{first_row + n - 1}"
    if logits.dim() != 2 or logits.shape[0] != n:
        raise UserError(f"the teacher returned shape {tuple(logits.shape)} for {n} rows: a cache needs (rows, classes) logits")
    C, k = logits.shape[1], manifest["top_k"]
    shapes = [list(feats[name].shape[1:]) for name in layers]
    for name in layers:
        if feats[name].dim() < 1 or feats[name].shape[0] != n:
            raise UserError(f"teacher layer {name!r} gave shape {tuple(feats[name].shape)} for {n} inputs: "
                            "a cached feature needs one row per input; choose a layer whose output starts with the batch")
    if manifest["num_classes"] is None:
        if k is not None and k > C:
            raise UserError(f"top_k={k} is more than the teacher's {C} classes: choose top_k <= {C}")
        manifest["num_classes"] = C
        manifest["index_dtype"] = None if k is None else index_dtype(C).name
        manifest["feature_shapes"] = shapes
    elif C != manifest["num_classes"]:
        raise UserError(f"the teacher gave {C} classes for {where} but {manifest['num_classes']} before")
    elif shapes != manifest["feature_shapes"]:
        raise UserError(f"the teacher layers {', '.join(layers)} gave shapes {shapes} for {where} but "
                        f"{manifest['feature_shapes']} before: cached features need the same shape for every row")
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"the teacher gave non-finite logits (nan or inf) for {where}: a cache cannot store them; check the teacher")
    if k is None:
        stored = {"logits": logits}
    else:
        values, indices = logits.topk(k, dim=-1)  # sorted, largest first
        stored = {"values": values, "indices": indices.to(getattr(torch, manifest["index_dtype"])),
                  "logsumexp": torch.logsumexp(logits, dim=-1)}
    valued = ["logits" if k is None else "values"]
    for j, name in enumerate(layers):
        feature = feats[name].float()
        if not bool(torch.isfinite(feature).all()):
            raise UserError(f"teacher layer {name!r} gave non-finite values for {where}: a cache cannot store them; check the teacher")
        stored[f"feature{j}"] = feature
        valued.append(f"feature{j}")
    if manifest["value_dtype"] == "float16":
        for kind in valued:
            peak = float(stored[kind].abs().max())
            if peak > _FP16_MAX:
                what = "logits" if kind in ("logits", "values") else f"layer {layers[int(kind[7:])]!r} outputs"
                raise UserError(f"the teacher's {what} reach {peak:.4g} in {where}, beyond float16's range: use dtype float32")
            stored[kind] = stored[kind].half()
    return {kind: t.cpu().numpy() for kind, t in stored.items()}


def write_summary(manifest: dict, out) -> str:
    """One line for the CLI: rows, bytes, seconds, rows/s and where the time went."""
    s = manifest["stats"]
    what = "full logits" if manifest["top_k"] is None else f"top-{manifest['top_k']}"
    if manifest.get("features"):
        what += f" + features of {', '.join(manifest['features'])}"
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
