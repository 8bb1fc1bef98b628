"""Reading a teacher-output cache (written by distill.signals.cache, format in distill.signals.cache_format),
and training from it: CachedDataset hands each batch its stored teacher outputs, CachedTeacher serves them
to the method in place of a live teacher, so no teacher network is in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.errors import UserError
from distill.finite import require_finite
from distill.signals.cache_format import (
    dataset_sha256,
    field,
    file_sha256,
    layout,
    read_manifest,
    row_counts,
    teacher_sha256,
)

__all__ = ["CachedDataset", "CachedTeacher", "TeacherCache", "open_cache"]


def open_cache(out_dir, *, teacher: nn.Module | None = None, dataset=None, top_k: int | None = None,
               verify: Literal["open", "lazy"] = "open") -> TeacherCache:
    """Open a complete cache written by write_cache, refusing (one-line UserError) a folder that is not one,
    one not finished, one of another teacher or dataset (when given), and missing or corrupt shard files.

    top_k: serve at most k classes per row (a full cache, or one stored with a larger k, serves any smaller k).
    verify="open" checks every file's sha256 now; "lazy" checks each shard's files on its first read.
    """
    path = Path(out_dir)
    manifest = read_manifest(path)
    if teacher is not None and teacher_sha256(teacher) != manifest["teacher_sha256"]:
        raise UserError(f"{path} was written by another teacher (its weights or architecture differ): "
                        "use the cache of this teacher, or write one with `distill cache`")
    if dataset is not None:
        n = int(row_counts(dataset).sum())
        if n != manifest["n_rows"]:
            raise UserError(f"{path} holds {manifest['n_rows']} rows but the dataset has {n}: use the cache of this dataset and split")
        if dataset_sha256(dataset) != manifest["dataset_sha256"]:
            raise UserError(f"{path} was written for other data (the dataset's sha256 differs): "
                            "use the cache of this dataset and split, or write one with `distill cache`")
    if verify not in ("open", "lazy"):
        raise UserError(f"verify must be 'open' or 'lazy', got {verify!r}")
    return TeacherCache(path, manifest, top_k=top_k, verify=verify)


class TeacherCache:
    """Read access to a complete cache, by dataset row index (use open_cache to get one).

    logits(indices)  -> (B, C) float32: the full logits, or for a top-k cache the k logits scattered into a row
                        of -inf, so softmax of it is the teacher's distribution renormalised on its top k
                        (what torch.topk-based truncation gives).
    topk(indices)    -> (values (B, k) float32 largest first, classes (B, k) int64, logsumexp (B,) float32 of
                        the full logits at T = 1; see distill.signals.cache_format for what it makes exact).
    features(indices)-> {layer: (B, *shape) float32} for the teacher layers stored with the cache.
    batch(indices)   -> (logits, extras): what CachedDataset hands the training loop per batch.
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
        self.feature_layers: list[str] = list(field(manifest, "features"))
        self.feature_shapes = {name: tuple(shape) for name, shape in zip(self.feature_layers, manifest.get("feature_shapes") or [])}
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
                if i not in self._verified and file_sha256(p) != f["sha256"]:
                    raise UserError(damaged.format("its sha256 differs from the manifest"))
                try:
                    arr = np.load(p, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError) as e:
                    raise UserError(damaged.format(f"not a readable .npy file: {e}")) from None
                dt, shape = layout(self.manifest, kind, shard["rows"])
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
        idx = idx.astype(np.int64, copy=False)
        if idx.size:
            low, high = idx.min(), idx.max()
            if low < 0 or high >= self.n_rows:
                raise IndexError(f"cache row indices must be in 0..{self.n_rows - 1}, got {low}..{high}")
        return idx

    def _gather(self, kind: str, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of one kind of file, across shards, in the order asked."""
        if len(self._starts) == 1:  # one shard (up to 65,536 rows by default): no routing, read on every batch
            return self._shard(0)[kind][idx]
        dt, shape = layout(self.manifest, kind, len(idx))
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
        return self._in_minus_inf_rows(values, classes)

    def _in_minus_inf_rows(self, values: Tensor, classes: Tensor) -> Tensor:
        """Top-k logits scattered into rows of -inf: their softmax is the teacher renormalised on its top k."""
        return torch.full((len(values), self.num_classes), float("-inf")).scatter_(1, classes, values)

    def features(self, indices, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The stored outputs of the teacher layers (all stored ones by default) for these rows, as float32."""
        idx = self._rows(indices)
        layers = self.feature_layers if layers is None else list(layers)
        missing = [name for name in layers if name not in self.feature_layers]
        if missing:
            raise UserError(_no_features(self.path, missing, self.feature_layers))
        return {name: torch.from_numpy(self._gather(f"feature{self.feature_layers.index(name)}", idx)).float()
                for name in layers}

    def batch(self, indices) -> tuple[Tensor, dict]:
        """(logits, extras) for these rows: extras holds "logsumexp" (a top-k cache's full-logit logsumexp, for
        the exact rest bucket at T = 1) and "features" (the stored layers), each only when the cache has them."""
        extras: dict = {}
        if self.top_k is None:
            logits = self.logits(indices)
        else:
            values, classes, extras["logsumexp"] = self.topk(indices)
            logits = self._in_minus_inf_rows(values, classes)
        if self.feature_layers:
            extras["features"] = self.features(indices)
        return logits, extras


def _no_features(path, missing: list[str], stored: list[str]) -> str:
    have = f"it stores {', '.join(map(repr, stored))}" if stored else "it stores no teacher features"
    return (f"the teacher cache {path} has no outputs of teacher layer(s) {', '.join(map(repr, missing))} ({have}): "
            f"write the cache with --features {' '.join(missing)}, or use the live teacher")


# ----------------------------------------------------------------------------- training on a cache


class CachedDataset(Dataset):
    """A dataset whose items carry the cached teacher outputs: (x, y, teacher_logits, extras) with extras as in
    TeacherCache.batch, for one row or, from __getitems__, for a whole batch (the training loop gathers batches
    with it; see distill.train.make_loader). Refuses a cache written for other data."""

    def __init__(self, dataset, cache: TeacherCache):
        counts = row_counts(dataset)
        n = int(counts.sum())
        if n != cache.n_rows or dataset_sha256(dataset) != cache.manifest["dataset_sha256"]:
            raise UserError(f"the cache {cache.path} was written for other data ({cache.n_rows} rows; this dataset has {n} "
                            "rows or other contents): use the cache of this dataset and split")
        self.dataset, self.cache = dataset, cache
        self.tensors = isinstance(getattr(dataset, "x", None), Tensor)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # example i owns rows offsets[i]..offsets[i+1]-1

    @property
    def x(self) -> Tensor:
        return self.dataset.x

    @property
    def y(self) -> Tensor:
        return self.dataset.y

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self):
        """The wrapped dataset's `lengths` (text: batches grouped by length as without the cache), or None."""
        return getattr(self.dataset, "lengths", None)

    def __getitem__(self, i):
        i = range(len(self))[i]  # negative indices and bounds as for a list
        if not self.tensors:
            return self.__getitems__([i])
        logits, extras = self.cache.batch([i])
        return self.dataset.x[i], self.dataset.y[i], logits[0], _row(extras)

    def __getitems__(self, indices):
        if not self.tensors:  # text: the collated batch, and the cached rows of its examples (words, for a tagger)
            inputs, y = self.dataset.__getitems__(indices)
            rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices])
            return (inputs, y, *self.cache.batch(rows))
        idx = torch.as_tensor(indices, dtype=torch.long)
        return (self.dataset.x[idx], self.dataset.y[idx], *self.cache.batch(idx))


