"""Causal language models: the wrapper's logits at counted positions, generation, perplexity against a float64
computation, vocabulary checks, and `distill run` / `distill eval` end to end on a tiny synthetic language."""

import json
import math

import pytest
import torch
from lm_fixtures import documents, lm_recipe, make_tokenizer, write_jsonl
from translation_fixtures import write_recipe

from distill.cli import main
from distill.data.lm_text import LMExample, tokenize_examples
from distill.errors import UserError
from distill.recipe import validate_recipe
from distill.students.causal_lm import CausalLM, CausalLMConfig, build_causal_lm
from distill.tasks import make_task


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def tiny(arch: str, tok, extra_rows: int = 0, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    cfg = CausalLMConfig(arch=arch, layers=2, d_model=16, heads=2, ffn_dim=32, max_positions=48, dropout=0.0)
    model = build_causal_lm(cfg, len(tok) + extra_rows, bos_id=tok.eos_token_id, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id)
    return CausalLM(model.hf, len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id).eval()


def batch(tok):
    rows = tokenize_examples(tok, [LMExample("a", " was good .", prompt="the film"),
                                   LMExample("b", "the plot was dull and the actor was sad .")], max_length=40)
    return rows, *rows.__getitems__([0, 1])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_are_the_models_at_each_counted_position_in_the_order_of_y(arch, tok):
    model = tiny(arch, tok)
    rows, inputs, y = batch(tok)
    with torch.no_grad():
        got = model(inputs)
        full = model.hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = torch.cat([full[b, rows.starts[b] - 1 : len(rows.ids[b]) - 1] for b in range(2)])  # t predicts t + 1
    assert got.shape == (len(y), len(tok)) and torch.allclose(got, expected, atol=1e-5)
    weight, bias = model.output_projection()
    with torch.no_grad():
        assert torch.allclose(model.counted_hidden(inputs) @ weight.T, got, atol=1e-5) and bias is None


def test_extra_embedding_rows_are_cut_to_the_tokenizer_and_never_generated(tok):
    model = tiny("gpt2", tok, extra_rows=13)
    assert model.embedding_rows == len(tok) + 13
    _, inputs, y = batch(tok)
    with torch.no_grad():
        model.hf.lm_head.weight[len(tok):] = 50 * model.hf.lm_head.weight[:13].abs().max()  # the padded rows would win
        full = model.hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        logits = model(inputs)
    assert logits.shape == (len(y), len(tok)) and torch.equal(logits, full[inputs["target_mask"]][:, : len(tok)])
    assert model.output_projection()[0].shape == (len(tok), 16)
    new = model.generate({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, max_new_tokens=6)
    assert all(int(row.max()) < len(tok) for row in new)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generation_is_the_argmax_of_the_models_own_logits_whatever_the_padding(arch, tok):
    model = tiny(arch, tok, seed=1)
    prompts = [[tok.eos_token_id, *tok("the film was", add_special_tokens=False)["input_ids"]], [tok.eos_token_id, 263]]
    from distill.data.text import pad_rows

    ids, mask = pad_rows(prompts, tok.pad_token_id)  # right-padded, as distill's batches are
    together = model.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=5, min_new_tokens=5)
    for p, new in zip(prompts, together):
        alone = model.generate({"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.long)},
                               max_new_tokens=5, min_new_tokens=5)[0]
        assert new.tolist() == alone.tolist()
        row = torch.tensor([p + new.tolist()])
        with torch.no_grad():
            logits = model.hf(input_ids=row).logits[0, len(p) - 1 : -1]
        assert logits.argmax(-1).tolist() == new.tolist()
    first = together[0].tolist()
    model.eos_id = first[2]  # generation stops after the first end-of-text token, which it keeps
    assert model.generate({"input_ids": ids[:1, :len(prompts[0])], "attention_mask": mask[:1, :len(prompts[0])]},
                          max_new_tokens=5)[0].tolist() == first[: first.index(first[2]) + 1]


def test_on_policy_batches_count_exactly_the_tokens_the_student_samples_after_each_prompt(tok):
    from distill.data.text import pad_rows

    model = tiny("llama", tok, seed=2)
    rows, inputs, _ = batch(tok)  # a prompt/completion row and a plain-text row (whose prompt is its start token)
    torch.manual_seed(0)
    sampled, y = model.sample_completions(inputs, max_new_tokens=6, temperature=1.0)
    prompts = [rows.prompt(0), rows.prompt(1)]
    ids, mask = pad_rows(prompts, tok.pad_token_id)
    torch.manual_seed(0)
    own = [n.tolist() for n in model.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=6, do_sample=True)]
    for b, (p, new) in enumerate(zip(prompts, own)):
        n = int(sampled["attention_mask"][b].sum())
        assert sampled["input_ids"][b, :n].tolist() == p + new and 1 <= len(new) <= 6
        assert sampled["target_mask"][b].nonzero().flatten().tolist() == list(range(len(p) - 1, n - 1))
    assert y.tolist() == own[0] + own[1]
    with torch.no_grad():
        assert model(sampled).shape == (len(y), len(tok))


# ----------------------------------------------------------------------------- the task
@pytest.fixture(scope="module")
def task_and_data(tmp_path_factory):
    task = make_task(validate_recipe(lm_recipe(tmp_path_factory.mktemp("lm"))))
    return task, task.load_data()


def nll64(model, prompt_rows: list[list[int]], starts: list[int]) -> float:
    """Mean NLL per counted token, in float64, each row run alone (no padding): the definition, not our batching."""
    total, count = 0.0, 0
    for ids, start in zip(prompt_rows, starts):
        with torch.no_grad():
            logp = model.hf(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        for t in range(start, len(ids)):
            total -= float(logp[t - 1, ids[t]])
            count += 1
    return total / count


def test_perplexity_is_exp_of_the_mean_nll_per_counted_token(task_and_data):
    task, data = task_and_data
    model = task.build_model(task.recipe.teacher.model, data).eval()
    rows = data.val
    scores = task.evaluate(model, rows, batch_size=5)
    expected = nll64(model, rows.ids, rows.starts)
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["perplexity"] == scores["score"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert scores["tokens"] == int(rows.row_counts().sum()) and scores["n"] == len(rows)
    assert task.greater_is_better is False and task.better(10.0, 11.0) and not task.better(12.0, 11.0)


def test_the_judges_nll_reads_each_continuation_after_its_prompt(task_and_data):
    task, data = task_and_data
    judge = task.build_model(task.recipe.teacher.model, data).eval()
    prompts, _ = task.sample_prompts(data.test, 4)
    continuations = [[263, 264, 1], [280], [263, 290, 291, 292], [1]]
    expected = nll64(judge, [p + c for p, c in zip(prompts, continuations)], [len(p) for p in prompts])
    assert task.nll_of(judge, prompts, continuations) == pytest.approx(expected, rel=1e-5)


def test_a_model_shorter_than_max_length_and_other_kinds_are_refused(task_and_data):
    task, data = task_and_data
    with pytest.raises(UserError, match="takes at most 16 positions but data.max_length is 24"):
        task.build_model(CausalLMConfig(layers=1, d_model=16, heads=2, ffn_dim=16, max_positions=16), data)
    from distill.students.mlp import MLPConfig

    with pytest.raises(UserError, match="model.kind mlp is not a language model"):
        task.build_model(MLPConfig(hidden=[8]), data)
    from distill.students.hf import HFConfig

    with pytest.raises(UserError, match="was pretrained with its own tokenizer, but this run trains a new one"):
        task.build_model(HFConfig(path="gpt2"), data)  # (refused before anything is looked up)


@pytest.mark.parametrize("data, message", [
    ({"dataset": "digits", "pack": True}, "data.pack applies to language-model data"),
    ({"dataset": "imdb", "format": "chat"}, "data.format applies to language-model data"),
    ({"dataset": "imdb-lm", "format": "chat"}, "imdb-lm is plain text"),
    ({"dataset": "lm", "unlabelled_rows": 3}, "language-model text has no labels to hide"),
])
def test_recipe_fields_that_do_not_apply_are_refused(data, message):
    with pytest.raises(UserError, match=message):
        validate_recipe({"data": data})


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lmrun")
    assert main(["run", write_recipe(tmp_path, lm_recipe(tmp_path)), "--quiet"]) == 0
    return tmp_path / "runs" / "lm"


def test_a_run_reports_perplexity_teacher_nll_and_samples_for_every_model(run):
    results = json.loads((run / "results.json").read_text())
    models = results["models"]
    assert results["task"] == "causal-lm" and list(models) == ["teacher", "scratch", "student"]
    for m in models.values():
        assert m["metric"] == "perplexity" and m["score"] == m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert m["teacher_nll"] > 0 and len(m["samples"]) == 3 and m["new_tokens"] == 12
    assert models["teacher"]["perplexity"] < 30 < 287  # learnt: far below the uniform guess over its 287 tokens
    assert models["teacher"]["params"] > 3 * models["student"]["params"]
    report = (run / "report.md").read_text()
    assert "## Language model" in report and "Sampled continuations by the student:" in report
    assert models["student"]["samples"][0]["prompt"] in report


def test_a_saved_student_is_a_transformers_model_and_distill_eval_reads_it(run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "student")
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    prompt = tokenizer(["the film was"], return_tensors="pt")
    assert prompt["input_ids"][0, 0] == tokenizer.eos_token_id  # </s> starts a text, as in training
    ids = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ids.shape[1] > prompt["input_ids"].shape[1]
    capsys.readouterr()
    assert main(["eval", str(run / "student"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    results = json.loads((run / "results.json").read_text())
    assert card["perplexity"] == pytest.approx(results["models"]["student"]["perplexity"])
    assert "teacher_nll" not in card  # no teacher to judge the samples outside a run


def test_the_divergence_method_trains_on_policy_on_the_students_own_samples(run, tmp_path):
    raw = lm_recipe(tmp_path, name="gkd", distill={"method": "divergence", "divergence": "jsd", "on_policy": 1.0,
                                                   "max_new_tokens": 8})
    raw["student"]["train"]["epochs"] = 1
    raw["data"]["path"] = str(run.parent.parent / "docs.txt")  # the teacher's data
    assert main(["distill", write_recipe(tmp_path, raw), "--teacher", str(run / "teacher"), "--quiet", "--no-scratch"]) == 0
    results = json.loads((tmp_path / "runs" / "gkd" / "results.json").read_text())
    assert results["models"]["student"]["perplexity"] > 0 and results["config"]["distill"]["on_policy"] == 1.0


def test_a_top_k_cache_of_the_teachers_token_logits_serves_the_topk_method(run, tmp_path):
    """`distill cache --top-k` stores the teacher's k largest logits per counted token (+ logsumexp), and `topk` with
    the rest bucket learns from it, with the same student as from the live teacher (the cache is exact for top-k)."""
    raw = lm_recipe(tmp_path, name="cached", distill={"method": "topk", "k": 8, "temperature": 1, "rest": "bucket",
                                                      "hard_weight": 0.5, "soft_weight": 0.5})
    raw["student"]["train"]["epochs"] = 1
    raw["data"]["path"] = str(run.parent.parent / "docs.txt")  # the teacher's data
    recipe, teacher = write_recipe(tmp_path, raw), str(run / "teacher")
    assert main(["cache", recipe, "--teacher", teacher, "--out", str(tmp_path / "cache"), "--top-k", "8",
                 "--dtype", "float32"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["n_rows"] > 200  # one row per counted token, not per document
    assert main(["distill", recipe, "--teacher", teacher, "--quiet", "--no-scratch", f"teacher.cache={tmp_path / 'cache'}"]) == 0
    assert main(["distill", recipe, "--teacher", teacher, "--quiet", "--no-scratch", "name=live"]) == 0
    cached = json.loads((tmp_path / "runs" / "cached" / "results.json").read_text())["models"]["student"]
    live = json.loads((tmp_path / "runs" / "live" / "results.json").read_text())["models"]["student"]
    assert cached["perplexity"] == pytest.approx(live["perplexity"], rel=1e-3)


def test_a_teacher_with_padded_embedding_rows_distils_over_the_shared_vocabulary(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(tmp_path / "teacher")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok) + 45, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "teacher")
    raw = lm_recipe(tmp_path, name="padded")
    raw["student"]["train"]["epochs"] = 1
    assert main(["distill", write_recipe(tmp_path, raw), "--teacher", str(tmp_path / "teacher"), "--quiet", "--no-scratch"]) == 0
    out = capsys.readouterr().out
    said = f"the teacher has {len(tok) + 45} token embeddings and the student {len(tok)}"
    assert out.count(said) == 1 and f"compared over its {len(tok)} tokens" in out
    results = json.loads((tmp_path / "runs" / "padded" / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "student"}


def test_a_student_with_another_tokenizer_is_refused_with_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, texts in (("teacher", None), ("other", [d.upper() for d in documents(200)])):  # same size, other tokens
        tok = make_tokenizer(tmp_path / name, texts=texts)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                                   eos_token_id=1)).save_pretrained(tmp_path / name)
    raw = lm_recipe(tmp_path, name="mixed")
    raw["teacher"] = {"model": {"kind": "hf", "path": str(tmp_path / "teacher")}}
    raw["student"]["model"] = {"kind": "hf", "path": str(tmp_path / "other")}
    assert main(["run", write_recipe(tmp_path, raw), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has its own tokenizer, different from the teacher's" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "mixed").exists()


def test_chat_data_without_a_template_exits_2(tmp_path, capsys):
    chat = [{"messages": [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "was good"}]}] * 20
    raw = lm_recipe(tmp_path, name="chat")
    raw["data"]["path"] = str(write_jsonl(tmp_path / "chat.jsonl", chat))
    assert main(["run", write_recipe(tmp_path, raw), "--quiet"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_an_hf_shrink_student_keeps_teacher_layers_of_a_language_model(task_and_data):
    from distill.students.hf_shrink import HFShrinkConfig

    task, data = task_and_data
    teacher = task.build_model(task.recipe.teacher.model, data)
    student = task.build_model(HFShrinkConfig(num_layers=1), data, teacher)
    assert isinstance(student, CausalLM) and student.hf.config.n_layer == 1 and student.vocab_size == len(task.tokenizer)
    assert torch.equal(student.hf.transformer.h[0].attn.c_attn.weight, teacher.hf.transformer.h[0].attn.c_attn.weight)
    inputs, y = data.train.__getitems__([0, 1])
    assert student(inputs).shape == (len(y), len(task.tokenizer))


def test_imdb_lm_holds_out_the_sentiment_tasks_test_reviews(shared_data):
    from distill.tasks.text_classification import read_imdb_reviews, split_labelled

    lm = validate_recipe({"data": {"dataset": "imdb-lm", "data_dir": str(shared_data), "train_rows": 300}})
    fmt, splits = make_task(lm)._read_splits()
    texts, y = read_imdb_reviews(lm.data)
    _, _, test, _ = split_labelled(y, validate_recipe({"data": {"dataset": "imdb", "data_dir": str(shared_data)}}).data)
    assert fmt == "text" and len(splits["train"]) == 300 and len(splits["test"]) == len(test) == 2000
    assert [ex.completion for ex in splits["test"]] == [texts[i] for i in test]
    assert not {ex.completion for ex in splits["train"]} & {texts[i] for i in test}


def test_packed_data_is_sampled_from_the_beginning_of_its_test_documents(tmp_path):
    raw = lm_recipe(tmp_path)
    raw["data"]["pack"] = True
    task = make_task(validate_recipe(raw))
    data = task.load_data()
    eos = task.tokenizer.eos_token_id
    assert set(data.test.lengths()[:-1]) == {24} and len(data.test_documents) == round(0.2 * 240)
    prompts, references = task.sample_prompts(data.test_documents, 3)
    assert all(p[0] == eos and len(p) == 12 for p in prompts)  # prompt + 12 new tokens within max_length 24
    assert [p + r for p, r in zip(prompts, references)] == [d[:24] for d in data.test_documents.ids[:3]]


def test_the_imdb_lm_recipe_distils_a_4_layer_teacher_into_a_2_layer_student_on_packed_reviews():
    from distill.recipe import builtin_recipe_path, load_recipe

    r = load_recipe(builtin_recipe_path("imdb-lm"))
    assert r.data.dataset == "imdb-lm" and r.data.pack and r.data.test_rows is None  # the sentiment task's test reviews
    assert (r.teacher.model.layers, r.teacher.model.d_model, r.student.model.layers, r.student.model.d_model) == (4, 256, 2, 128)
    assert r.distill.method == "divergence" and r.distill.divergence == "forward_kl" and r.distill.temperature == 1
    assert min(r.teacher.model.max_positions, r.student.model.max_positions) >= r.data.max_length


def test_layer_methods_read_the_hidden_states_of_language_models(task_and_data):
    from distill.methods import build_method
    from distill.methods.transformer import TransformerConfig
    from distill.signals import LiveTeacher

    task, data = task_and_data
    teacher, student = (task.build_model(role.model, data) for role in (task.recipe.teacher, task.recipe.student))
    inputs, y = data.train.__getitems__([0, 1, 2])
    logits, out = student(inputs, output_hidden_states=True)
    assert torch.allclose(logits, student(inputs), atol=1e-5) and len(out.hidden_states) == 2  # embeddings + 1 layer
    method = build_method(TransformerConfig(hidden_weight=1.0), LiveTeacher(teacher))
    method.setup(student, inputs)
    loss, parts = method(student, inputs, y)
    assert torch.isfinite(loss) and parts["hidden"] > 0
