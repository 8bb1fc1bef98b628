"""Nothing trusted that a file claims, nothing lost on a full disk (issue 13).

- A model file whose description asks for a huge model is refused before anything is built.
- Bytes changed inside a saved training state (weights, optimizer moments), a state.json cut in half, a file swapped
  for another state's: refused with one line, never resumed and never silently replaced by a fresh start.
- A full disk or lost permission in the middle of `distill run` / `distill cache`: one line naming the path, exit 2,
  the previous state kept, and the same command (--resume for a run) finishes the work as if nothing happened.
"""

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import distill.durable
from conftest import tiny_recipe
from distill.checkpoint import _read_header, load_model_file
from distill.cli import main
from distill.errors import UserError
from distill.training_state import has_training_state

ROLES = ("teacher", "scratch", "student")


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and all(w in err for w in words), err
    return err


def _weights(run: Path) -> dict:
    return {role: load_model_file(run / f"{role}.safetensors")[0] for role in ROLES}


def _same_weights(a: dict, b: dict) -> bool:
    return all(a[r].keys() == b[r].keys() and all(torch.equal(a[r][k], b[r][k]) for k in a[r]) for r in ROLES)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of a small digits recipe, and how many files it wrote through distill.durable."""
    tmp = tmp_path_factory.mktemp("integrity")
    raw = tiny_recipe(tmp, report={"repeats": 1, "throughput_batch": 32})
    raw["teacher"]["model"]["hidden"] = [32]
    raw["teacher"]["train"]["epochs"] = 2
    raw["student"]["train"]["epochs"] = 2
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    counting = Refusing(None, errno.ENOSPC)
    distill.durable.open = counting
    try:
        assert main(["run", str(recipe), "--quiet", "name=straight"]) == 0
    finally:
        del distill.durable.open
    return tmp, recipe, counting.calls, _weights(tmp / "runs" / "straight")


# ----------------------------------------------------------------------------- descriptions in files


def test_a_model_file_describing_a_huge_model_is_refused_before_anything_is_built(straight, capsys):
    tmp, recipe, _, _ = straight
    tensors, record = load_model_file(tmp / "runs" / "straight" / "teacher.safetensors")
    record["model"]["hidden"] = [10**7, 10**7]  # 10^14 weights: hundreds of terabytes if it were allocated
    hostile = tmp / "hostile.safetensors"
    save_file(tensors, str(hostile), metadata={"format": "pt", "distill_config": json.dumps(record)})
    assert main(["eval", str(hostile)]) == 2
    _one_line(capsys, str(hostile), "does not match its weights", "(10000000, 10000000)")
    assert main(["distill", str(recipe), "--quiet", "--teacher", str(hostile), "name=hostile"]) == 2
    _one_line(capsys, str(hostile), "does not match its weights")


def test_a_changed_byte_in_a_saved_model_is_refused(straight, capsys):
    tmp, _, _, _ = straight
    model = tmp / "changed.safetensors"
    raw = bytearray((tmp / "runs" / "straight" / "student.safetensors").read_bytes())
    raw[-2] ^= 0x10  # one bit of the last weight: the file is still a valid safetensors file
    model.write_bytes(bytes(raw))
    assert main(["eval", str(model)]) == 2
    _one_line(capsys, str(model), "damaged", "sha256")


def test_an_edited_results_json_is_refused_by_export(straight, capsys):
    tmp, _, _, _ = straight
    run = tmp / "runs" / "edited"
    shutil.copytree(tmp / "runs" / "straight", run)
    results = run / "results.json"
    results.write_text(results.read_text().replace('"accuracy": 0.', '"accuracy": 1.', 1))
    assert main(["export", str(run), "--format", "onnx"]) == 2
    _one_line(capsys, str(results), "damaged", "sha256")
    assert not (run / "export").exists()


# ----------------------------------------------------------------------------- training states


@pytest.fixture
def state(tmp_path, digits):
    """A training state of a digits MLP (Adam: it has moments), and how to resume from it."""
    from distill.methods.supervised import Supervised, SupervisedConfig
    from distill.recipe import TrainConfig
    from distill.students import MLPConfig, build_model
    from distill.train import fit

    def model():
        torch.manual_seed(0)
        return build_model(MLPConfig(hidden=[16]), digits.input_shape, digits.num_classes)

    def resume(folder):
        return fit(model(), Supervised(SupervisedConfig()), digits.train, digits.val, cfg, seed=0, state_dir=folder,
                   resume=True, progress=False)

    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.01)
    fit(model(), Supervised(SupervisedConfig()), digits.train, digits.val, cfg, seed=0, state_dir=tmp_path / "st",
        progress=False)
    return tmp_path / "st", resume


def _flip_in(path: Path, tensor_part: str) -> str:
    """Flip one bit inside the data of the first tensor whose name contains `tensor_part`; returns its name."""
    header, n = _read_header(path)
    name = next(k for k in header if tensor_part in k)
    start, end = header[name]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + n + (start + end) // 2] ^= 0x04
    path.write_bytes(bytes(raw))
    return name


@pytest.mark.parametrize("file, tensor", [("model.safetensors", "weight"), ("optimizer.safetensors", "exp_avg_sq")])
def test_a_changed_byte_in_a_state_is_refused_not_resumed(state, file, tensor):
    folder, resume = state
    _flip_in(folder / file, tensor)
    with pytest.raises(UserError, match=rf"{folder} holds a damaged training state \({file}: .*sha256.*rerun without --resume"):
        resume(folder)


def test_a_state_json_cut_in_half_is_refused_not_taken_for_a_fresh_start(state):
    folder, resume = state
    text = (folder / "state.json").read_text()
    (folder / "state.json").write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="damaged training state.*state.json is not valid JSON"):
        resume(folder)


def test_a_file_swapped_for_another_states_is_refused(state, tmp_path):
    from distill.training_state import save_training_state

    folder, resume = state

    net = torch.nn.Linear(2, 2)
    save_training_state(tmp_path / "unrelated", model=net, optimizer=torch.optim.Adam(net.parameters()), step=0, epoch=0)
    shutil.copy(tmp_path / "unrelated" / "rng.safetensors", folder / "rng.safetensors")  # a valid file, not its own
    with pytest.raises(UserError, match="damaged training state.*rng.safetensors is not the file its state.json lists"):
        resume(folder)


def _as_version_2(folder: Path) -> None:
    """Rewrite a state as the distill before checksums wrote it: no sha256 in state.json or in the files."""
    from safetensors.torch import load_file, save_file

    from distill.checkpoint import CHECKSUM_KEY

    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        header, _ = _read_header(folder / name)
        meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CHECKSUM_KEY}
        save_file(load_file(folder / name), folder / name, metadata=meta)
    body = json.loads((folder / "state.json").read_text())
    body = {k: v for k, v in body.items() if k not in ("sha256", "files")}
    (folder / "state.json").write_text(json.dumps({**body, "version": 2}))


def test_a_state_written_before_checksums_is_still_resumed(state, tmp_path):
    folder, resume = state
    old = tmp_path / "v2"
    shutil.copytree(folder, old)
    shutil.copy(folder.with_name(folder.name + ".best.safetensors"), old.with_name("v2.best.safetensors"))
    _as_version_2(old)
    assert json.loads((old / "state.json").read_text())["version"] == 2  # the copy really is in the old format
    a, b = resume(folder).student.state_dict(), resume(old).student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- a full disk, lost permission


class Refusing:
    """distill.durable's `open` that refuses the n-th file it is asked to write, as a full disk would."""

    def __init__(self, n: int, err: int):
        self.n, self.err, self.calls = n, err, 0

    def __call__(self, path, mode="r", *a, **k):
        if "w" in mode:
            self.calls += 1
            if self.calls == self.n:
                raise OSError(self.err, os.strerror(self.err), str(path))
        return open(path, mode, *a, **k)


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space left"), (errno.EFBIG, "too large"),
                                        (errno.EACCES, "permission denied")])