def _row(extras: dict) -> dict:
    return {k: _row(v) if isinstance(v, dict) else v[0] for k, v in extras.items()}


class CachedTeacher:
    """A teacher signal (like LiveTeacher) that answers with cached outputs handed to it per batch.

    The training loop calls feed(teacher_logits, inputs=x, **extras) before the method runs on a batch; the
    method then calls teacher(x) and gets those logits, teacher.features(x, layers) the cached layer outputs,
    and teacher.logsumexp(x) a top-k cache's full-logit logsumexp. `model` is None: there is no teacher network
    in memory, so methods that need one (input gradients, layers not in the cache) refuse with one line.
    """

    model = None

    def __init__(self):
        self._logits: Tensor | None = None
        self._inputs: Tensor | None = None
        self._logsumexp: Tensor | None = None
        self._features: dict[str, Tensor] = {}
        self._unchecked = False  # outputs fed but not yet checked for NaN / inf

    def feed(self, teacher_logits: Tensor, inputs: Tensor | None = None, *, logsumexp: Tensor | None = None,
             features: dict[str, Tensor] | None = None) -> None:
        """Outputs for the next batch. With `inputs`, only that very tensor may be asked for (not a perturbed copy)."""
        if not isinstance(teacher_logits, Tensor) or teacher_logits.dim() != 2:
            got = tuple(teacher_logits.shape) if isinstance(teacher_logits, Tensor) else type(teacher_logits).__name__
            raise UserError(f"CachedTeacher.feed needs (batch, classes) logits, got {got}")
        rows = teacher_logits.shape[0]
        for name, t in {"logsumexp": logsumexp, **(features or {})}.items():
            if t is not None and (not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != rows):
                raise UserError(f"CachedTeacher.feed: {name!r} must be a tensor with one row per logits row ({rows})")
        self._logits, self._inputs = teacher_logits, inputs
        self._logsumexp, self._features = logsumexp, dict(features or {})
        self._unchecked = True  # checked when first asked for, in the training step (which names step and batch)

    def __call__(self, x: Tensor) -> Tensor:
        self._check_asked(x)
        return self._logits

    def logsumexp(self, x: Tensor) -> Tensor | None:
        """logsumexp of the teacher's full logits at T = 1 for a top-k cache (whose logits are -inf outside the
        top k); None when the cache holds full logits."""
        self._check_asked(x)
        return self._logsumexp

    def features(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """The cached outputs of these teacher layers for the batch fed."""
        self._check_asked(x)
        missing = [name for name in layers if name not in self._features]
        if missing:
            raise UserError(_no_features("teacher.cache", missing, list(self._features)))
        return {name: self._features[name] for name in layers}

    def _check_asked(self, x: Tensor) -> None:
        if self._logits is None:
            raise UserError("CachedTeacher was called before any logits were fed: train on CachedDataset(data, cache) "
                            "so each batch brings its teacher logits")
        if self._inputs is not None and x is not self._inputs:
            raise UserError("CachedTeacher was asked about inputs other than the batch it was fed: cached outputs exist "
                            "only for the dataset's rows; a method that changes its inputs needs the live teacher")
        if isinstance(x, Tensor) and self._logits.shape[0] != len(x):
            raise UserError(f"CachedTeacher holds logits for {self._logits.shape[0]} rows but was asked about {len(x)}: "
                            "feed the logits of this very batch")
        if self._unchecked:
            self._check_finite()
            self._unchecked = False

    def _check_finite(self) -> None:
        """NonFiniteError when the outputs fed hold NaN or inf (a top-k cache's logits are -inf outside its top k)."""
        fix = ("write the teacher cache again (distill cache) from a teacher with finite outputs, or use the live "
               "teacher")
        require_finite(self._logits, "the cached teacher logits", fix, rows=True)
        if self._logsumexp is not None:
            require_finite(self._logsumexp, "the cached teacher logsumexp", fix)
        for name, t in self._features.items():
            require_finite(t, f"the cached teacher outputs of layer {name!r}", fix)
