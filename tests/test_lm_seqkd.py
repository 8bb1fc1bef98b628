"""Sequence-level KD for causal language models: `distill generate` writes the teacher's completions of every training
row's prompt (beam search or seeded sampling, a killed generation continues to the same bytes); a `data.targets:
auto` variant of `distill run` learns from them; packed text and reference-based choice are refused with one line."""

import json
from types import SimpleNamespace

import pytest
from distill.cli import main
from distill.data.lm_text import TokenizedLM
from distill.errors import UserError
from distill.recipe import validate_recipe
from distill.tasks.lm_targets import completion_rows
from lm_fixtures import lm_recipe
from translation_fixtures import write_recipe

SEQ_KD = {"seq-kd": {"data": {"targets": "auto"}, "distill": {"hard_weight": 1, "soft_weight": 0}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`distill run` of the tiny LM recipe with a seq-KD variant (the teacher's beams written in the run)."""
    tmp_path = tmp_path_factory.mktemp("lmseqkd")
    raw = lm_recipe(tmp_path, variants=SEQ_KD, generate={"beam": 2, "max_new_tokens": 12, "shard_size": 100})
    recipe = write_recipe(tmp_path, raw, "lm.yaml")
    assert main(["run", recipe, "--quiet"]) == 0
    return tmp_path, recipe, tmp_path / "runs" / "lm"


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _records(folder):
    return [json.loads(line) for f in sorted(folder.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]


def test_a_seq_kd_variant_learns_from_the_teachers_completions_and_is_reported(run):
    _, _, out = run
    models = json.loads((out / "results.json").read_text())["models"]
    assert list(models) == ["teacher", "scratch", "student", "seq-kd"]
    assert models["seq-kd"]["metric"] == "perplexity" and 1 < models["seq-kd"]["perplexity"] < 287
    manifest = json.loads((out / "teacher-targets" / "manifest.json").read_text())
    assert manifest["decoding"] == {"num_beams": 2, "k_best": 1, "max_new_tokens": 12, "shard_size": 100}
    records = _records(out / "teacher-targets")
    assert len(records) == manifest["rows"] > 100
    for r in records:  # every prompt continued, within the new-token budget
        assert set(r) == {"prompt", "reference", "hypotheses"} and r["prompt"]
        assert len(r["hypotheses"]) == 1 and 1 <= len(r["hypotheses"][0]) <= 12


def test_completion_rows_keep_each_prompt_and_count_from_where_the_data_did():
    rows = TokenizedLM([[0, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6]], [3, 1], pad_id=0)
    # row 0: prompt [0, 5, 6] (its first counted token is at 3); row 1, plain text: its first 4 tokens (prompt_tokens)
    out = completion_rows(SimpleNamespace(prompt_tokens=4), rows, [[40, 41], [50]])
    assert out.ids == [[0, 5, 6, 40, 41], [0, 1, 2, 3, 50]] and out.starts == [3, 1]
    _, y = out.__getitems__([0, 1])
    assert y.tolist() == [40, 41, 1, 2, 3, 50]  # the plain-text prompt's own tokens still count, as in the data


def test_a_killed_sampled_generation_continues_to_the_same_bytes(run, monkeypatch):
    tmp_path, recipe, out = run
    args = ["generate", recipe, "--teacher", str(out / "teacher"), "--shard-size", "50", "--k-best", "2", "--quiet",
            "generate.sample=true", "generate.temperature=0.8"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    straight = _files(tmp_path / "straight")
    manifest = json.loads(straight["manifest.json"])
    assert manifest["decoding"] == {"num_beams": 1, "k_best": 2, "max_new_tokens": 12, "shard_size": 50,
                                    "sample": True, "temperature": 0.8, "seed": 0}
    records = _records(tmp_path / "straight")
    assert len(records) == manifest["rows"] and all(len(r["hypotheses"]) == 2 for r in records)
    assert len({tuple(map(tuple, r["hypotheses"])) for r in records}) > len(records) // 2  # samples, not one beam

    from distill.tasks.causal_lm import CausalLMTask

    real, calls = CausalLMTask.generate_targets, []

    def dies_in_shard_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(CausalLMTask, "generate_targets", dies_in_shard_3)
    with pytest.raises(SystemExit) as killed:
        main([*args, "--out", str(tmp_path / "killed")])
    assert killed.value.code == 130
    resumed = []
    monkeypatch.setattr(CausalLMTask, "generate_targets", lambda self, *a, **k: resumed.append(1) or real(self, *a, **k))
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    assert len(resumed) == len(manifest["shards"]) - 2  # the two finished shards were kept
    assert _files(tmp_path / "killed") == straight


def test_generating_from_packed_text_is_refused_with_one_line(run, capsys):
    tmp_path, recipe, out = run
    assert main(["generate", recipe, "--teacher", str(out / "teacher"), "--out", str(tmp_path / "p"), "data.pack=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "set data.pack: false" in err and len(err.splitlines()) == 1 and not (tmp_path / "p.partial").exists()


@pytest.mark.parametrize("raw, message", [
    ({"data": {"dataset": "lm", "pack": True, "targets": "auto"}}, "packed blocks have none: set data.pack: false"),
    ({"data": {"dataset": "imdb-lm", "pack": True}, "variants": SEQ_KD}, "variants.seq-kd.*set data.pack: false"),
    ({"data": {"dataset": "lm", "targets": "auto", "target_choice": "closest"}}, "use target_choice best"),
    ({"data": {"dataset": "en-es"}, "generate": {"sample": True}}, "generate.sample and temperature apply to language models"),
    ({"data": {"dataset": "imdb"}, "generate": {"max_new_tokens": 8}}, "generate applies to translation and language"),
    ({"data": {"dataset": "imdb", "targets": "auto"}}, "data.targets applies to translation data"),
])
def test_seq_kd_settings_that_do_not_apply_are_refused(raw, message):
    with pytest.raises(UserError, match=message) as refused:
        validate_recipe(raw)
    assert "\n" not in str(refused.value)