def test_a_disk_that_refuses_a_write_stops_the_run_with_one_line_and_resume_finishes_it(
        straight, monkeypatch, capsys, err, words):
    tmp, recipe, writes, want = straight
    n = random.Random(f"refused {err}").randint(1, writes - 4)  # any write of the run but its last few (the report)
    name = f"refused-{err}"
    monkeypatch.setattr(distill.durable, "open", Refusing(n, err), raising=False)
    assert main(["run", str(recipe), "--quiet", f"name={name}"]) == 2
    _one_line(capsys, "cannot write", str(tmp / "runs" / f"{name}.partial"), words, "--resume")
    partial = tmp / "runs" / f"{name}.partial"
    assert partial.is_dir()  # kept, although the run was not started with --resume
    assert not [p for p in partial.rglob("*") if p.name.endswith(".tmp")]  # no half-written file left behind
    for role_state in (partial / "state").glob("*"):
        if role_state.is_dir():
            assert has_training_state(role_state)  # each state whole: the previous one, or none written yet
    monkeypatch.delattr(distill.durable, "open")
    assert main(["run", str(recipe), "--quiet", f"name={name}", "--resume"]) == 0
    assert _same_weights(_weights(tmp / "runs" / name), want)


def test_a_full_disk_stops_a_cache_with_one_line_and_the_same_command_finishes_it(straight, monkeypatch, capsys):
    from distill.signals import cache as cache_module

    tmp, recipe, _, _ = straight
    monkeypatch.setitem(cache_module.write_cache.__kwdefaults__, "shard_rows", 300)
    argv = ["cache", str(recipe), "--teacher", str(tmp / "runs" / "straight" / "teacher.safetensors"), "--out"]
    assert main([*argv, str(tmp / "cache-straight")]) == 0
    calls, real = [], os.posix_fallocate

    def full(fd, offset, length):  # the disk fills up when the third shard's first file is made
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main([*argv, str(tmp / "cache-full")]) == 2
    _one_line(capsys, "cannot write", "shard-00002", "no space left")
    assert (tmp / "cache-full.partial" / "shard-00001.logits.npy").is_file()  # the finished shards are kept
    monkeypatch.undo()
    monkeypatch.setitem(cache_module.write_cache.__kwdefaults__, "shard_rows", 300)
    assert main([*argv, str(tmp / "cache-full")]) == 0
    assert "resumed" in capsys.readouterr().out
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(tmp / "cache-full") == files(tmp / "cache-straight")


