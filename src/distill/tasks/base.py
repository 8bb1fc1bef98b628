"""What a task is: the few things that differ between workloads, so the loop, methods, signals and report stay one.

A batch is `(inputs, y)`: `inputs` is whatever the task's models take (an image tensor, or a dict of tensors such
as input_ids / attention_mask / word_mask), `y` the integer labels of the rows that count, -1 for an unlabelled
row. A model of the task maps `inputs` to logits of exactly those rows, [N, C], in the order of `y`: one row per
image or sentence, or one row per counted token (padding, special tokens and sub-word continuations never count,
so they never reach a loss). Every method of the zoo works on those rows unchanged.

A task decides
  - how data becomes such batches (its datasets collate themselves with `__getitems__`, see distill.data.text),
  - how models are built, loaded and saved for it (model kinds that fit it, the teacher's tokenizer),
  - the metric and which value of it is best (`evaluate`, `metric`, `greater_is_better`),
  - the example input whose latency the report measures (`latency_inputs`),
  - whether inputs are continuous (methods that perturb or differentiate inputs need that).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn


class Task(ABC):
    name: ClassVar[str]
    metric: ClassVar[str]  # the score that picks the best epoch, reported as `metric` in results.json
    greater_is_better: ClassVar[bool] = True
    continuous_inputs: ClassVar[bool] = False  # inputs are float tensors that may be jittered or differentiated
    inference_batch: ClassVar[int] = 1024  # rows per forward pass when a model is only evaluated or cached
    variable_rows: ClassVar[bool] = False  # examples own different numbers of label rows (a tagger's words)
    # a model that scores the others' generated text in test_scores (a causal LM's teacher judges the students'
    # samples); the runner sets it to the teacher before the final evaluation, None: not scored
    judge: nn.Module | None = None

    @abstractmethod
    def evaluate(self, model: nn.Module, data, *, device="cpu", batch_size: int = 256) -> dict:
        """{"score": the metric's value, METRIC: same, "loss": mean cross-entropy, "n": rows or words counted, ...}"""

    @abstractmethod
    def latency_inputs(self, data, batch_size: int) -> Any:
        """Inputs of `batch_size` copies of one typical test example, for latency and throughput."""

    def test_scores(self, model: nn.Module, data) -> dict:
        """The final evaluation on the test split: evaluate's figures, plus whatever the task reports only once
        (translation: beam-search BLEU, decoding speed, sample translations)."""
        return self.evaluate(model, data.test)

    def distill_rows(self, rows, data_cfg=None, teacher: str | None = None):
        """The rows the distilled students learn from (translation: the teacher's generated targets in the folder
        data_cfg.targets, default the recipe's data section, written by the teacher saved at `teacher`); the
        scratch student keeps `rows`."""
        return rows

    def timed(self, model: nn.Module) -> nn.Module:
        """What latency and throughput time: the model's forward pass (translation: greedy decoding)."""
        return model

    def baseline_score(self, data) -> float | None:
        """The test score of a model that always answers the training split's most common label (None: not
        meaningful for this metric). A trained model at or below it has learnt nothing usable."""
        return None

    def supervised_rows(self, rows):
        """The rows a model trained without a teacher learns from (the teacher, the scratch student)."""
        return rows

    tie_break_on_loss: ClassVar[bool] = False  # an equal score with a lower validation loss counts as better

    def better(self, score: float, best: float, loss: float = float("nan"), best_loss: float = float("nan")) -> bool:
        """Whether an epoch with this validation score beats the best so far. An equal score counts as better (the
        later epoch is kept): on a small validation split (a 150-row table has 15 rows) the best score is often
        first reached by a barely trained epoch, and the later epochs that tie with it have trained longer."""
        if score == best:
            # tie_break_on_loss: e.g. entity F1 stuck at 0 while a tagger still learns to predict "O"
            return loss < best_loss if self.tie_break_on_loss else True
        return score > best if self.greater_is_better else score < best
