"""Tests for distill.data: digits, MNIST/Fashion-MNIST IDX files, tables, image folders, ArrayDataset."""

from __future__ import annotations

import gzip
import io
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from distill.data import DATASETS, ArrayDataset, DataSplits, load_dataset, resolve_data_dir
from distill.data import idx as idx_mod
from distill.data.arrays import batch_collate, gather
from distill.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared(name: str) -> Path:
    folder = SHARED_DATA / name
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real {name} files not present in {folder}")
    return folder


# ---------------------------------------------------------------- digits

def test_digits_shapes_dtype_range_and_sizes():
    s = load_dataset("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert isinstance(s, DataSplits)
    assert s.name == "digits" and s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert s.class_names == [str(i) for i in range(10)]
    total = len(s.train) + len(s.val) + len(s.test)
    assert total == 1797
    assert len(s.test) == round(0.2 * 1797) and len(s.val) == round(0.1 * 1797)
    for ds in (s.train, s.val, s.test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8)
        assert ds.x.min() >= 0 and ds.x.max() <= 1
        assert set(ds.y.tolist()) == set(range(10))  # every class in every split
    assert s.train.x.max() == 1.0  # 16/16 occurs


def test_digits_seeded_and_stratified():
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.test.x, c.test.x)
    full = np.bincount(np.concatenate([a.train.y, a.val.y, a.test.y]), minlength=10) / 1797
    for ds in (a.train, a.val, a.test):
        frac = np.bincount(ds.y.numpy(), minlength=10) / len(ds)
        assert np.abs(frac - full).max() < 0.02


def test_unlabelled_fraction_only_hides_train_labels_stratified():
    s = load_dataset("digits", unlabelled_fraction=0.5, seed=1)
    hidden = s.train.y == -1
    assert abs(hidden.float().mean().item() - 0.5) < 0.01
    assert (s.val.y >= 0).all() and (s.test.y >= 0).all()
    kept = np.bincount(s.train.y[~hidden].numpy(), minlength=10)
    assert kept.min() > 0 and kept.max() - kept.min() < 10  # stratified: each class roughly halved
    plain = load_dataset("digits", seed=1)
    assert torch.equal(plain.train.x, s.train.x)  # hiding labels does not move rows


@pytest.mark.parametrize("kwargs, word", [
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"test_fraction": -0.1}, "test_fraction"),
    ({"unlabelled_fraction": 1.0}, "unlabelled_fraction"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction + test_fraction"),
])
def test_bad_fractions(kwargs, word):
    with pytest.raises(UserError, match=word.replace("+", r"\+")):
        load_dataset("digits", **kwargs)


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError) as e:
        load_dataset("cifar10")
    for name in DATASETS:
        assert name in str(e.value)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "x")) == tmp_path / "x"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("DISTILL_DATA_DIR")
    assert resolve_data_dir(None) == Path("~/.cache/distill/data").expanduser()


