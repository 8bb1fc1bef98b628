"""Teacher-output cache: what is stored equals the teacher, resumes after a kill, refuses what does not match,
and trains the same student as the live teacher."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_recipe
from torch import nn

from distill.checkpoint import save_model
from distill.cli import main
from distill.data import ArrayDataset
from distill.durable import checked_json
from distill.errors import UserError
from distill.features import capture
from distill.losses.topk import topk_kd_loss, topk_kd_loss_from_indices
from distill.methods.attention import Attention, AttentionConfig
from distill.methods.hints import Hints, HintsConfig
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.methods.topk import TopK, TopKConfig
from distill.recipe import TrainConfig, load_recipe
from distill.tasks.classification import load_data, load_teacher, model_record
from distill.signals import LiveTeacher
from distill.signals import CachedDataset, CachedTeacher, open_cache, write_cache
from distill.signals.cache_format import index_dtype, teacher_sha256
from distill.students import CNNConfig, MLPConfig, build_model
from distill.train import fit


class _Teacher(nn.Module):
    """A small MLP that counts the rows it sees and can fail on its n-th call (a killed write)."""

    def __init__(self, d=6, c=10, seed=0, scale=1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c))
        self.scale = scale
        self.rows_seen, self.calls, self.fail_on_call = 0, 0, None

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        self.rows_seen += len(x)
        return self.net(x) * self.scale


def _data(n=200, d=6, c=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, d, generator=g) * 2, torch.randint(0, c, (n,), generator=g))


def _chunked(teacher, x, shard_rows, batch_size):
    """The teacher's logits computed over the same batches as the writer (batches never cross shards)."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), shard_rows):
            end = min(s + shard_rows, len(x))
            out += [teacher(x[a:min(a + batch_size, end)]) for a in range(s, end, batch_size)]
    return torch.cat(out)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_line_error(fn, *match):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in match), msg
    return msg


# ----------------------------------------------------------------------------- what is stored


def test_full_logits_round_trip_exact_in_fp32_and_rounded_in_fp16(tmp_path):
    teacher, data = _Teacher(scale=30.0), _data(n=300)
    ref = _chunked(teacher, data.x, 128, 50)
    assert torch.allclose(ref, teacher(data.x).detach(), atol=1e-4)  # the chunking is only a rounding matter
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))  # rows across all three shards
    write_cache(teacher, data, tmp_path / "f32", dtype="float32", shard_rows=128, batch_size=50)
    exact = open_cache(tmp_path / "f32", teacher=teacher, dataset=data)
    assert exact.top_k is None and exact.num_classes == 10 and len(exact.manifest["shards"]) == 3
    assert torch.equal(exact.logits(range(300)), ref)
    assert torch.equal(exact.logits(order), ref[order])
    write_cache(teacher, data, tmp_path / "f16", shard_rows=128, batch_size=50)  # default dtype float16
    half = open_cache(tmp_path / "f16").logits(order)
    assert torch.equal(half, ref[order].half().float())
    # float16 keeps 11 significant bits: rounding to nearest is within 2^-11 relative
    assert bool(((half - ref[order]).abs() <= ref[order].abs() * 2.0**-11).all())
    assert not bool(torch.equal(half, ref[order]))


def test_topk_values_classes_and_logsumexp_equal_torch_topk(tmp_path):
    teacher, data = _Teacher(c=50), _data(n=150, c=50)
    ref = _chunked(teacher, data.x, 64, 1024)
    write_cache(teacher, data, tmp_path / "c", top_k=5, dtype="float32", shard_rows=64)
    cache = open_cache(tmp_path / "c")
    values, classes, lse = cache.topk(range(150))
    want_v, want_i = ref.topk(5, dim=-1)
    assert torch.equal(values, want_v) and torch.equal(classes, want_i) and classes.dtype == torch.int64
    t = ref.double().numpy()
    np.testing.assert_allclose(lse.numpy(), np.log(np.exp(t - t.max(1, keepdims=True)).sum(1)) + t.max(1), rtol=1e-6)
    assert np.load(tmp_path / "c" / "shard-00000.indices.npy").dtype == np.uint8
    # a smaller k from the same cache: the first columns, as torch.topk would give
    v3, i3, _ = open_cache(tmp_path / "c", top_k=3).topk([7, 3])
    assert torch.equal(v3, ref[[7, 3]].topk(3).values) and torch.equal(i3, ref[[7, 3]].topk(3).indices)
    _one_line_error(lambda: open_cache(tmp_path / "c", top_k=6), "top 5", "--top-k 6")
    # float16 values are the rounded float32 ones; the logsumexp stays that of the float32 logits
    write_cache(teacher, data, tmp_path / "h", top_k=5, shard_rows=64)
    hv, hi, hl = open_cache(tmp_path / "h").topk(range(150))
    assert torch.equal(hv, want_v.half().float()) and torch.equal(hi, want_i) and torch.equal(hl, lse)


