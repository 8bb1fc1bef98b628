"""The on-disk format of a teacher-output cache: its files, its manifest, and the identities it is matched by.

A cache folder (built as `<out>.partial/`, renamed to `<out>/` only when complete):

    manifest.json              what is stored, for which teacher and data, with the sha256 of every file
    shard-00000.logits.npy     full logits (rows, C), float16 or float32                        (top_k None)
    shard-00000.values.npy     the row's k largest logits (rows, k), largest first              (top_k = k)
    shard-00000.indices.npy    their classes (rows, k): uint8 / int16 / int32, the smallest type holding C-1
    shard-00000.logsumexp.npy  float32 logsumexp of the row's FULL float32 logits (rows,)
    shard-00000.feature0.npy   the output of the teacher layer features[0] (rows, *shape), in the value dtype
                               (one file per layer listed in the manifest's "features"; none by default)

Why the logsumexp: with L = logsumexp_c(t_c) the teacher's probability of a kept class c is exp(t_c - L), and
the mass outside the top k is 1 - Σ_{c in top k} exp(t_c - L). So the "rest" bucket of top-k KD
(distill.losses.topk, rest="bucket") is exact at temperature T = 1. At T != 1 it is not: the bucket needs
logsumexp_c(t_c / T), which the top k and L do not determine; use a full cache or rest="renormalize" there.
With float16 values the kept probabilities carry float16's relative rounding (about 5e-4 per logit unit).

Shards are NumPy .npy files, read memory-mapped with allow_pickle=False. Caches are matched to their teacher
and data by sha256 (teacher_sha256, dataset_sha256).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.data.arrays import gather
from distill.durable import read_checked_json
from distill.errors import UserError

FORMAT = "distill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
VALUE_DTYPES = ("float16", "float32")
FULL_KINDS = ("logits",)
TOPK_KINDS = ("values", "indices", "logsumexp")
FILE_NAME = re.compile(r"^shard-\d{5,}\.(logits|values|indices|logsumexp|feature\d+)\.npy$")
# What a resumed or reused cache must share with the request (num_classes follows from the teacher).
IDENTITY = {"teacher_sha256": "teacher", "dataset_sha256": "dataset", "n_rows": "row count",
            "input_shape": "input shape", "top_k": "top_k", "value_dtype": "dtype", "features": "feature layers"}
DEFAULTS = {"features": []}  # manifests written before a field existed read as its default


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
    """sha256 of the dataset's x and y: shape, dtype and bytes of each, in that order (a dataset of token ids
    hashes its own contents: distill.data.text.TokenizedText.sha256)."""
    if callable(getattr(dataset, "sha256", None)):
        return dataset.sha256()
    h = hashlib.sha256()
    for name in ("x", "y"):
        t = tensor_field(dataset, name).detach().to("cpu").contiguous()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def row_counts(dataset) -> np.ndarray:
    """Teacher output rows per example: 1 for an image, a table row or a sentence; its counted words for a tagger.
    A cache stores rows in dataset order, so example i owns rows offsets[i]..offsets[i + 1] - 1."""
    counts = getattr(dataset, "row_counts", None)
    if callable(counts):
        return np.asarray(counts(), dtype=np.int64)
    return np.ones(len(tensor_field(dataset, "y")), dtype=np.int64)


def example_inputs(dataset, start: int, stop: int):
    """The model inputs of examples start..stop - 1: a slice of .x, or a collated batch of a text dataset."""
    if isinstance(getattr(dataset, "x", None), Tensor):
        return dataset.x[start:stop]
    return gather(dataset, list(range(start, stop)))[0]


def tensor_field(dataset, name: str) -> Tensor:
    value = getattr(dataset, name, None)
    if not isinstance(value, Tensor):
        raise UserError(f"a teacher cache needs an in-memory dataset with tensors .x and .y (distill.data.ArrayDataset), "
                        f"got {type(dataset).__name__} without tensor .{name}")
    return value


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def kinds(manifest: dict) -> tuple[str, ...]:
    """The files of one shard: the logits part, then one per cached feature layer."""
    logits = FULL_KINDS if manifest["top_k"] is None else TOPK_KINDS
    return logits + tuple(f"feature{j}" for j in range(len(field(manifest, "features"))))


def field(manifest: dict, key: str):
    return manifest.get(key, DEFAULTS.get(key))


def layout(manifest: dict, kind: str, rows: int) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of one shard file of `kind` holding `rows` rows."""
    if kind == "logits":
        return np.dtype(manifest["value_dtype"]), (rows, manifest["num_classes"])
    if kind == "values":
        return np.dtype(manifest["value_dtype"]), (rows, manifest["top_k"])
    if kind == "indices":
        return np.dtype(manifest["index_dtype"]), (rows, manifest["top_k"])
    if kind == "logsumexp":
        return np.dtype(np.float32), (rows,)
    j = int(kind[len("feature"):])
    return np.dtype(manifest["value_dtype"]), (rows, *manifest["feature_shapes"][j])


