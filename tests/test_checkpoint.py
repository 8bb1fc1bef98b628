import json
import os
import random
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import distill.checkpoint as ck
import distill.durable as durable
from distill.checkpoint import atomic_write_bytes, atomic_write_text, load_model_file, load_weights, save_model
from distill.training_state import has_training_state, load_training_state, save_training_state
from distill.errors import UserError


def mlp(hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 3))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("view", torch.arange(12.0).reshape(3, 4).t())  # not contiguous


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_text(p, "one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["a.json"]


def test_atomic_write_failure_keeps_old(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(durable.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


# ----------------------------------------------------------------------------- model files


def test_save_load_model_round_trip(tmp_path):
    m = mlp()
    cfg = {"kind": "mlp", "hidden": [16], "dropout": 0.3, "nested": {"a": None, "b": True}}
    save_model(tmp_path / "m.safetensors", m, cfg)
    sd, got = load_model_file(tmp_path / "m.safetensors")
    assert got == cfg
    assert sd.keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v)
    m2 = mlp(seed=1)
    load_weights(m2, sd, "m.safetensors")
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_save_model_shared_and_noncontiguous(tmp_path):
    m = Tied()
    save_model(tmp_path / "t.safetensors", m, {})
    sd, cfg = load_model_file(tmp_path / "t.safetensors")
    assert cfg == {}
    assert torch.equal(sd["emb.weight"], sd["out.weight"])
    assert torch.equal(sd["view"], m.view)
    m2 = Tied()
    with torch.no_grad():
        m2.emb.weight.zero_()
    load_weights(m2, sd, "t.safetensors")
    assert torch.equal(m2.emb.weight, m.emb.weight)


def test_missing_config_metadata_is_empty(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    sd, cfg = load_model_file(tmp_path / "plain.safetensors")
    assert cfg == {} and torch.equal(sd["w"], torch.ones(2))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model_file(tmp_path / "nope.safetensors")


def test_torch_save_pickle_is_refused(tmp_path):
    p = tmp_path / "model.pt"
    torch.save(mlp().state_dict(), p)  # writing a pickle is fine; reading it must not happen
    with pytest.raises(UserError, match=r"model\.pt is not a safetensors file.*distill reads only safetensors"):
        load_model_file(p)
    import pickle

    p2 = tmp_path / "legacy.pkl"
    p2.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="not a safetensors file"):
        load_model_file(p2)


@pytest.mark.parametrize("content", [random.Random(0).randbytes(200), b"hello, this is a text file\n" * 5, b"", b"{}"])
def test_garbage_is_refused(tmp_path, content):
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(UserError, match="is not a safetensors file.*; distill reads only safetensors"):
        load_model_file(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_model(p, mlp(), {"a": 1})
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model_file(p)
    p.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(UserError, match="truncated or corrupt.*header claims"):
        load_model_file(p)


def test_header_claims_too_much_and_bad_json(tmp_path):
    p = tmp_path / "m.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    p.write_bytes(struct.pack("<Q", len(header) + 1000) + header + b"\0" * 8)
    with pytest.raises(UserError, match="header claims"):
        load_model_file(p)
    bad = b'{"w": nope}'
    p.write_bytes(struct.pack("<Q", len(bad)) + bad)
    with pytest.raises(UserError, match="not valid JSON"):
        load_model_file(p)
    beyond = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    p.write_bytes(struct.pack("<Q", len(beyond)) + beyond + b"\0" * 8)
    with pytest.raises(UserError, match="ends at byte 16"):
        load_model_file(p)
    meta = b'{"__metadata__":{"distill_config":"{broken"}}'
    p.write_bytes(struct.pack("<Q", len(meta)) + meta)
    with pytest.raises(UserError, match="distill_config"):
        load_model_file(p)


def test_load_weights_mismatch_names_keys_and_shapes(tmp_path):
    save_model(tmp_path / "m.safetensors", mlp(hidden=16), {})
    sd, _ = load_model_file(tmp_path / "m.safetensors")
    with pytest.raises(UserError) as e:
        load_weights(mlp(hidden=32), sd, "teacher.safetensors")
    msg = str(e.value)
    assert "teacher.safetensors" in msg and "does not match the model in the recipe" in msg
    assert "0.weight (16, 8) vs (32, 8)" in msg
    other = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(UserError, match=r"unexpected keys 3\.bias, 3\.weight") as e:
        load_weights(other, sd, "teacher.safetensors")
    sd2 = dict(sd)
    del sd2["3.bias"]
    with pytest.raises(UserError, match=r"missing keys 3\.bias"):
        load_weights(mlp(), sd2, "x")


# ----------------------------------------------------------------------------- exact resume


def make_run(opt_name, sched_name):
    model = mlp(seed=123)
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    elif opt_name == "adam_tensor_lr":
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2), amsgrad=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    if sched_name == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    return model, opt, sched


def train(model, opt, sched, steps):
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 8)
        y = torch.randint(0, 3, (16,))
        noise = random.random() + float(np.random.rand())  # python and numpy RNGs matter too
        loss = nn.functional.cross_entropy(model(x) * (1 + noise * 1e-3), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "opt_name,sched_name", [("adam", "step"), ("sgd", "cosine"), ("adam_tensor_lr", "cosine")]
)
def test_resume_is_bit_identical(tmp_path, opt_name, sched_name):
    n = 5

    def seed_all():
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)

    seed_all()
    model_a, opt_a, sched_a = make_run(opt_name, sched_name)
    seed_all()
    train(model_a, opt_a, sched_a, 2 * n)

    seed_all()
    model_b, opt_b, sched_b = make_run(opt_name, sched_name)
    seed_all()
    train(model_b, opt_b, sched_b, n)
    save_training_state(
        tmp_path / "ckpt", model=model_b, optimizer=opt_b, scheduler=sched_b, step=n, epoch=1,
        extra={"best": 0.5, "history": [1, 2.5], "pair": (1, "a"), "ids": {3: "x"}},
    )
    assert has_training_state(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(
        ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    )
    json.loads((tmp_path / "ckpt" / "state.json").read_text())

    model_c, opt_c, sched_c = make_run(opt_name, sched_name)
    with torch.no_grad():
        for p in model_c.parameters():
            p.add_(1.0)
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    info = load_training_state(tmp_path / "ckpt", model=model_c, optimizer=opt_c, scheduler=sched_c)
    assert info == {"step": n, "epoch": 1, "extra": {"best": 0.5, "history": [1, 2.5], "pair": (1, "a"), "ids": {3: "x"}}}
    assert list(opt_c.state_dict()["state"]) == list(opt_b.state_dict()["state"])
    train(model_c, opt_c, sched_c, n)

    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    assert sched_a.get_last_lr() == sched_c.get_last_lr()


def test_restore_rng_false_leaves_rng(tmp_path):
    model, opt, sched = make_run("adam", "step")
    save_training_state(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=0, epoch=0)
    torch.manual_seed(1)
    expect = torch.rand(3)
    torch.manual_seed(1)
    model2, opt2, sched2 = make_run("adam", "step")
    torch.manual_seed(1)
    load_training_state(tmp_path / "c", model=model2, optimizer=opt2, scheduler=sched2, restore_rng=False)
    assert torch.equal(torch.rand(3), expect)


def test_unjsonable_scheduler_state_fails_loudly(tmp_path):
    model, opt, _ = make_run("sgd", "step")

    class Weird:
        def state_dict(self):
            return {"fn": object()}

    with pytest.raises(TypeError, match="fn"):
        save_training_state(tmp_path / "c", model=model, optimizer=opt, scheduler=Weird(), step=0, epoch=0)
    assert not (tmp_path / "c").exists()


def test_missing_incomplete_and_corrupt_folders(tmp_path):
    model, opt, sched = make_run("adam", "step")
    kw = dict(model=model, optimizer=opt, scheduler=sched)
    with pytest.raises(UserError, match="does not exist"):
        load_training_state(tmp_path / "none", **kw)
    assert not has_training_state(tmp_path / "none")
    save_training_state(tmp_path / "c", step=1, epoch=0, **kw)
    (tmp_path / "c" / "optimizer.safetensors").unlink()
    with pytest.raises(UserError, match="damaged training state.*optimizer.safetensors is missing"):
        has_training_state(tmp_path / "c")  # refused, not taken for "nothing saved" (which restarts training)
    with pytest.raises(UserError, match="damaged training state.*optimizer.safetensors is missing"):
        load_training_state(tmp_path / "c", **kw)

    save_training_state(tmp_path / "d", step=1, epoch=0, **kw)
    data = (tmp_path / "d" / "model.safetensors").read_bytes()
    (tmp_path / "d" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged training state.*model.safetensors"):
        load_training_state(tmp_path / "d", **kw)

    save_training_state(tmp_path / "e", step=1, epoch=0, **kw)
    (tmp_path / "e" / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged training state.*state.json is not valid JSON"):
        load_training_state(tmp_path / "e", **kw)

    small = mlp(hidden=4)
    save_training_state(tmp_path / "f", model=small, optimizer=torch.optim.SGD(small.parameters(), lr=0.1), step=1, epoch=0)
    with pytest.raises(UserError, match="does not match the model"):
        load_training_state(tmp_path / "f", **kw)


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    model, opt, _ = make_run("sgd", "step")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a distill checkpoint"):
        save_training_state(tmp_path / "out", model=model, optimizer=opt, step=0, epoch=0)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- atomicity


def _save(directory, step):
    model = mlp(seed=step)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    save_training_state(directory, model=model, optimizer=opt, step=step, epoch=step, extra={"tag": step})
    return model


def _load_step(directory):
    model = mlp(seed=99)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    info = load_training_state(directory, model=model, optimizer=opt, restore_rng=False)
    return info["step"], model


def _count_replaces(tmp_path, monkeypatch):
    calls = []
    real = os.replace

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(durable.os, "replace", counting)
    _save(tmp_path / "probe", 1)
    _save(tmp_path / "probe", 2)
    monkeypatch.setattr(durable.os, "replace", real)
    return len(calls) // 2


@pytest.mark.parametrize("rollback_fails", [False, True])
def test_crash_at_every_replace_keeps_a_complete_checkpoint(tmp_path, monkeypatch, rollback_fails):
    n_replaces = _count_replaces(tmp_path, monkeypatch)
    assert n_replaces >= 5  # 3 safetensors + state.json + the folder swap
    real = os.replace
    for k in range(n_replaces):
        d = tmp_path / f"run{k}" / "ckpt"
        old_model = _save(d, 1)
        calls = {"n": 0}

        def crashing(*a, **kw):
            calls["n"] += 1
            # die at call k; a real kill would not run any cleanup, so optionally fail all later calls too
            if calls["n"] == k + 1 or (rollback_fails and calls["n"] > k + 1):
                raise OSError("killed")
            return real(*a, **kw)

        monkeypatch.setattr(durable.os, "replace", crashing)
        with pytest.raises(OSError, match="killed"):
            _save(d, 2)
        monkeypatch.setattr(durable.os, "replace", real)

        assert has_training_state(d)
        step, model = _load_step(d)
        assert step in (1, 2)
        if step == 1:
            for a, b in zip(old_model.parameters(), model.parameters()):
                assert torch.equal(a, b)
        # a later save works, cleans leftovers, and is what gets loaded
        new_model = _save(d, 3)
        assert sorted(os.listdir(d.parent)) == ["ckpt"]
        step, model = _load_step(d)
        assert step == 3
        for a, b in zip(new_model.parameters(), model.parameters()):
            assert torch.equal(a, b)


def test_kill_between_renames_recovers_newest(tmp_path):
    # The state a kill leaves after "rename old away" and before "rename new in".
    d = tmp_path / "ckpt"
    _save(d, 1)
    os.replace(d, tmp_path / "ckpt.old-4242")
    _save(tmp_path / "staging", 2)
    os.replace(tmp_path / "staging", tmp_path / "ckpt.tmp-4242")
    assert has_training_state(d)
    assert _load_step(d)[0] == 2
    # an incomplete temp folder (killed while writing) is ignored
    (tmp_path / "ckpt.tmp-4243").mkdir()
    (tmp_path / "ckpt.tmp-4243" / "model.safetensors").write_bytes(b"partial")
    assert _load_step(d)[0] == 2


def test_leftover_temp_folder_is_ignored(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, 1)
    junk = tmp_path / f"ckpt.tmp-{os.getpid()}"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    assert _load_step(d)[0] == 1
    _save(d, 2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert _load_step(d)[0] == 2


def test_header_length_starting_with_pickle_byte_is_still_safetensors(tmp_path):
    """Regression: a header of 128 bytes has 0x80 as its first length byte, like a pickle's protocol marker."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (128 - len(header))
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 128) + header + struct.pack("<2f", 1.0, 2.0))
    state, config = ck.load_model_file(path)
    assert state["w"].tolist() == [1.0, 2.0] and config == {}