@pytest.mark.parametrize("classes, dtype", [(2, np.uint8), (10, np.uint8), (256, np.uint8), (257, np.int16),
                                            (32000, np.int16), (32768, np.int16), (32769, np.int32), (40000, np.int32)])
def test_index_dtype_is_the_smallest_that_holds_the_largest_class(classes, dtype):
    assert index_dtype(classes) == np.dtype(dtype)
    assert np.array([classes - 1]).astype(index_dtype(classes))[0] == classes - 1  # no wrap-around


def test_indices_above_255_survive_int16_storage(tmp_path):
    teacher, data = _Teacher(c=300), _data(n=40, c=300)
    write_cache(teacher, data, tmp_path / "c", top_k=4, dtype="float32")
    assert np.load(tmp_path / "c" / "shard-00000.indices.npy").dtype == np.int16
    _, classes, _ = open_cache(tmp_path / "c").topk(range(40))
    assert torch.equal(classes, _chunked(teacher, data.x, 65536, 1024).topk(4).indices) and int(classes.max()) > 255


def test_minus_inf_form_softmax_is_the_renormalised_topk_distribution(tmp_path):
    teacher, data = _Teacher(c=12), _data(n=30, c=12)
    write_cache(teacher, data, tmp_path / "c", top_k=4, dtype="float32")
    got = torch.softmax(open_cache(tmp_path / "c").logits(range(30)), dim=-1).numpy()
    t = _chunked(teacher, data.x, 65536, 1024).double().numpy()  # independent: float64 numpy
    p = np.exp(t - t.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    keep = np.zeros_like(p, dtype=bool)
    np.put_along_axis(keep, np.argsort(-t, axis=1)[:, :4], True, axis=1)
    want = np.where(keep, p, 0.0)
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert (got[~keep] == 0).all()


def test_logsumexp_makes_the_rest_bucket_exact_at_t1(tmp_path):
    teacher, data = _Teacher(c=20), _data(n=50, c=20)
    write_cache(teacher, data, tmp_path / "c", top_k=3, dtype="float32")
    values, classes, lse = open_cache(tmp_path / "c").topk(range(50))
    full = _chunked(teacher, data.x, 65536, 1024)
    t = full.double().numpy()
    p = np.exp(t - t.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    outside = p.sum(1) - np.take_along_axis(p, np.argsort(-t, axis=1)[:, :3], axis=1).sum(1)
    np.testing.assert_allclose(1 - torch.exp(values - lse[:, None]).sum(1).numpy(), outside, rtol=1e-4, atol=1e-7)
    student = torch.randn(50, 20, generator=torch.Generator().manual_seed(3))
    from_cache = topk_kd_loss_from_indices(student, values, classes, rest="bucket", teacher_logsumexp=lse)
    assert torch.allclose(from_cache, topk_kd_loss(student, full, 3, rest="bucket"), rtol=1e-5)


def test_features_round_trip_and_are_matched_by_layer(tmp_path):
    teacher, data = _Teacher(), _data(n=90)
    with torch.inference_mode(), capture(teacher, ["net.1"]) as feats:
        teacher(data.x)
    want = feats["net.1"]
    write_cache(teacher, data, tmp_path / "f32", dtype="float32", features=["net.1"], shard_rows=40, batch_size=25)
    cache = open_cache(tmp_path / "f32")
    assert cache.feature_layers == ["net.1"] and cache.feature_shapes == {"net.1": (16,)}
    order = [5, 88, 0, 41]
    assert torch.equal(cache.features(order)["net.1"], want[order])
    logits, extras = cache.batch(order)
    assert torch.equal(logits, cache.logits(order)) and list(extras) == ["features"]
    assert torch.equal(extras["features"]["net.1"], want[order])
    write_cache(teacher, data, tmp_path / "f16", features=["net.1"], shard_rows=40)
    assert torch.equal(open_cache(tmp_path / "f16").features(order)["net.1"], want[order].half().float())
    # asked for a layer it does not store; other layers on reuse; unknown and repeated layers
    _one_line_error(lambda: cache.features(order, ["net.0"]), "'net.0'", "--features net.0", "stores 'net.1'")
    _one_line_error(lambda: write_cache(teacher, data, tmp_path / "f32", dtype="float32", shard_rows=40, batch_size=25),
                    "feature layers=['net.1'] (now [])")
    _one_line_error(lambda: write_cache(teacher, data, tmp_path / "x", features=["net.9"]), "no layer named 'net.9'", "net.1")
    _one_line_error(lambda: write_cache(teacher, data, tmp_path / "x", features=["net.1", "net.1"]), "twice")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_a_killed_feature_write_resumes_to_the_same_files(tmp_path):
    data = _data(n=120)
    write_cache(_Teacher(), data, tmp_path / "whole", top_k=2, features=["net.1"], shard_rows=40, batch_size=20)
    teacher = _Teacher()
    teacher.fail_on_call = 4  # shard 0 is finished (calls 1-2), the kill comes in shard 1
    with pytest.raises(RuntimeError):
        write_cache(teacher, data, tmp_path / "c", top_k=2, features=["net.1"], shard_rows=40, batch_size=20)
    teacher.fail_on_call = None
    write_cache(teacher, data, tmp_path / "c", top_k=2, features=["net.1"], shard_rows=40, batch_size=20)
    assert _files(tmp_path / "c") == _files(tmp_path / "whole")


# ----------------------------------------------------------------------------- atomic, resumable


def test_killed_write_resumes_with_only_the_missing_shards_and_the_same_files(tmp_path):
    data = _data(n=200)
    whole = _Teacher()
    write_cache(whole, data, tmp_path / "whole", top_k=3, shard_rows=40, batch_size=20)
    teacher = _Teacher()
    teacher.fail_on_call = 5  # calls 1-4 make shards 0 and 1; the kill comes in shard 2
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="killed"):
        write_cache(teacher, data, out, top_k=3, shard_rows=40, batch_size=20)
    partial = tmp_path / "c.partial"
    assert not out.exists() and len(json.loads((partial / "manifest.json").read_text())["shards"]) == 2
    # what a hard kill could leave: a temp file and a moved-in shard the manifest never listed
    (partial / ".shard-00002.values.npy.tmp").write_bytes(b"half")
    shutil.copy(tmp_path / "whole" / "shard-00004.values.npy", partial / "shard-00002.values.npy")
    teacher.fail_on_call, teacher.rows_seen = None, 0
    manifest = write_cache(teacher, data, out, top_k=3, shard_rows=40, batch_size=20)
    assert teacher.rows_seen == 120 and manifest["stats"]["rows_computed"] == 120
    assert manifest["complete"] and not partial.exists()
    assert _files(out) == _files(tmp_path / "whole")  # manifest.json included
    # complete and matching: reused, nothing recomputed
    teacher.rows_seen = 0
    assert write_cache(teacher, data, out, top_k=3, shard_rows=40, batch_size=20)["stats"]["reused"]
    assert teacher.rows_seen == 0


def test_resume_recomputes_from_a_damaged_finished_shard(tmp_path):
    data, teacher = _data(n=200), _Teacher()
    teacher.fail_on_call = 7  # shards 0, 1, 2 finished
    with pytest.raises(RuntimeError):
        write_cache(teacher, data, tmp_path / "c", shard_rows=40, batch_size=20)
    shard = tmp_path / "c.partial" / "shard-00001.logits.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    teacher.fail_on_call, teacher.rows_seen = None, 0
    write_cache(teacher, data, tmp_path / "c", shard_rows=40, batch_size=20)
    assert teacher.rows_seen == 160  # shards 1..4; shard 0 kept
    write_cache(_Teacher(), data, tmp_path / "whole", shard_rows=40, batch_size=20)
    assert _files(tmp_path / "c") == _files(tmp_path / "whole")


def test_resume_refuses_other_settings_and_restart_starts_over(tmp_path):
    data, teacher = _data(n=100), _Teacher()
    teacher.fail_on_call = 2
    with pytest.raises(RuntimeError):
        write_cache(teacher, data, tmp_path / "c", top_k=3, shard_rows=20, batch_size=20)
    teacher.fail_on_call = None
    _one_line_error(lambda: write_cache(teacher, data, tmp_path / "c", top_k=4, shard_rows=20), "top_k=3", "--restart")
    _one_line_error(lambda: write_cache(_Teacher(seed=5), data, tmp_path / "c", top_k=3), "another teacher")
    teacher.rows_seen = 0
    write_cache(teacher, data, tmp_path / "c", top_k=4, shard_rows=20, resume=False)
    assert teacher.rows_seen == 100 and open_cache(tmp_path / "c").top_k == 4


def test_partial_debris_is_never_taken_for_a_cache(tmp_path):
    data, teacher = _data(n=60), _Teacher()
    teacher.fail_on_call = 2
    with pytest.raises(RuntimeError):
        write_cache(teacher, data, tmp_path / "c", shard_rows=20, batch_size=20)
    _one_line_error(lambda: open_cache(tmp_path / "c"), "half-written", "rerun `distill cache`")
    _one_line_error(lambda: open_cache(tmp_path / "c.partial"), "half-written")
    # killed between the last manifest write and the rename: complete inside, still not a cache by its name
    teacher.fail_on_call = None
    write_cache(teacher, data, tmp_path / "done", shard_rows=20, batch_size=20)
    (tmp_path / "done").rename(tmp_path / "late.partial")
    _one_line_error(lambda: open_cache(tmp_path / "late.partial"), "half-written")
    teacher.rows_seen = 0
    assert write_cache(teacher, data, tmp_path / "late", shard_rows=20, batch_size=20)["stats"]["rows_computed"] == 0
    assert teacher.rows_seen == 0 and open_cache(tmp_path / "late").n_rows == 60


# ----------------------------------------------------------------------------- refusals


def test_mismatches_and_damage_are_refused_with_one_line(tmp_path):
    data, teacher = _data(n=80), _Teacher()
    write_cache(teacher, data, tmp_path / "c", top_k=2, shard_rows=40)
    c = tmp_path / "c"
    open_cache(c, teacher=teacher, dataset=data)  # the matching pair opens
    _one_line_error(lambda: open_cache(c, teacher=_Teacher(seed=1)), "another teacher")
    relu_to_tanh = _Teacher()
    relu_to_tanh.net[1] = nn.Tanh()  # same weights, another function
    _one_line_error(lambda: open_cache(c, teacher=relu_to_tanh), "another teacher")
    leaky = [_Teacher(), _Teacher()]
    leaky[0].net[1], leaky[1].net[1] = nn.LeakyReLU(0.1), nn.LeakyReLU(0.2)  # no tensors differ, only a setting
    assert teacher_sha256(leaky[0]) != teacher_sha256(leaky[1]) and teacher_sha256(_Teacher()) == teacher_sha256(teacher)
    _one_line_error(lambda: open_cache(c, dataset=_data(n=81)), "80 rows", "81")
    _one_line_error(lambda: open_cache(c, dataset=_data(n=80, seed=9)), "other data")
    _one_line_error(lambda: write_cache(_Teacher(seed=1), data, c, top_k=2), "already holds", "another teacher")
    _one_line_error(lambda: CachedDataset(_data(n=80, seed=9), open_cache(c)), "other data")

    def damaged(edit):
        broken = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(c, broken)
        edit(broken)
        return broken

    def flip(folder):
        p = folder / "shard-00001.values.npy"
        raw = bytearray(p.read_bytes())
        raw[-3] ^= 0x01
        p.write_bytes(bytes(raw))

    flipped = damaged(flip)
    _one_line_error(lambda: open_cache(flipped), "shard-00001.values.npy", "corrupt", "sha256")
    lazy = open_cache(flipped, verify="lazy")  # checked on first read of that shard instead
    lazy.logits([0])
    _one_line_error(lambda: lazy.logits([79]), "corrupt")
    cut = damaged(lambda f: (f / "shard-00000.indices.npy").write_bytes((f / "shard-00000.indices.npy").read_bytes()[:-8]))
    _one_line_error(lambda: open_cache(cut), "shard-00000.indices.npy", "bytes")
    gone = damaged(lambda f: (f / "shard-00000.logsumexp.npy").unlink())
    _one_line_error(lambda: open_cache(gone), "missing")

    def unfinish(folder):
        m = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(checked_json({**m, "complete": False}))  # as a killed write leaves it

    _one_line_error(lambda: open_cache(damaged(unfinish)), "not complete", "rerun `distill cache`")
    bad_name = damaged(lambda f: (f / "manifest.json").write_text(
        (f / "manifest.json").read_text().replace("shard-00000.values.npy", "../../etc/passwd")))
    _one_line_error(lambda: open_cache(bad_name), "corrupt", "sha256")  # an edited manifest: its sha256 differs
    resealed = damaged(lambda f: (f / "manifest.json").write_text(checked_json(json.loads(
        (f / "manifest.json").read_text().replace("shard-00000.values.npy", "../../etc/passwd")))))
    _one_line_error(lambda: open_cache(resealed), "corrupt", "bad file entry")  # and with a matching one
    (tmp_path / "plain").mkdir()
    _one_line_error(lambda: open_cache(tmp_path / "plain"), "not a teacher cache")
    _one_line_error(lambda: open_cache(tmp_path / "nowhere"), "no cache at")
    _one_line_error(lambda: write_cache(teacher, data, tmp_path / "plain"), "not a teacher cache")


def test_bad_settings_and_unstorable_logits_are_refused(tmp_path):
    data = _data(n=10)
    _one_line_error(lambda: write_cache(_Teacher(), data, tmp_path / "a", top_k=0), "top_k")
    _one_line_error(lambda: write_cache(_Teacher(), data, tmp_path / "a", top_k=11), "top_k=11", "10 classes")
    assert not (tmp_path / "a.partial").exists()  # refused in the first batch: no debris
    _one_line_error(lambda: write_cache(_Teacher(), data, tmp_path / "a", dtype="bfloat16"), "dtype")
    _one_line_error(lambda: write_cache(_Teacher(), data, tmp_path / "a", shard_rows=0), "shard_rows")
    _one_line_error(lambda: write_cache(_Teacher(), data, tmp_path / "a.partial"), "must not end in .partial")
    _one_line_error(lambda: write_cache(_Teacher(scale=1e6), data, tmp_path / "a"), "float16", "float32")
    write_cache(_Teacher(scale=1e6), data, tmp_path / "b", dtype="float32")
    _one_line_error(lambda: write_cache(_Teacher(scale=float("nan")), data, tmp_path / "c"), "non-finite")


# ----------------------------------------------------------------------------- training on a cache


def test_cached_dataset_items_and_cached_teacher_contract(tmp_path):
    data, teacher = _data(n=50), _Teacher()
    write_cache(teacher, data, tmp_path / "c", top_k=3, dtype="float32", shard_rows=20)
    cache = open_cache(tmp_path / "c")
    ds = CachedDataset(data, cache)
    x, y, t, extras = ds.__getitems__([4, 45, 21])
    assert torch.equal(x, data.x[[4, 45, 21]]) and torch.equal(y, data.y[[4, 45, 21]])
    assert torch.equal(t, cache.logits([4, 45, 21])) and int(torch.isinf(t).sum(1).min()) == 7
    assert list(extras) == ["logsumexp"] and torch.equal(extras["logsumexp"], cache.topk([4, 45, 21])[2])
    x1, y1, t1, extras1 = ds[-1]
    assert torch.equal(x1, data.x[49]) and y1 == data.y[49] and torch.equal(t1, cache.logits([49])[0])
    assert extras1["logsumexp"] == cache.topk([49])[2][0]
    with pytest.raises(IndexError):
        ds[50]

    signal = CachedTeacher()
    assert signal.model is None
    _one_line_error(lambda: signal(x), "before any logits were fed")
    signal.feed(t, inputs=x)
    assert signal(x) is t
    _one_line_error(lambda: signal(x.clone()), "other than the batch")
    signal.feed(t)
    _one_line_error(lambda: signal(x[:2]), "3 rows", "2")


def _trained_student(method, data, digits, **train):
    torch.manual_seed(0)
    student = build_model(MLPConfig(hidden=[64]), digits.input_shape, digits.num_classes)
    cfg = TrainConfig(**{"epochs": 6, "batch_size": 64, "lr": 0.003, **train})
    fit(student, method, data, digits.val, cfg, seed=0, progress=False)
    with torch.inference_mode():
        return student.eval()(digits.test.x)


def test_kd_on_a_full_fp32_cache_trains_the_same_student_as_the_live_teacher(tmp_path, digits, digits_teacher):
    write_cache(digits_teacher, digits.train, tmp_path / "c", dtype="float32")
    cached = CachedDataset(digits.train, open_cache(tmp_path / "c", teacher=digits_teacher, dataset=digits.train))
    live = _trained_student(KD(KDConfig(), LiveTeacher(digits_teacher)), digits.train, digits)
    from_cache = _trained_student(KD(KDConfig(), CachedTeacher()), cached, digits)
    assert torch.allclose(from_cache, live, atol=1e-5, rtol=0), float((from_cache - live).abs().max())
    scratch = _trained_student(Supervised(SupervisedConfig()), digits.train, digits)
    assert (scratch - live).abs().max() > 1e-2  # the comparison can tell the teacher's influence apart


def test_fit_refuses_mixing_cached_and_live(tmp_path, digits):
    teacher = build_model(MLPConfig(hidden=[8]), digits.input_shape, digits.num_classes)
    write_cache(teacher, digits.train, tmp_path / "c")
    cached = CachedDataset(digits.train, open_cache(tmp_path / "c"))
    cfg = TrainConfig(epochs=1, batch_size=64)
    student = build_model(MLPConfig(hidden=[8]), digits.input_shape, digits.num_classes)
    _one_line_error(lambda: fit(student, KD(KDConfig(), CachedTeacher()), cached, None, cfg.model_copy(update={"jitter": 1}),
                                progress=False), "train.jitter=1", "jitter=0")
    _one_line_error(lambda: fit(student, KD(KDConfig(), CachedTeacher()), digits.train, None, cfg, progress=False),
                    "CachedDataset")
    _one_line_error(lambda: fit(student, KD(KDConfig(), LiveTeacher(teacher)), cached, None, cfg, progress=False),
                    "CachedTeacher()")
    fit(student, Supervised(SupervisedConfig()), cached, None, cfg, progress=False)  # no teacher: logits unused


# ----------------------------------------------------------------------------- command line


def test_cli_cache_writes_reuses_and_refuses(tmp_path, capsys):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    recipe = load_recipe(recipe_path)
    data = load_data(recipe)
    torch.manual_seed(0)
    model_cfg = MLPConfig(hidden=[32])
    save_model(tmp_path / "teacher.safetensors", build_model(model_cfg, data.input_shape, data.num_classes),
               model_record(model_cfg, data, recipe))
    teacher_path = str(tmp_path / "teacher.safetensors")
    out = tmp_path / "cache"
    argv = ["cache", str(recipe_path), "--teacher", teacher_path, "--out", str(out), "--top-k", "3", "--dtype", "float32"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"{len(data.train)} rows" in line and "rows/s" in line and "I/O" in line, line
    teacher = load_teacher(recipe, data, teacher_path)
    cache = open_cache(out, teacher=teacher, dataset=data.train)
    with torch.inference_mode():
        want = teacher.eval()(data.train.x).topk(3)
    values, classes, _ = cache.topk(range(len(data.train)))
    assert torch.allclose(values, want.values, atol=1e-5) and torch.equal(classes, want.indices)
    assert main(argv) == 0 and "reused" in capsys.readouterr().out
    assert main(["cache", str(recipe_path), "--teacher", teacher_path, "--out", str(tmp_path / "val"), "--split", "val"]) == 0
    capsys.readouterr()
    assert open_cache(tmp_path / "val", dataset=data.val).n_rows == len(data.val)
    for bad, words in ((["--top-k", "0"], "--top-k: must be a whole number >= 1"), (["--top-k", "4"], "already holds")):
        assert main(argv[:-4] + bad) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
    assert main(["cache", str(recipe_path), "--out", str(tmp_path / "x")]) == 2
    assert "--teacher" in capsys.readouterr().err


def _trained_cnn(method, data, digits, epochs=3):
    torch.manual_seed(0)
    student = build_model(CNNConfig(channels=[4, 8], hidden=[16]), digits.input_shape, digits.num_classes)
    fit(student, method, data, digits.val, TrainConfig(epochs=epochs, batch_size=64, lr=0.003), seed=0, progress=False)
    with torch.inference_mode():
        return student.eval()(digits.test.x)


def test_hints_and_attention_on_a_feature_cache_train_the_same_student_as_the_live_teacher(tmp_path, digits, digits_teacher):
    hints = HintsConfig(method="hints", student_layer="net.2", teacher_layer="head.2", hint_weight=0.5)
    attention = AttentionConfig(method="attention", student_layers=["features.2", "features.6"],
                                teacher_layers=["features.2", "features.6"])
    write_cache(digits_teacher, digits.train, tmp_path / "c", dtype="float32",
                features=["head.2", "features.2", "features.6"])
    cached = CachedDataset(digits.train, open_cache(tmp_path / "c", teacher=digits_teacher, dataset=digits.train))
    live = _trained_student(Hints(hints, LiveTeacher(digits_teacher)), digits.train, digits)
    from_cache = _trained_student(Hints(hints, CachedTeacher()), cached, digits)
    assert torch.allclose(from_cache, live, atol=1e-4, rtol=0), float((from_cache - live).abs().max())
    kd_only = _trained_student(KD(KDConfig(), LiveTeacher(digits_teacher)), digits.train, digits)
    assert (kd_only - live).abs().max() > 1e-2  # the hint term changes the student: the features were used
    live = _trained_cnn(Attention(attention, LiveTeacher(digits_teacher)), digits.train, digits)
    from_cache = _trained_cnn(Attention(attention, CachedTeacher()), cached, digits)
    assert torch.allclose(from_cache, live, atol=1e-4, rtol=0), float((from_cache - live).abs().max())
    # a cache without the hint layer is refused when the method first asks for it, with the fix
    write_cache(digits_teacher, digits.train, tmp_path / "no-features")
    bare = CachedDataset(digits.train, open_cache(tmp_path / "no-features"))
    _one_line_error(lambda: _trained_student(Hints(hints, CachedTeacher()), bare, digits), "'head.2'", "--features head.2")


def test_topk_rest_bucket_from_a_topk_cache_at_t1_equals_the_live_teacher(tmp_path, digits, digits_teacher):
    write_cache(digits_teacher, digits.train, tmp_path / "c", top_k=4, dtype="float32")
    cached = CachedDataset(digits.train, open_cache(tmp_path / "c", dataset=digits.train))
    config = TopKConfig(k=3, rest="bucket", temperature=1.0)
    live = _trained_student(TopK(config, LiveTeacher(digits_teacher)), digits.train, digits)
    from_cache = _trained_student(TopK(config, CachedTeacher()), cached, digits)
    assert torch.allclose(from_cache, live, atol=1e-4, rtol=0), float((from_cache - live).abs().max())
    renormalised = _trained_student(TopK(config.model_copy(update={"rest": "renormalize"}), LiveTeacher(digits_teacher)),
                                    digits.train, digits)
    assert (renormalised - live).abs().max() > 1e-2  # the bucket matters: the logsumexp was used
    _one_line_error(lambda: _trained_student(TopK(config.model_copy(update={"temperature": 4.0}), CachedTeacher()), cached, digits),
                    "temperature 1", "rest=renormalize")
    _one_line_error(lambda: _trained_student(TopK(config.model_copy(update={"k": 5}), CachedTeacher()), cached, digits),
                    "k=5", "--top-k")
