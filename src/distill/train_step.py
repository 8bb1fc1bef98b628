"""One optimiser step: `train.grad_accum` batches, their losses normalised by the rows of the whole step.

A method's loss is a mean over the rows of its batch (images, sentences, or the counted tokens of a tagger, a
translation or a language model). Batches of one step, and the shares of the processes under DDP, can hold
different numbers of rows (padding, completion lengths, the last batch of an epoch). So that a step's gradient is
that of the mean over ALL its rows, as if they were one batch on one process, batch i on process p is weighted by

    w_ip = P · n_ip / N,   N = Σ_i Σ_p n_ip   (P processes; DDP then averages the gradients over P)

which is 1 for one process and one batch per step. The weights are computed once per step from every batch's row
count (one all-reduce), before any backward pass.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from distill.errors import NonFiniteError, UserError
from distill.finite import check_inputs
from distill.methods.base import Method
from distill.tasks.classification import random_shift


@dataclass
class StepRunner:
    """What one optimisation step needs; `step(batches)` runs one."""

    model: nn.Module
    method: Method
    cfg: object
    accelerator: Accelerator
    stepper: object  # the optimizer, or Accelerate's wrapper of it when fp16 loss scaling needs it
    scheduler: object
    params: list  # what gradient clipping sees: the student's and the method's parameters
    constrain: object  # the model's weight constraint after each step, or None
    autocast: object
    weigh_rows: bool  # weight each batch by its share of the step's rows (see the module docstring)

    @classmethod
    def build(cls, prepared_model, raw_model, method, cfg, accelerator, optimizer, prepared_opt, scheduler, task):
        params = list(prepared_model.parameters()) + list(method.parameters())
        # examples own different numbers of label rows (a tagger's words, a sentence's tokens), or a step spans
        # several batches: weigh each by its share of the step's rows
        weigh_rows = cfg.grad_accum > 1 or (task.variable_rows and accelerator.num_processes > 1)
        constrain = getattr(raw_model, "apply_constraints", None)
        # Accelerate's optimizer wrapper and autocast only matter for fp16 loss scaling and mixed precision; the
        # wrapper's step also looks up optional packages on every call, about 0.4 ms a batch, so without them the
        # loop steps the optimizer itself (and accumulates by calling backward per batch before one step).
        stepper = prepared_opt if accelerator.scaler is not None else optimizer
        autocast = accelerator.autocast if accelerator.mixed_precision != "no" else contextlib.nullcontext
        return cls(prepared_model, method, cfg, accelerator, stepper, scheduler, params, constrain, autocast, weigh_rows)

    def step(self, batches: list) -> tuple[torch.Tensor, dict]:
        """One optimiser step over `batches`; (the step's loss, its named parts), detached."""
        method, accelerator = self.method, self.accelerator
        batches = [method.sample_batch(self.model, b) for b in batches]  # on-policy: the student's own sequences
        weights = self._weights([b[1] for b in batches]) if self.weigh_rows else [None] * len(batches)
        loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)  # logged: exact sums
        parts_sum: dict[str, torch.Tensor] = {}
        for i, (batch, w) in enumerate(zip(batches, weights)):
            try:
                loss, parts = self._batch(batch, w, last=i == len(batches) - 1)
            except NonFiniteError as e:
                e.batch_in_step = i  # the loop names the batch of the epoch
                raise
            loss_sum += loss.detach()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64)
        if accelerator.num_processes > 1:
            _average_gradients(method.parameters(), accelerator)
        if self.cfg.grad_clip:
            accelerator.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.stepper.step()
        self.scheduler.step()
        self.stepper.zero_grad(set_to_none=True)
        if self.constrain is not None:
            self.constrain()
        return loss_sum, parts_sum  # (several batches are always weighted: their weights sum to 1 over the step)

    def _batch(self, batch, w, last: bool) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one batch of the step; (its loss, its parts), weighted by w (None: 1)."""
        method, accelerator = self.method, self.accelerator
        x, y = batch[0], batch[1]
        check_inputs(x)  # NonFiniteError, as from the teacher's outputs and the losses' targets
        _feed_teacher(getattr(method, "teacher", None), batch, x)
        if self.cfg.jitter:
            x = random_shift(x, self.cfg.jitter)
        # DDP all-reduces gradients in backward: only in the step's last backward, the others accumulate
        with contextlib.nullcontext() if last else accelerator.no_sync(self.model):
            with self.autocast():
                loss, parts = method(self.model, x, y)
            value = loss.detach()
            if value.device.type == "cpu" and not math.isfinite(value):  # free on CPU; elsewhere per history row
                raise NonFiniteError(f"the training loss became {float(value)}; lower train.lr (now {self.cfg.lr}) "
                                     "or set train.grad_clip")
            if w is not None:
                loss = loss * w.to(loss.dtype)
                parts = {k: v * w.to(v.dtype) for k, v in parts.items()}
            accelerator.backward(loss)
        return loss, parts

    def _weights(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """w_i = P · n_i / N for this process's batches (module docstring)."""
        rows = torch.tensor([float(y.shape[0]) for y in ys], device=self.accelerator.device, dtype=torch.float64)
        total = rows.sum()
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total.clone(), reduction="sum")
        return [r * self.accelerator.num_processes / total.clamp_min(1.0) for r in rows]


def _average_gradients(params, accelerator: Accelerator) -> None:
    """DDP averages the student's gradients across processes during backward; a method's own trainable parts
    (hint regressors, peer students) are called outside the DDP wrapper, so average theirs here."""
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def _is_cached(teacher) -> bool:
    return callable(getattr(teacher, "feed", None))  # distill.signals.cache.CachedTeacher


def _feed_teacher(teacher, batch, x) -> None:
    """Batches are (x, y) or, from a CachedDataset, (x, y, teacher_logits, extras): hand those outputs to the
    cached teacher before the method asks it about x."""
    if len(batch) == 4 and _is_cached(teacher):
        teacher.feed(batch[2], inputs=x, **batch[3])
    elif _is_cached(teacher):
        raise UserError("the method's teacher is a CachedTeacher but the training batches carry no teacher logits: "
                        "train on CachedDataset(data, cache)")
    elif len(batch) == 4 and teacher is not None:
        raise UserError("the training batches carry cached teacher logits but the method's teacher is live: "
                        "build the method with CachedTeacher() or train on the plain dataset")
