"""Causal language modelling: decoder-only models learn the next token, distillation is per counted token, and the
metric is perplexity.

Data: `imdb-lm` (the IMDB reviews as plain text, split as the sentiment task splits them, so with the same
data.split_seed and test_rows its test reviews are the classifier's) or `lm` (data.path: one .txt / .jsonl file
split by val_fraction / test_fraction, or a folder of train / valid / test files; data.format text |
prompt_completion | chat, default auto; see distill.data.lm_text). data.pack joins plain-text documents into blocks
of data.max_length tokens. Sequence-level KD (data.targets, unpacked rows): the distilled students learn the
teacher's completions of each row's prompt (distill.tasks.lm_targets). The tokenizer is the teacher's when it
brings one (data.tokenizer, a teacher folder or an hf teacher), else a byte-level BPE of data.vocab_size tokens
trained on the training text; it is saved with every model. Models: `causal-lm` (GPT-2 or Llama from a config), `hf` (a pretrained causal LM), `hf-shrink` (the
teacher with fewer layers / narrower). The best epoch has the lowest validation perplexity; the test report adds
the teacher's NLL per token of each model's own sampled continuations (when `judge` is set), sample continuations
and the latency of greedy generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.data.lm_text import LMExample, TokenizedLM, read_lm_file, tokenize_examples
from distill.data.parallel import train_tokenizer
from distill.data.splits import cap_splits, split_by_fraction, split_files
from distill.data.text import pad_rows
from distill.errors import UserError
from distill.tasks.classification import evaluate as token_scores
from distill.tasks.lm_targets import completion_rows, generate_completions, prompt_end
from distill.tasks.text import TextTask


@dataclass
class LMSplits:
    name: str
    train: TokenizedLM
    val: TokenizedLM
    test: TokenizedLM
    num_classes: int  # the tokenizer's vocabulary: one "class" per token
    class_names: list[str]
    test_documents: TokenizedLM  # the test split one document a row (packed blocks start mid-text): sample prompts
    token_level: bool = True


class CausalLMTask(TextTask):
    name = "causal-lm"
    metric = "perplexity"
    greater_is_better = False
    token_level = True
    variable_rows = True  # a row owns as many label rows as it has counted tokens
    inference_batch = 16  # logits of every counted token: batch x length x vocabulary floats
    folder_kinds = ("hf", "hf-shrink", "causal-lm")
    pad_from_eos = True
    new_tokens = 32  # generated per continuation (samples, the judge's NLL, latency), at most half of max_length
    prompt_tokens = 16  # a plain-text row is continued after this many of its tokens
    judged_prompts = 32  # test rows continued for the judge's NLL
    samples = 3  # continuations shown in the report
    sample_seed = 0
    _said_aligned = False  # the alignment of differently padded vocabularies is said once per run

    # ------------------------------------------------------------------ data and tokenizer
    def load_data(self) -> LMSplits:
        d = self.recipe.data
        fmt, examples = self._read_splits()
        if self._tokenizer is None and not self.teacher_brings_tokenizer():
            if fmt == "chat":
                raise UserError(f"{d.path}: chat data (messages) is rendered with the tokenizer's chat template, and a "
                                "tokenizer trained here has none: set data.tokenizer to one with a chat_template, or "
                                "give prompt/completion JSONL")
            self._tokenizer = train_tokenizer([t for ex in examples["train"] for t in (ex.prompt, ex.completion) if t],
                                              d.vocab_size, eos_at="start")
        source = str(d.path) if d.dataset == "lm" else d.dataset
        splits = {name: tokenize_examples(self.tokenizer, rows, d.max_length, pack=d.pack, source=source)
                  for name, rows in examples.items()}
        documents = tokenize_examples(self.tokenizer, examples["test"], d.max_length) if d.pack else splits["test"]
        return LMSplits(d.dataset, splits["train"], splits["val"], splits["test"], len(self.tokenizer), [], documents)

    def _read_splits(self) -> tuple[str, dict[str, list[LMExample]]]:
        d = self.recipe.data
        if d.dataset == "imdb-lm":
            from distill.tasks.text_classification import read_imdb_reviews, split_labelled

            texts, y = read_imdb_reviews(d)
            train, val, test, _ = split_labelled(y, d)  # the sentiment task's split: the same held-out reviews
            pick = lambda idx: [LMExample(f"review {i}", texts[i]) for i in idx]  # noqa: E731
            return "text", {"train": pick(train), "val": pick(val), "test": pick(test)}
        if not d.path:
            raise UserError("data.dataset lm needs data.path: a .txt / .jsonl file, or a folder of train / valid / test files")
        path = Path(d.path).expanduser()
        files = split_files(path, "txt / .jsonl")
        if not files:
            fmt, rows = read_lm_file(path, d.format, d.text_column)
            return fmt, cap_splits(split_by_fraction(rows, d), d, "examples")
        read = {split: read_lm_file(file, d.format, d.text_column) for split, file in files.items()}
        formats = {split: fmt for split, (fmt, _) in read.items()}
        if len(set(formats.values())) > 1:
            raise UserError(f"{path}: the split files hold different formats ({formats}): give them one format, "
                            "or set data.format")
        return formats["train"], cap_splits({split: rows for split, (_, rows) in read.items()}, d, "examples")

    def generate_targets(self, model, rows: TokenizedLM, *, num_beams: int, num_return_sequences: int,
                         batch_size: int, device="cpu", max_new_tokens: int | None = None, sample: bool = False,
                         temperature: float = 1.0) -> list[dict]:
        """`distill generate`'s record of every row: the teacher's completions of its prompt (see lm_targets)."""
        return generate_completions(self, model, rows, num_beams=num_beams, num_return_sequences=num_return_sequences,
                                    batch_size=batch_size, device=device, sample=sample, temperature=temperature,
                                    max_new_tokens=max_new_tokens or self.recipe.data.max_length)

    def distill_rows(self, rows: TokenizedLM, data_cfg=None, teacher: str | None = None) -> TokenizedLM:
        """With data.targets (a `distill generate` folder of this teacher over these rows): each row's prompt with the
        teacher's completion (sequence-level KD); scratch keeps the data."""
        d = data_cfg or self.recipe.data
        if not d.targets:
            return rows
        from distill.generate import generated_targets

        return completion_rows(self, rows, generated_targets(self, rows, d, teacher))

    # ------------------------------------------------------------------ models
    def build_model(self, model_cfg, data, teacher: nn.Module | None = None) -> nn.Module:
        from distill.students.causal_lm import CausalLM, build_causal_lm, load_causal_lm

        tok, kind = self.tokenizer, model_cfg.kind
        ids = {"eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}
        if kind == "causal-lm":
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            model = build_causal_lm(model_cfg, len(tok), bos_id=start, **ids)
        elif kind == "hf":
            if not self.teacher_brings_tokenizer():
                raise UserError(f"model {model_cfg.path} was pretrained with its own tokenizer, but this run trains a new "
                                "one (the teacher brings none): set data.tokenizer to that model's folder, or distil from "
                                "a pretrained teacher that shares its tokenizer")
            model = load_causal_lm(model_cfg.path, len(tok), trust_remote_code=model_cfg.trust_remote_code, **ids)
            self.check_tokenizer(model_cfg.path, model)
        elif kind == "hf-shrink":
            model = CausalLM(self.shrunk(teacher, CausalLM, model_cfg), len(tok), **ids)
        else:
            raise UserError(f"model.kind {kind} is not a language model: use causal-lm (GPT-2 or Llama from a config), "
                            "hf (a pretrained causal LM) or hf-shrink (the teacher with fewer layers)")
        limit = model.max_positions
        if limit is not None and limit < self.recipe.data.max_length:
            raise UserError(f"model.kind {kind} takes at most {limit} positions but data.max_length is "
                            f"{self.recipe.data.max_length}: lower data.max_length or raise the model's max_positions")
        return model

    def load_trained(self, model: nn.Module, folder: Path) -> nn.Module:
        from distill.students.causal_lm import CausalLM

        hf = type(model.hf).from_pretrained(folder)
        return CausalLM(hf, model.vocab_size, eos_id=model.eos_id, pad_id=model.pad_id)

    def check_compatible(self, teacher: nn.Module, student: nn.Module, data) -> None:
        """Same tokenizer, checked when the models are built; logits over its tokens, whatever the embedding rows."""
        super().check_compatible(teacher, student, data)
        rows = {role: getattr(m, "embedding_rows", None) for role, m in (("teacher", teacher), ("student", student))}
        if None not in rows.values() and len(set(rows.values())) > 1 and not self._said_aligned:
            self._said_aligned = True
            print(f"vocabulary: the teacher has {rows['teacher']} token embeddings and the student {rows['student']}; "
                  f"both read the same tokenizer, so their logits are compared over its {len(self.tokenizer)} tokens")

    # ------------------------------------------------------------------ scores
    def evaluate(self, model, data: TokenizedLM, *, device="cpu", batch_size: int = 16) -> dict:
        """Perplexity = exp(mean NLL per counted token) over `data`, with that NLL and the token accuracy."""
        by_length = data.subset(np.argsort(data.lengths(), kind="stable"))  # less padding; the mean is the same
        scores = token_scores(model, by_length, batch_size=batch_size, device=device)
        loss = scores["loss"]
        perplexity = math.exp(loss) if loss < 700 else float("inf")  # (exp overflows past ~709)
        return {"score": perplexity, "perplexity": perplexity, "loss": loss, "token_accuracy": scores["accuracy"],
                "tokens": scores["n"], "n": len(data)}

    def test_scores(self, model, data) -> dict:
        """evaluate's figures on the test split; for a model that generates, sampled continuations of the first
        test documents: the judge's (the teacher's) NLL per token of them, and a few of them as samples."""
        scores = self.evaluate(model, data.test)
        if not hasattr(model, "generate"):
            return scores
        prompts, references = self.sample_prompts(data.test_documents, self.judged_prompts)
        continuations = self.continue_prompts(model, prompts)
        if self.judge is not None:
            scores["teacher_nll"] = self.nll_of(self.judge, prompts, continuations)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
        scores["samples"] = [{"prompt": decode(p), "reference": decode(r), "continuation": decode(c)}
                             for p, r, c in list(zip(prompts, references, continuations))[: self.samples]]
        scores["new_tokens"] = self._budget()[1]
        return scores

    def _budget(self) -> tuple[int, int]:
        """(longest prompt, new tokens) of a continuation: both within data.max_length, which every model takes."""
        new = min(self.new_tokens, self.recipe.data.max_length // 2)
        return self.recipe.data.max_length - new, new

    def sample_prompts(self, rows: TokenizedLM, n: int) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, the tokens that follow them) of the first n rows: a row's prompt (when longer than the budget,
        its last tokens), or for plain text its first prompt_tokens tokens (at most the budget)."""
        longest, new = self._budget()
        prompts, references = [], []
        for i in range(min(n, len(rows))):
            ids, start = rows.ids[i], rows.starts[i]
            cut = prompt_end(ids, start, min(self.prompt_tokens, longest))
            prompts.append(ids[max(0, cut - longest) : cut])
            references.append(ids[cut : cut + new])
        return prompts, references

    def continue_prompts(self, model, prompts: list[list[int]], batch_size: int = 16) -> list[list[int]]:
        """Sampled continuations (temperature 1, seeded: every model continues the same prompts from the same seed)."""
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.sample_seed)
            for start in range(0, len(prompts), batch_size):
                input_ids, attention_mask = pad_rows(prompts[start : start + batch_size], self.tokenizer.pad_token_id)
                new = model.generate({"input_ids": input_ids, "attention_mask": attention_mask},
                                     max_new_tokens=self._budget()[1], do_sample=True)
                out += [row.tolist() for row in new]
        return out

    def nll_of(self, judge: nn.Module, prompts: list[list[int]], continuations: list[list[int]]) -> float:
        """The judge's mean NLL per token of the continuations, each read after its prompt."""
        rows = TokenizedLM([p + c for p, c in zip(prompts, continuations)], [len(p) for p in prompts],
                           self.tokenizer.pad_token_id)
        return token_scores(judge, rows, batch_size=self.inference_batch)["loss"]

    def timed(self, model: nn.Module) -> nn.Module:
        """Latency of a language model is that of greedy generation of a fixed number of new tokens."""
        return _GreedyGeneration(model, self._budget()[1]) if hasattr(model, "generate") else model

    def latency_inputs(self, data, batch_size: int):
        """The prompt of the test document nearest the median length, repeated."""
        lengths = data.test_documents.lengths()
        typical = int(np.argsort(lengths, kind="stable")[len(lengths) // 2])
        prompts, _ = self.sample_prompts(data.test_documents.subset([typical]), 1)
        input_ids, attention_mask = pad_rows(prompts * batch_size, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class _GreedyGeneration(nn.Module):
    def __init__(self, model: nn.Module, new_tokens: int):
        super().__init__()
        self.model, self.new_tokens = model, new_tokens

    def forward(self, inputs):  # exactly new_tokens each time: an early </s> would make the timing meaningless
        return self.model.generate(inputs, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens)
