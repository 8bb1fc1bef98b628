"""MNIST and Fashion-MNIST from the four gzip'd IDX files: local folder, sha256 check, optional download.

Files are looked for in ``<dir>/<name>/`` then ``<dir>``; an uncompressed copy (no ``.gz``) is accepted
too. The sha256 is checked on the decompressed bytes, because gzip output differs between compressors.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import torch

from distill.data.arrays import ArrayDataset, DataSplits, _count, hide_labels, split_off
from distill.errors import UserError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

SHA256 = {
    "mnist": {
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    "fashion-mnist": {
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
}

MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

DISPLAY = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}

DOWNLOAD_TIMEOUT = 30  # seconds per connection attempt / read

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes (big-endian header: 0, 0, dtype code, ndim, then ndim uint32 sizes) into an array."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UserError(f"{source} is not an IDX file (bad magic number): replace it with the original file.")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise UserError(f"{source} has an unknown IDX type code 0x{code:02x} or 0 dimensions: "
                        "replace it with the original file.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{source} is truncated inside its IDX header: replace it with the original file.")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{source} holds {len(data) - header} data bytes but its IDX header {dims} needs "
                        f"{expected}: replace it with the original file.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _candidate_dirs(base: Path, name: str) -> list[Path]:
    return [base / name, base]


def _find(folder: Path, fname: str) -> Path | None:
    for p in (folder / (fname + ".gz"), folder / fname):
        if p.is_file():
            return p
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read {path} ({e.strerror or e}): check the file's permissions.") from None
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path} is not a valid gzip file ({e}): delete it and download it again.") from None
    return raw


def _check_sha(data: bytes, expected: str, path: Path) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise UserError(f"{path} has the wrong sha256 (decompressed {got[:12]}..., expected {expected[:12]}...): "
                        "the file is corrupt or not the original; delete it and download it again.")


def _not_found_message(name: str, base: Path, explicit_path: bool, detail: str = "",
                       last: str = "or allow downloading") -> str:
    where = " or ".join(str(d) for d in _candidate_dirs(base, name))
    files = ", ".join(f + ".gz" for f in FILES)
    how = "point path at" if explicit_path else "set DISTILL_DATA_DIR or --data-dir to"
    return (f"{DISPLAY[name]} not found in {where}{detail}: {how} a folder holding {files} "
            f"(directly or in a {name}/ sub-folder), {last}.")


def _download(name: str, fname: str, folder: Path, base: Path, explicit_path: bool) -> Path:
    """Download ``fname.gz`` into ``folder`` atomically, verifying the decompressed sha256 first."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create {folder} to download {DISPLAY[name]} into ({e.strerror or e}): "
                        "set DISTILL_DATA_DIR or --data-dir to a writable folder.") from None
    target = folder / (fname + ".gz")
    errors = []
    for mirror in MIRRORS[name]:
        url = mirror + fname + ".gz"
        tmp_name = None
        try:
            with urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp:
                payload = resp.read()
            try:
                data = gzip.decompress(payload)
            except (OSError, EOFError, zlib.error):
                errors.append(f"{url}: not a gzip file")
                continue
            if hashlib.sha256(data).hexdigest() != SHA256[name][fname]:
                errors.append(f"{url}: wrong sha256")
                continue
            fd, tmp_name = tempfile.mkstemp(prefix=fname, suffix=".part", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp_name, target)
            tmp_name = None
            return target
        except Exception as e:  # network, HTTP, timeout or disk errors: try the next mirror
            errors.append(f"{url}: {e}")
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
    detail = f" and downloading {fname}.gz failed ({'; '.join(errors)})"
    raise UserError(_not_found_message(name, base, explicit_path, detail,
                                       last="or retry when the network is reachable"))


def load_idx_dataset(name: str, *, base: Path, explicit_path: bool, val_fraction: float,
                     unlabelled_fraction: float, seed: int, download: bool) -> DataSplits:
    """MNIST-style splits: stratified seeded val from the official train set; official test set untouched."""
    dirs = _candidate_dirs(base, name)
    # The folder to use: the first holding all four files, else the first holding some, else <base>/<name>.
    found = {d: {f: _find(d, f) for f in FILES} for d in dirs}
    complete = [d for d in dirs if all(found[d].values())]
    partial = [d for d in dirs if any(found[d].values())]
    folder = complete[0] if complete else partial[0] if partial else dirs[0]
    paths = dict(found[folder])
    missing = [f for f, p in paths.items() if p is None]
    if missing:
        if not download:
            detail = f" ({folder} lacks {', '.join(m + '.gz' for m in missing)})" if partial else ""
            raise UserError(_not_found_message(name, base, explicit_path, detail))
        for f in missing:
            paths[f] = _download(name, f, folder, base, explicit_path)

    arrays = {}
    for f in FILES:
        data = _read_bytes(paths[f])
        _check_sha(data, SHA256[name][f], paths[f])
        arrays[f] = parse_idx(data, str(paths[f]))

    def images(f: str) -> np.ndarray:
        a = arrays[f]
        if a.ndim != 3 or a.dtype != np.uint8:
            raise UserError(f"{paths[f]} is not an IDX image file (N, H, W) of bytes: replace it with the original.")
        return a

    def labels(f: str, n: int) -> np.ndarray:
        a = arrays[f]
        if a.ndim != 1 or len(a) != n or (a.size and a.max() > 9):
            raise UserError(f"{paths[f]} is not an IDX label file with {n} labels 0..9: replace it with the original.")
        return a.astype(np.int64)

    def dataset(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        # Index the uint8 array first (fancy indexing copies), then convert: keeps peak memory low.
        xt = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1).to(torch.float32).div_(255.0)
        return ArrayDataset(xt, torch.from_numpy(np.ascontiguousarray(y)))

    x_train = images("train-images-idx3-ubyte")
    y_train = labels("train-labels-idx1-ubyte", len(x_train))
    x_test = images("t10k-images-idx3-ubyte")
    y_test = labels("t10k-labels-idx1-ubyte", len(x_test))

    n_train = len(x_train)
    train_idx, val_idx = split_off(np.arange(n_train, dtype=np.int64), y_train,
                                   _count(val_fraction, n_train), seed)
    train = dataset(x_train[train_idx], y_train[train_idx])
    train.y = hide_labels(train.y, unlabelled_fraction, seed)
    val = dataset(x_train[val_idx], y_train[val_idx])
    test = dataset(x_test.copy(), y_test)  # the official test set, untouched
    return DataSplits(name=name, train=train, val=val, test=test, num_classes=10,
                      input_shape=(1, *x_train.shape[1:]), class_names=list(CLASS_NAMES[name]))