def differs(manifest: dict, header: dict) -> str | None:
    """The first identity field in which a stored manifest differs from the request, in words."""
    for key, words in IDENTITY.items():
        if field(manifest, key) != header[key]:
            return f"another {words}" if key.endswith("sha256") else f"{words}={field(manifest, key)!r} (now {header[key]!r})"
    return None


def total_bytes(manifest: dict) -> int:
    return sum(f["bytes"] for s in manifest["shards"] for f in s["files"].values())


def read_json(path: Path) -> dict | None:
    """A manifest, its sha256 checked when it has one (caches written before it have none); None if unreadable.
    One whose sha256 does not match is refused: it is damage (writes are atomic), and the fields cannot be trusted."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    return read_checked_json(path, f"delete {path.parent} and write the cache again with `distill cache`",
                             required=False)


def read_manifest(path: Path) -> dict:
    """The manifest of a complete cache folder; a one-line UserError for anything else."""
    rerun = "rerun `distill cache` to finish it"
    if path.name.endswith(".partial"):
        raise UserError(f"{path} is a half-written cache: {rerun}, then open {path.name[:-len('.partial')]}")
    if not path.is_dir():
        if partial_path(path).is_dir():
            raise UserError(f"no cache at {path}: it is half-written in {partial_path(path)}; {rerun}")
        raise UserError(f"no cache at {path}: write one with `distill cache ... --out {path}`")
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a teacher cache (no {MANIFEST}): give a folder written by `distill cache`")
    manifest = read_json(path / MANIFEST)
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


def _features_problem(m: dict) -> str | None:
    names, shapes = field(m, "features"), m.get("feature_shapes", [] if not field(m, "features") else None)
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        return "features must be a list of distinct layer names"
    if not (isinstance(shapes, list) and len(shapes) == len(names)
            and all(isinstance(s, list) and all(_is_int(d, 1) for d in s) for s in shapes)):
        return "feature_shapes must give one list of positive sizes per feature layer"
    return None


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
    why = _features_problem(m)
    if why:
        return why
    shards, start = m.get("shards"), 0
    if not isinstance(shards, list) or not shards:
        return "no shards listed"
    expected = set(kinds(m))
    for s in shards:
        if not isinstance(s, dict) or s.get("start") != start or not _is_int(s.get("rows"), 1):
            return f"the shards do not cover the rows in order (at row {start})"
        files = s.get("files")
        if not isinstance(files, dict) or set(files) != expected:
            return f"shard at row {start} must list the files {', '.join(sorted(expected))}"
        for f in files.values():
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and FILE_NAME.match(f["name"])
                    and _is_int(f.get("bytes")) and isinstance(f.get("sha256"), str)):
                return f"shard at row {start} has a bad file entry"
        start += s["rows"]
    if start != m["n_rows"]:
        return f"the shards hold {start} rows, not n_rows={m['n_rows']}"
    return None