# ---------------------------------------------------------------- MNIST / Fashion-MNIST

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_idx_files(name):
    _shared(name)
    s = load_dataset(name, data_dir=str(SHARED_DATA), val_fraction=0.1, download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10 and len(s.class_names) == 10
    for ds in (s.train, s.val, s.test):
        assert ds.x.dtype == torch.float32 and ds.x.shape[1:] == (1, 28, 28)
        assert set(ds.y.unique().tolist()) == set(range(10))
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    # val is stratified: its class counts are 1/9 of train's, to within rounding
    ratio = np.bincount(s.val.y.numpy()) / np.bincount(s.train.y.numpy())
    assert np.abs(ratio - 1 / 9).max() < 0.002


def test_real_mnist_via_path_and_env(monkeypatch):
    folder = _shared("mnist")
    # path pointing at the folder itself, and DISTILL_DATA_DIR pointing at its parent, both work
    a = load_dataset("mnist", path=str(folder), download=False, val_fraction=0.0)
    assert (len(a.train), len(a.val), len(a.test)) == (60000, 0, 10000)
    monkeypatch.setenv("DISTILL_DATA_DIR", str(SHARED_DATA))
    b = load_dataset("mnist", download=False, val_fraction=0.0)
    assert torch.equal(a.test.y, b.test.y)


def _fake_idx(n: int = 20, seed: int = 0) -> dict[str, bytes]:
    """Small valid IDX files (decompressed bytes) for all four MNIST names."""
    rng = np.random.default_rng(seed)

    def images(k):
        return bytes([0, 0, 8, 3]) + np.array([k, 28, 28], ">u4").tobytes() + \
            rng.integers(0, 256, (k, 28, 28), dtype=np.uint8).tobytes()

    def labels(k):
        return bytes([0, 0, 8, 1]) + np.array([k], ">u4").tobytes() + (np.arange(k) % 10).astype(np.uint8).tobytes()

    return {"train-images-idx3-ubyte": images(n), "train-labels-idx1-ubyte": labels(n),
            "t10k-images-idx3-ubyte": images(10), "t10k-labels-idx1-ubyte": labels(10)}


def test_corrupted_idx_copy_fails_sha256(tmp_path):
    src = _shared("mnist")
    dst = tmp_path / "mnist"
    dst.mkdir()
    for f in idx_mod.FILES:
        data = gzip.decompress((src / (f + ".gz")).read_bytes())
        if f == "t10k-labels-idx1-ubyte":
            data = bytearray(data)
            data[100] ^= 0x01  # flip a bit of one label in the payload
            data = bytes(data)
        (dst / (f + ".gz")).write_bytes(gzip.compress(data, compresslevel=1))
    with pytest.raises(UserError, match="sha256") as e:
        load_dataset("mnist", data_dir=str(tmp_path), download=False)
    assert "t10k-labels" in str(e.value)


def test_idx_checksum_on_decompressed_bytes(tmp_path, monkeypatch):
    # Same payload gzipped differently still verifies; checksum table patched for tiny fake files.
    files = _fake_idx()
    monkeypatch.setitem(idx_mod.SHA256, "mnist", {f: idx_mod.hashlib.sha256(d).hexdigest() for f, d in files.items()})
    for f, d in files.items():
        (tmp_path / (f + ".gz")).write_bytes(gzip.compress(d, compresslevel=9 if "train" in f else 1, mtime=1))
    s = load_dataset("mnist", path=str(tmp_path), download=False, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 10)


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(UserError, match="DISTILL_DATA_DIR") as e:
        load_dataset("mnist", data_dir=str(tmp_path / "nowhere"), download=False)
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    with pytest.raises(UserError, match="Fashion-MNIST"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"), download=False)


def test_malformed_idx_headers():
    good = _fake_idx(3)["train-images-idx3-ubyte"]
    assert idx_mod.parse_idx(good).shape == (3, 28, 28)
    with pytest.raises(UserError, match="magic"):
        idx_mod.parse_idx(b"\x01\x00\x08\x03" + good[4:], "f")
    with pytest.raises(UserError, match="needs"):
        idx_mod.parse_idx(good[:-1], "f")
    with pytest.raises(UserError, match="truncated"):
        idx_mod.parse_idx(good[:9], "f")
    with pytest.raises(UserError, match="type code"):
        idx_mod.parse_idx(b"\x00\x00\x42\x01" + good[4:], "f")


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_offline_with_fake_mirror(tmp_path, monkeypatch):
    files = _fake_idx()
    monkeypatch.setitem(idx_mod.SHA256, "fashion-mnist",
                        {f: idx_mod.hashlib.sha256(d).hexdigest() for f, d in files.items()})
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        assert timeout <= 60
        return _FakeResponse(gzip.compress(files[url.rsplit("/", 1)[1][:-3]]))

    monkeypatch.setattr(idx_mod, "urlopen", fake_urlopen)
    s = load_dataset("fashion-mnist", data_dir=str(tmp_path), val_fraction=0.1)
    assert len(urls) == 4 and all(u.startswith(idx_mod.MIRRORS["fashion-mnist"][0]) for u in urls)
    assert sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir()) == sorted(f + ".gz" for f in files)
    assert len(s.test) == 10 and s.class_names[0] == "T-shirt/top"


def test_download_network_failure_says_where(tmp_path, monkeypatch):
    def fail(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(idx_mod, "urlopen", fail)
    with pytest.raises(UserError, match="no route to host") as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert str(tmp_path / "mnist") in str(e.value) and "train-labels-idx1-ubyte.gz" in str(e.value)
    assert not any((tmp_path / "mnist").iterdir())  # no partial files left


def test_download_bad_checksum_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "urlopen", lambda url, timeout: _FakeResponse(gzip.compress(b"junk")))
    with pytest.raises(UserError, match="wrong sha256"):
        load_dataset("mnist", data_dir=str(tmp_path))
    assert not any((tmp_path / "mnist").iterdir())


# ---------------------------------------------------------------- tables

def _iris_frame() -> pd.DataFrame:
    from sklearn.datasets import load_iris
    iris = load_iris()
    df = pd.DataFrame(iris.data, columns=["sl", "sw", "pl", "pw"])
    df["species"] = np.array(["setosa", "versicolor", "virginica"])[iris.target]
    df.loc[[0, 60, 120, 121], "species"] = None  # four rows without a label
    return df


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_loading(tmp_path, suffix):
    df = _iris_frame()
    p = tmp_path / ("iris" + suffix)
    df.to_csv(p, index=False) if suffix == ".csv" else df.to_parquet(p, index=False)
    s = load_dataset("table", path=str(p), label_column="species", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert s.class_names == ["setosa", "versicolor", "virginica"] and s.num_classes == 3
    assert s.input_shape == (4,) and s.train.x.dtype == torch.float32
    assert len(s.train) + len(s.val) + len(s.test) == 150
    assert len(s.test) == round(0.2 * 146) and len(s.val) == round(0.1 * 146)
    assert int((s.train.y == -1).sum()) == 4
    assert (s.val.y >= 0).all() and (s.test.y >= 0).all()
    assert torch.allclose(s.train.x.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(s.train.x.std(0, unbiased=False), torch.ones(4), atol=1e-4)
    # class mapping: setosa has the smallest petal length, so class 0 has the lowest mean "pl"
    xs = torch.cat([s.train.x, s.val.x, s.test.x])
    ys = torch.cat([s.train.y, s.val.y, s.test.y])
    means = [xs[ys == k, 2].mean().item() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_table_feature_columns_and_numeric_labels(tmp_path):
    p = tmp_path / "t.csv"
    pd.DataFrame({"a": [1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10], "b": [5] * 10, "txt": list("abcdefghij"),
                  "label": [2, 1, 2, 1, 2, 1, 2, 1, None, 2]}).to_csv(p, index=False)
    s = load_dataset("table", path=str(p), feature_columns=["a", "b"], val_fraction=0.0, test_fraction=0.2)
    assert s.class_names == ["1", "2"] and s.input_shape == (2,)
    assert torch.all(s.train.x[:, 1] == 0)  # constant column: std 0 -> 1, stays finite
    with pytest.raises(UserError, match="'txt'"):
        load_dataset("table", path=str(p))  # txt is a feature by default and not numeric


def test_table_errors(tmp_path):
    p = tmp_path / "t.csv"
    pd.DataFrame({"x1": [1.0, 2.0, None, 4.0], "x2": [1, 2, 3, 4], "y": ["a", "b", "a", "b"]}).to_csv(p, index=False)
    with pytest.raises(UserError) as e:
        load_dataset("table", path=str(p))  # default label column "label" missing
    assert "'label'" in str(e.value) and "x1, x2, y" in str(e.value)
    with pytest.raises(UserError, match="'x1'.*missing"):
        load_dataset("table", path=str(p), label_column="y")
    with pytest.raises(UserError, match="'nope'"):
        load_dataset("table", path=str(p), label_column="y", feature_columns=["nope"])
    txt = tmp_path / "t.txt"
    txt.write_text("x,label\n1,a\n")
    with pytest.raises(UserError, match=r"\.csv or \.parquet"):
        load_dataset("table", path=str(txt))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("table", path=str(tmp_path / "absent.csv"))
    with pytest.raises(UserError, match="needs a path"):
        load_dataset("table")


# ---------------------------------------------------------------- image folders

COLOURS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (255, 0, 0)}


def _image_folder(root: Path, n: int = 10) -> Path:
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            ext = ".png" if i % 2 else ".PNG"
            Image.new("RGB", (7, 5), rgb).save(root / name / f"{i}{ext}", format="PNG")
    (root / "red" / "notes.txt").write_text("not an image")  # ignored
    return root


def test_image_folder_rgb_and_grayscale(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    s = load_dataset("image-folder", path=str(root), image_size=(6, 4), grayscale=False,
                     val_fraction=0.2, test_fraction=0.2, seed=0)
    assert s.class_names == ["blue", "green", "red"] and s.num_classes == 3
    assert s.input_shape == (3, 6, 4) and s.train.x.shape[1:] == (3, 6, 4)
    assert len(s.train) + len(s.val) + len(s.test) == 30 and len(s.test) == 6 and len(s.val) == 6
    for ds in (s.train, s.val, s.test):
        assert set(ds.y.tolist()) == {0, 1, 2}
        for k, rgb in enumerate(COLOURS.values()):
            expected = torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 6, 4)
            assert torch.allclose(ds.x[ds.y == k], expected.expand_as(ds.x[ds.y == k]), atol=1e-6)

    g = load_dataset("image-folder", path=str(root), image_size=(8, 8), grayscale=True)
    assert g.input_shape == (1, 8, 8)
    red = g.train.x[g.train.y == 2]
    # Pillow's L = 0.299 R + 0.587 G + 0.114 B
    assert torch.allclose(red, torch.full_like(red, round(0.299 * 255) / 255), atol=1.5 / 255)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("image-folder", path=str(tmp_path / "none"))
    root = _image_folder(tmp_path / "imgs", n=3)
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        load_dataset("image-folder", path=str(root))
    (root / "empty").rmdir()
    (root / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset("image-folder", path=str(root))
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    with pytest.raises(UserError, match="at least 2"):
        load_dataset("image-folder", path=str(one))
    with pytest.raises(UserError, match="image_size"):
        load_dataset("image-folder", path=str(root), image_size=(0, 5))


# ---------------------------------------------------------------- ArrayDataset

def test_array_dataset_getitems_matches_getitem():
    x = torch.randn(12, 1, 3, 3)
    y = torch.arange(12) % 4
    ds = ArrayDataset(x, y)
    assert len(ds) == 12
    idx = [5, 0, 11, 5, 2]
    bx, by = gather(ds, idx)
    assert torch.equal(bx, torch.stack([ds[i][0] for i in idx]))
    assert torch.equal(by, torch.stack([ds[i][1] for i in idx]))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False, collate_fn=batch_collate)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)


def test_load_dataset_rows_work_with_a_plain_dataloader():
    """A user's `DataLoader(ds, batch_size=128)` with PyTorch's default collate: the batches are (x, y) as stacked
    by distill's own loader (it used to fail: default collate tried to stack x with y)."""
    ds = load_dataset("digits").train
    plain = list(torch.utils.data.DataLoader(ds, batch_size=128))
    assert [tuple(b[0].shape) for b in plain[:1]] == [(128, *ds.x.shape[1:])]
    assert torch.equal(torch.cat([b[0] for b in plain]), ds.x) and torch.equal(torch.cat([b[1] for b in plain]), ds.y)
    shuffled = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    x, y = next(iter(shuffled))
    assert x.shape[0] == 64 and y.dtype == torch.long