# ----------------------------------------------------------------------------- half-written cache and generate folders


def test_a_damaged_manifest_of_a_half_written_cache_or_generation_is_refused_not_discarded(tmp_path):
    """Their manifests are written atomically, so a kill cannot damage one: damage is refused (with how to start
    over), where it used to be taken for "nothing done yet" and the finished shards thrown away."""
    from distill import generate
    from distill.data import ArrayDataset
    from distill.signals import write_cache

    teacher = torch.nn.Sequential(torch.nn.Linear(4, 3))
    data = ArrayDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    write_cache(teacher, data, tmp_path / "c", shard_rows=10)
    shutil.copytree(tmp_path / "c", tmp_path / "d.partial")
    manifest = tmp_path / "d.partial" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 10', '"rows": 11', 1))
    with pytest.raises(UserError, match=r"d.partial/manifest.json is damaged.*delete .*d.partial"):
        write_cache(teacher, data, tmp_path / "d", shard_rows=10)
    assert len(list((tmp_path / "d.partial").glob("shard-*"))) == 4  # nothing was thrown away

    partial = tmp_path / "g.partial"
    partial.mkdir()
    (partial / generate.MANIFEST).write_text(distill.durable.checked_json({"format": generate.FORMAT, "shards": []})[:30])
    with pytest.raises(UserError, match=r"g.partial/manifest.json is damaged.*--restart"):
        generate._finished_shards(partial, {})
