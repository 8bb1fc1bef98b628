"""How long training lasts and how the learning rate moves: epochs, optimiser steps, warm-up and decay.

An optimiser step is `train.grad_accum` batches (the last step of an epoch may have fewer). `train.max_steps`
fixes the length in steps (LLM runs); otherwise `train.epochs`, or the default 20 epochs raised until training
takes `train.min_steps` steps, so small data sets get enough updates.
"""

import logging
import math
from dataclasses import dataclass

import torch

from distill.errors import UserError

log = logging.getLogger("distill")
DEFAULT_EPOCHS = 20  # when train.epochs is not set ...
DEFAULT_MIN_STEPS = 1000  # ... raised until training takes this many steps (see resolve_epochs)
UNBOUNDED_EPOCHS = 10**9  # max_steps over data of unknown length: passes until the steps are done


@dataclass(frozen=True)
class Plan:
    epochs: int
    steps_per_epoch: int | None  # optimiser steps in one pass, None when the data does not tell its length
    total_steps: int | None  # None: epochs of unknown length


def optimiser_steps(batches: int | None, grad_accum: int) -> int | None:
    return None if batches is None else -(-batches // grad_accum)


def plan_training(cfg, batches_per_epoch: int | None, desc: str = "train", quiet: bool = False) -> Plan:
    """epochs and steps of a run: train.max_steps when set (epochs follow from it), else resolve_epochs. quiet: no
    log lines (a check before training plans it once more)."""
    steps = optimiser_steps(batches_per_epoch, cfg.grad_accum)
    if cfg.max_steps:
        epochs = math.ceil(cfg.max_steps / steps) if steps else UNBOUNDED_EPOCHS
        if cfg.epochs and cfg.epochs != epochs and not quiet:
            log.info("%s: train.max_steps=%d decides the length (%s epochs), not train.epochs=%d", desc, cfg.max_steps,
                     epochs if steps else "as many", cfg.epochs)
        return Plan(epochs, steps, cfg.max_steps)
    epochs = resolve_epochs(cfg, steps, desc, quiet)
    return Plan(epochs, steps, epochs * steps if steps else None)


def resolve_epochs(cfg, steps: int | None, desc: str = "train", quiet: bool = False) -> int:
    """Passes over the data: train.epochs when set, else DEFAULT_EPOCHS; then raised, when an epoch has `steps`
    optimisation steps, until training takes at least train.min_steps steps (default DEFAULT_MIN_STEPS when
    epochs is not set, none when it is). So small data sets get enough updates by default, and a recipe that
    sets its epochs trains exactly that long unless it also asks for min_steps."""
    epochs = cfg.epochs or DEFAULT_EPOCHS
    min_steps = cfg.min_steps if cfg.min_steps is not None else (0 if cfg.epochs else DEFAULT_MIN_STEPS)
    if min_steps and steps is None:
        if cfg.min_steps is not None:
            raise UserError(f"{desc}: train.min_steps={cfg.min_steps} needs the number of batches in an epoch, which this "
                            "IterableDataset does not give (no __len__): set train.epochs instead, or give it a __len__")
        return epochs
    if min_steps and steps:
        needed = math.ceil(min_steps / steps)
        if needed > epochs and not quiet:
            log.info("%s: %d epochs of %d steps, to reach train.min_steps=%d", desc, needed, steps, min_steps)
        epochs = max(epochs, needed)
    return epochs


def check_warmup(cfg, plan: Plan, desc: str = "train") -> int:
    """The warm-up's optimiser steps; refused when it lasts as long as the whole training (the learning rate would
    never reach train.lr, nor decay)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * (plan.steps_per_epoch or 0))
    if plan.total_steps is not None and warmup and warmup >= plan.total_steps:
        given = f"warmup_steps={cfg.warmup_steps}" if cfg.warmup_steps is not None else f"warmup_epochs={cfg.warmup_epochs}"
        raise UserError(f"{desc}: train.{given} is {warmup} warm-up steps, not shorter than the whole training "
                        f"({plan.total_steps} optimiser steps): shorten the warm-up or train longer")
    return warmup


def make_scheduler(optimizer, cfg, plan: Plan) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (train.warmup_steps, or warmup_epochs of steps), then constant / cosine / linear decay to zero
    at the last step, stepped once per optimiser step."""
    if plan.total_steps is None and (cfg.schedule != "constant" or cfg.warmup_epochs):
        raise UserError(f"train.schedule={cfg.schedule} / warmup_epochs={cfg.warmup_epochs} need the number of "
                        "batches in an epoch, which this IterableDataset does not give (no __len__): set "
                        "train.schedule=constant and warmup_epochs=0, or train.max_steps, or give the dataset a __len__")
    if cfg.warmup_epochs and plan.steps_per_epoch is None:
        raise UserError(f"train.warmup_epochs={cfg.warmup_epochs} needs the number of batches in an epoch, which this "
                        "IterableDataset does not give (no __len__): set train.warmup_steps instead")
    total = max(1, plan.total_steps or 1)
    warmup = check_warmup(cfg, plan, "train")
    schedule = cfg.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
