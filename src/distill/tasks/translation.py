"""Translation: encoder-decoder models, word-level KD on teacher-forced target tokens, BLEU / chrF with sacrebleu.

Data: `en-es` (../shared/data/en-es: train / valid / test .tsv.gz with review id, English, Spanish; split by review)
or `parallel` (a user's folder of train / valid / test files, or one file split by val_fraction / test_fraction:
TSV / JSONL with data.source_column / data.target_column, or data.path + data.target_path aligned text files).
The tokenizer is a byte-level BPE trained on the training pairs (data.vocab_size) unless the teacher brings one; it
is saved with every model. Models: `seq2seq` (a Marian transformer from a config) or `hf` (a pretrained seq2seq
folder or hub id). The best epoch is the one with the highest greedy BLEU on the validation rows; the test report
adds beam-search BLEU and chrF, decoding speed and sample translations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distill.data.parallel import TokenizedPairs, read_pairs, tokenize_pairs, train_tokenizer
from distill.data.splits import SPLIT_FILES, cap_splits, split_by_fraction, split_files
from distill.errors import UserError
from distill.tasks.classification import evaluate as token_scores
from distill.tasks.text import TextTask

EN_ES_COLUMNS = (1, 2)  # review id, English, Spanish


@dataclass
class PairSplits:
    name: str
    train: TokenizedPairs
    val: TokenizedPairs
    test: TokenizedPairs
    num_classes: int  # the target vocabulary: one "class" per token
    class_names: list[str]
    token_level: bool = True


class TranslationTask(TextTask):
    name = "translation"
    metric = "bleu"
    token_level = True
    variable_rows = True  # a sentence owns as many label rows as its target has tokens
    inference_batch = 64
    folder_kinds = ("hf", "seq2seq")
    num_beams = 5  # Kim & Rush decode with beam 5
    samples = 5  # sample translations in the report

    # ------------------------------------------------------------------ data and tokenizer
    def load_data(self) -> PairSplits:
        d = self.recipe.data
        pairs = self._read_splits()
        if self._tokenizer is None and not self.teacher_brings_tokenizer():
            self._tokenizer = train_tokenizer([s for p in pairs["train"] for s in p], d.vocab_size)
        start = self._decoder_start()
        splits = {name: tokenize_pairs(self.tokenizer, rows, d.max_length, start) for name, rows in pairs.items()}
        return PairSplits(d.dataset, splits["train"], splits["val"], splits["test"], len(self.tokenizer), [])

    def _decoder_start(self) -> int:
        return self.tokenizer.pad_token_id  # Marian's decoder_start_token_id; a pretrained model's config may differ

    def _read_splits(self) -> dict[str, list[tuple[str, str]]]:
        d = self.recipe.data
        if d.dataset == "en-es":
            from distill.data import resolve_data_dir

            base = Path(d.path).expanduser() if d.path else resolve_data_dir(d.data_dir) / "en-es"
            read = lambda name: read_pairs(base / f"{name}.tsv.gz", source_column=EN_ES_COLUMNS[0],  # noqa: E731
                                           target_column=EN_ES_COLUMNS[1])
            pairs = {split: read(file) for split, file in SPLIT_FILES.items()}
        else:
            pairs = self._read_user_pairs()
        return cap_splits(pairs, d, "sentence pairs")

    def _read_user_pairs(self) -> dict[str, list[tuple[str, str]]]:
        d = self.recipe.data
        if not d.path:
            raise UserError("data.dataset parallel needs data.path: a folder of train / valid / test files, or one "
                            ".tsv / .jsonl file, or a source text file with data.target_path")
        path = Path(d.path).expanduser()
        columns = {"source_column": d.source_column, "target_column": d.target_column}
        files = split_files(path, "tsv / .jsonl")
        if files:
            return {split: read_pairs(file, **columns) for split, file in files.items()}
        rows = read_pairs(path, target_path=d.target_path, **columns) if d.target_path else read_pairs(path, **columns)
        return split_by_fraction(rows, d)

    def distill_rows(self, rows: TokenizedPairs, data_cfg=None, teacher: str | None = None) -> TokenizedPairs:
        """With data.targets (a `distill generate` folder of this teacher over these rows): the same sources with
        the teacher's translations as targets (sequence-level KD), or the k-best closest to the reference by
        sentence BLEU (data.target_choice: closest, sequence-level interpolation)."""
        d = data_cfg or self.recipe.data
        if not d.targets:
            return rows
        from distill.generate import generated_targets

        targets = generated_targets(self, rows, d, teacher)
        generated = tokenize_pairs(self.tokenizer, list(zip(rows.source_texts, targets)), d.max_length, rows.start_id)
        return TokenizedPairs(rows.sources, generated.targets, rows.pad_id, rows.start_id,
                              source_texts=rows.source_texts, references=targets)

    # ------------------------------------------------------------------ models
    def build_model(self, model_cfg, data, teacher: nn.Module | None = None) -> nn.Module:
        from distill.students.seq2seq import Seq2SeqModel, build_marian

        if model_cfg.kind == "seq2seq":
            tok = self.tokenizer
            return build_marian(model_cfg, self._saved_vocab or len(tok), tok.pad_token_id, tok.eos_token_id)
        if model_cfg.kind == "hf":
            from transformers import AutoModelForSeq2SeqLM

            from distill.students.hf import resolve_model_path

            path = resolve_model_path(model_cfg.path)
            try:
                hf = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
            except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a config.json that the weights do not match
                raise UserError(f"model {model_cfg.path} is not a seq2seq model transformers can load "
                                f"({str(e).splitlines()[0][:150]}): give a translation model's folder or hub id") from None
            model = Seq2SeqModel(hf)
            self.check_tokenizer(model_cfg.path, model)
            return model
        raise UserError(f"model.kind {model_cfg.kind} does not translate: use seq2seq (a Marian transformer from a "
                        "config) or hf (a pretrained seq2seq model)")

    def load_trained(self, model: nn.Module, folder: Path) -> nn.Module:
        from distill.students.seq2seq import Seq2SeqModel

        return Seq2SeqModel(type(model.hf).from_pretrained(folder))

    def load_model(self, folder: str, data) -> nn.Module:
        from distill.students import model_config_adapter
        from distill.students.hf import HFConfig
        from distill.tasks.text import RECORD, read_record

        if not (Path(folder) / RECORD).is_file():
            return self.build_model(HFConfig(path=folder), data)
        record = read_record(folder)
        if record.get("task") != self.name:
            raise UserError(f"{folder} is a {record.get('task')} model but this recipe is a {self.name} task: "
                            "use a model trained for this task")
        model_config_adapter.validate_python(record["model"])
        model = self.build_model(HFConfig(path=folder), data)
        rows = model.hf.get_input_embeddings().weight.shape[0]
        if rows != len(self.tokenizer):  # distill trains a model's embeddings on exactly its tokenizer's vocabulary
            raise UserError(f"{folder} has {rows} token embeddings but the tokenizer ({self.tokenizer_path()}) has "
                            f"{len(self.tokenizer)} tokens: use the tokenizer the model was trained with (saved in its folder)")
        return model

    # ------------------------------------------------------------------ scores
    def evaluate(self, model, data, *, device="cpu", batch_size: int = 64) -> dict:
        """Greedy BLEU and chrF on `data` (picks the best epoch), with the teacher-forced token cross-entropy and
        token accuracy."""
        scores = token_scores(model, data, batch_size=batch_size, device=device)
        hypotheses = self.translate(model, data, num_beams=1, device=device, batch_size=batch_size)
        bleu, chrf = corpus_scores(hypotheses, data.references)
        return {"score": bleu, "bleu": bleu, "chrf": chrf, "loss": scores["loss"],
                "token_accuracy": scores["accuracy"], "n": len(data)}

    def test_scores(self, model, data) -> dict:
        scores = self.evaluate(model, data.test)
        t0 = time.perf_counter()
        beam = self.translate(model, data.test, num_beams=self.num_beams)
        beam_seconds = time.perf_counter() - t0
        scores["bleu_beam"], scores["chrf_beam"] = corpus_scores(beam, data.test.references)
        scores["beam"] = self.num_beams
        scores["beam_sentences_per_s"] = len(beam) / beam_seconds
        scores["samples"] = [{"source": data.test.source_texts[i], "reference": data.test.references[i], "beam": beam[i]}
                             for i in range(min(self.samples, len(beam)))]
        return scores

    def generate_targets(self, model, rows: TokenizedPairs, *, num_beams: int, num_return_sequences: int,
                         batch_size: int, device="cpu", max_new_tokens: int | None = None, sample: bool = False,
                         temperature: float = 1.0) -> list[dict]:
        """`distill generate`'s record of every row: its source, reference and the k best beam translations."""
        if sample:
            raise UserError("generate.sample applies to language models: translations are decoded by beam search; "
                            "remove it")
        hypotheses = self.translate(model, rows, num_beams=num_beams, num_return_sequences=num_return_sequences,
                                    batch_size=batch_size, device=device, max_new_tokens=max_new_tokens)
        return [{"source": rows.source_texts[i], "reference": rows.references[i], "hypotheses": hyps}
                for i, hyps in enumerate(hypotheses)]

    @torch.inference_mode()
    def translate(self, model, data: TokenizedPairs, *, num_beams: int, num_return_sequences: int | None = None,
                  device="cpu", batch_size: int = 64, max_new_tokens: int | None = None) -> list:
        """Detokenized translations of every source of `data`, in order (batches sorted by length: less padding),
        each at most max_new_tokens (default data.max_length); with num_return_sequences k, a list of the k best per
        source."""
        model = getattr(model, "module", model)  # validation under DDP: decode with the wrapped model itself
        order = sorted(range(len(data)), key=lambda i: len(data.sources[i]))
        k = num_return_sequences or 1
        out: list = [""] * len(data)
        limit = max_new_tokens or self.recipe.data.max_length
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs, _ = data.__getitems__(idx)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            ids = model.translate(inputs, num_beams=num_beams, max_new_tokens=limit, num_return_sequences=k)
            texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            for j, i in enumerate(idx):
                out[i] = texts[j * k : (j + 1) * k] if num_return_sequences else texts[j]
        return out

    def timed(self, model: nn.Module) -> nn.Module:
        """Latency and throughput of a translation model are of greedy decoding, not of one teacher-forced pass."""
        return _GreedyDecoding(model, self.recipe.data.max_length)

    def latency_inputs(self, data, batch_size: int):
        lengths = [len(r) for r in data.test.sources]
        typical = sorted(range(len(lengths)), key=lambda i: lengths[i])[len(lengths) // 2]
        inputs, _ = data.test.__getitems__([typical] * batch_size)
        return inputs


class _GreedyDecoding(nn.Module):
    def __init__(self, model: nn.Module, max_new_tokens: int):
        super().__init__()
        self.model, self.max_new_tokens = model, max_new_tokens

    def forward(self, inputs):
        return self.model.translate(inputs, num_beams=1, max_new_tokens=self.max_new_tokens)


def corpus_scores(hypotheses: list[str], references: list[str]) -> tuple[float, float]:
    """(BLEU, chrF) of the corpus, sacrebleu's defaults (13a tokenisation, one reference), in points 0-100."""
    import sacrebleu

    return (sacrebleu.corpus_bleu(hypotheses, [references]).score, sacrebleu.corpus_chrf(hypotheses, [references]).score)
