"""The training loop, on Hugging Face Accelerate: one loop for teachers, scratch students and distilled students.

What differs between them is the `method` (a loss for a batch); the loop only steps (train_step.py: gradient
accumulation, rows normalised over the step), validates after every epoch or every train.eval_every steps, keeps
the best weights on validation, stops early, and writes a resumable state from which a run continues at the exact
batch (schedule.py decides how long training lasts and the learning rate).
"""

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, send_to_device, set_seed
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler
from tqdm.auto import tqdm

from distill.batching import LengthGroupedBatches, row_lengths
from distill.checkpoint import load_model_file, write_safetensors
from distill.data.arrays import batch_collate
from distill.training_state import (
    gather_training_state,
    has_training_state,
    is_sharded,
    load_training_state,
    save_training_state,
)
from distill.errors import NonFiniteError, UserError
from distill.methods.base import Method
from distill.tasks.base import Task
from distill.schedule import make_scheduler, plan_training
from distill.tasks.classification import ClassificationTask
from distill.tracking import log_epoch
from distill.train_step import StepRunner, _feed_teacher, _is_cached

log = logging.getLogger("distill")


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    best_epoch: int = 0
    best_step: int | None = None  # with train.eval_every: the optimiser step of the best validation
    best_val_score: float = float("nan")  # the task's metric (accuracy, entity F1, ...) at the best epoch
    best_val_loss: float = float("nan")
    train_seconds: float = 0.0  # time in training steps, summed over epochs (validation excluded)
    student: nn.Module | None = None  # the trained model, holding the best epoch's weights (the last epoch's without validation)


def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None, trackers=(), tracking_dir=None) -> Accelerator:
    """One Accelerator per process (Accelerate keeps global state). GPU when present unless cpu=True.

    Under `accelerate launch` / torchrun this is data-parallel: DDP, or FSDP when Accelerate's config asks for it
    (Accelerate runs FSDP on GPUs only; DeepSpeed is not supported). batch_size is the GLOBAL batch: every
    process takes batch_size / num_processes rows of each batch (split_batches), so a recipe trains the same way
    on any number of processes. A last, incomplete batch is padded from the epoch's first rows (Accelerate's
    even_batches), the one difference from a single process."""
    if cpu is None:
        cpu = not torch.cuda.is_available()
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous not in (None, mixed_precision) and PartialState().num_processes == 1:
        # Accelerate keeps one global state per process; a later experiment in the same (single) process
        # with another precision, e.g. from the Python API or tests, needs that state rebuilt.
        AcceleratorState._reset_state()
    if _asked_for("DEEPSPEED"):
        raise UserError("the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED), which distill does not support: "
                        "use DDP or FSDP (accelerate config)")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, dataloader_config=DataLoaderConfiguration(split_batches=True),
                              log_with=list(trackers) or None, project_dir=tracking_dir)  # trackers: see tracking.py
    if _asked_for("FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        # Accelerate silently falls back to DDP when it cannot set FSDP up (it does so on GPUs only)
        raise UserError(f"the launch asks for FSDP (ACCELERATE_USE_FSDP) but Accelerate set up distributed type "
                        f"{accelerator.distributed_type.value}, as it runs FSDP on GPUs only: launch on GPUs, or "
                        "without FSDP (accelerate config) for DDP")
    check_engine(accelerator)
    return accelerator


def _asked_for(engine: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"  # set by `accelerate launch`


def several_processes() -> bool:
    """True inside a launch of two or more processes whose group is set up."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def end_distributed(wait: bool = True) -> None:
    """Tear the process group down before the process exits. Left to the interpreter's exit, or torn down while
    another process still works (the main one writing the run), the threads of a gloo group (seen with FSDP)
    can abort the process ("terminate called without an active exception") after all the work is done, and
    the launcher then reports a failure. wait: first let every process reach this point (not after an error,
    when the others may never arrive)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# what gloo says when the process at the other end of a collective has gone (seen on CPU; NCCL's words not collected)
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def peer_stopped(error: BaseException) -> UserError | None:
    """One line for a process whose collective failed because another process of the launch stopped first (e.g.
    its own check found NaN in its share of a batch and it exited with that line), or None. The checks run inside
    each process's forward, before the processes could agree, so the others learn of it only as a broken
    connection; their traceback would bury the one error that names the cause."""
    if not several_processes() or not any(s in str(error) for s in _PEER_GONE):
        return None
    return UserError(f"process {torch.distributed.get_rank()} lost contact with another process of this launch, "
                     "which stopped first: its error (above, or in its log) names the cause; fix that and run the "
                     "same command again (a run continues with --resume)")


def check_engine(accelerator: Accelerator) -> None:
    """distill trains under DDP and FSDP; other engines are refused rather than half-working."""
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(f"Accelerate is set up for {accelerator.distributed_type.value}, which distill does not support: "
                        "use DDP or FSDP (accelerate config)")
    if accelerator.gradient_accumulation_steps != 1:  # distill accumulates itself, normalising by the step's rows
        raise UserError(f"Accelerate is set up to accumulate gradients over {accelerator.gradient_accumulation_steps} "
                        "batches: set gradient_accumulation_steps 1 in Accelerate's config and train.grad_accum "
                        f"{accelerator.gradient_accumulation_steps} in the recipe (distill normalises by the rows of the step)")


def make_loader(data: Dataset | DataLoader, batch_size: int, generator: torch.Generator,
                group_by_length: bool = False) -> DataLoader:
    """Batches of `batch_size` rows from any map-style dataset (shuffled by `generator`, so an epoch's order depends
    on the seed and the epoch only), Subset, or IterableDataset (in its own order); a DataLoader is used as given.
    Datasets that gather a whole batch at once (__getitems__: distill's in-memory and text datasets) are collated
    by themselves; any other dataset's rows go through PyTorch's default collate. group_by_length: batches of rows
    of similar length (distill.batching), for datasets that give `lengths()` (distill's text datasets)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, collate_fn=batch_collate)
    lengths = row_lengths(data) if group_by_length else None
    if group_by_length and lengths is None:
        raise UserError("train.group_by_length needs rows of known length (distill's text datasets): set it to false")
    if lengths is not None:
        sampler = LengthGroupedBatches(lengths, batch_size, generator)
    else:
        sampler = BatchSampler(RandomSampler(data, generator=generator), batch_size, drop_last=False)
    return DataLoader(data, batch_sampler=sampler, collate_fn=batch_collate)


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    method: Method,
    train_data: Dataset | DataLoader,
    val_data,
    cfg,
    *,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
    progress: bool = True,
    task: Task | None = None,
) -> FitResult:
    """Train `model` with `method`'s loss under the TrainConfig `cfg`; return with the best-on-validation weights.

    state_dir: where a resumable checkpoint (model, optimizer, scheduler, RNG, position in the epoch, history) is
    written (see _Cadence, train.save_every); resume=True continues one at the exact batch. val_data=None keeps the
    last weights. task: what the batches and models are and how they are scored (default: in-memory (x, y)
    classification); its metric picks the best validation (after every epoch, or every train.eval_every steps)."""
    return _Training(model, method, train_data, val_data, cfg, seed=seed, accelerator=accelerator or make_accelerator(),
                     state_dir=state_dir, desc=desc, progress=progress, task=task or ClassificationTask()).run(resume)


def steps_per_epoch(loader: DataLoader) -> int | None:
    """Batches in one pass over `loader`, or None when its dataset does not tell (an IterableDataset without len)."""
    try:
        return len(loader)
    except TypeError:
        return None


def batch_groups(loader, size: int):
    """The loader's batches in lists of `size` (one optimiser step each); the last list of an epoch may be shorter."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


@dataclass
class _Position:
    """Where training is (what a resumable state stores besides the tensors) and the history row in progress."""

    step: int = 0  # optimiser steps done
    epochs_done: int = 0
    batch: int = 0  # batches of the epoch in progress done
    bad_rows: int = 0  # validations in a row without a better score (patience)
    stopped: bool = False
    loss_sum: torch.Tensor | float = 0.0  # of the row in progress: sums over its steps
    parts_sum: dict = field(default_factory=dict)
    row_steps: int = 0
    row_seconds: float = 0.0

    def add(self, loss, parts: dict, batches: int, seconds: float) -> None:
        self.step += 1
        self.batch += batches
        self.loss_sum = self.loss_sum + loss
        for k, v in parts.items():
            self.parts_sum[k] = self.parts_sum.get(k, 0.0) + v
        self.row_steps += 1
        self.row_seconds += seconds

    def row(self, epoch: int, scheduler, cfg, desc: str, by_steps: bool) -> dict:
        """The row's training figures (mean loss and loss terms per step); a non-finite loss stops training."""
        n = max(1, self.row_steps)
        train_loss = float(self.loss_sum) / n
        if not math.isfinite(train_loss):
            where = f"by step {self.step}" if by_steps else f"in epoch {epoch}"
            raise UserError(f"{desc}: the training loss became {train_loss} {where}; lower train.lr (now {cfg.lr}) "
                            "or set train.grad_clip")
        row = {"epoch": epoch, **({"step": self.step} if by_steps else {}), "train_loss": train_loss,
               "seconds": self.row_seconds, "lr": scheduler.get_last_lr()[0]}
        row.update({f"train_{k}": float(v) / n for k, v in self.parts_sum.items()})
        self.loss_sum, self.parts_sum, self.row_steps, self.row_seconds = 0.0, {}, 0, 0.0
        return row

    def saved(self) -> dict:
        return {"batch": self.batch, "bad_epochs": self.bad_rows, "stopped": self.stopped,
                "row": {"loss": float(self.loss_sum), "parts": {k: float(v) for k, v in self.parts_sum.items()},
                        "steps": self.row_steps, "seconds": self.row_seconds}}

    @classmethod
    def restored(cls, step: int, epochs_done: int, extra: dict) -> "_Position":
        row = extra.get("row") or {"loss": 0.0, "parts": {}, "steps": 0, "seconds": 0.0}  # (older states: none)
        return cls(step, epochs_done, extra.get("batch", 0), extra["bad_epochs"], bool(extra.get("stopped")),
                   torch.tensor(row["loss"], dtype=torch.float64),  # the sums are float64 (train_step)
                   {k: torch.tensor(v, dtype=torch.float64) for k, v in row["parts"].items()}, row["steps"],
                   row["seconds"])


class _Training:
    """One `fit`: the prepared model, optimizer and loader, the position, the best weights, and the steps."""

    def __init__(self, model, method, train_data, val_data, cfg, *, seed, accelerator, state_dir, desc, progress, task):
        self.method, self.seed, self.accelerator, self.desc, self.task = method, seed, accelerator, desc, task
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.val_data = _check_fit(method, val_data, cfg, accelerator, desc)
        set_seed(seed)  # dropout, jitter and any sampling in the method: the same seed gives the same run
        self.generator = torch.Generator()
        loader = make_loader(train_data, cfg.batch_size, self.generator, cfg.group_by_length)
        self.plan = plan_training(cfg, steps_per_epoch(loader), desc)
        self.cfg = cfg = cfg.model_copy(update={"epochs": self.plan.epochs})
        self.target = model  # what the caller gets back trained: under FSDP a plain module, as with one process
        self.model, self.optimizer, prepared_opt, self.loader = _prepare(model, method, loader, cfg, accelerator)
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        self.scheduler = make_scheduler(self.optimizer, cfg, self.plan)
        self.raw_model = accelerator.unwrap_model(self.model)
        self.trained = nn.ModuleDict({"student": self.raw_model, "method": method.modules})  # what a state holds
        self.steps = StepRunner.build(self.model, self.raw_model, method, cfg, accelerator, self.optimizer, prepared_opt,
                                      self.scheduler, task)
        self.result, self.best_state, self.pos = FitResult(), None, _Position()
        self.cadence = _Cadence(every_epoch=accelerator.num_processes > 1)
        self.bar = tqdm(total=self.plan.total_steps, desc=desc, leave=False,
                        disable=None if progress and accelerator.is_local_main_process else True)

    def run(self, resume: bool) -> FitResult:
        if resume and self.state_dir is not None and has_training_state(self.state_dir):
            self._resume()
        epoch = self.pos.epochs_done + 1
        while epoch <= self.plan.epochs and not self.pos.stopped:
            self._epoch(epoch)
            epoch += 1
        self.bar.close()
        if self.best_state is None and self.sharded:
            self.best_state = full_weights(self.raw_model)
        if self.best_state is not None:
            self.target.load_state_dict(self.best_state)
        self.result.student = self.target
        return self.result

    def _epoch(self, epoch: int) -> None:
        """The steps of one pass (from the saved batch when resumed in the middle); validation after it, or every
        train.eval_every steps; sets pos.stopped at the last step or on early stopping."""
        pos, cfg, plan = self.pos, self.cfg, self.plan
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)  # the order of epoch e depends only on (seed, e)
        self._train_mode()
        self.method.start_epoch(epoch)
        loader = _resumed(self.accelerator.skip_first_batches(self.loader, pos.batch)) if pos.batch else self.loader
        for batches in batch_groups(loader, cfg.grad_accum):
            t0 = time.perf_counter()
            try:
                loss, parts = self.steps.step(batches)
            except NonFiniteError as e:  # teacher outputs, cached outputs, inputs, a loss's targets, or the loss
                batch = pos.batch + 1 + getattr(e, "batch_in_step", 0)
                raise UserError(f"{self.desc}: step {pos.step + 1} (epoch {epoch}, batch {batch}): {e}") from None
            pos.add(loss, parts, len(batches), time.perf_counter() - t0)
            self.bar.update(1)
            last = plan.total_steps is not None and pos.step >= plan.total_steps
            pos.stopped |= last  # before any write: a state saved now says training is over
            if cfg.eval_every and (pos.step % cfg.eval_every == 0 or last):
                self._close_row(epoch, last)
                self._train_mode()
            elif cfg.save_every and pos.step % cfg.save_every == 0 and not last:
                self._save()  # every save_every steps, whatever the cadence
            if pos.stopped:
                break
        if not pos.stopped or not cfg.eval_every:
            pos.epochs_done, pos.batch = epoch, 0
        final = pos.stopped or epoch == plan.epochs
        if not cfg.eval_every or (final and pos.row_steps):
            self._close_row(epoch, final)

    def _train_mode(self) -> None:
        self.model.train()
        self.method.modules.train()

    def _close_row(self, epoch: int, last: bool) -> None:
        """Validate, keep the best weights, log the history row, decide early stopping, write the state if due."""
        pos, result = self.pos, self.result
        row = pos.row(epoch, self.scheduler, self.cfg, self.desc, by_steps=bool(self.cfg.eval_every))
        result.train_seconds += row["seconds"]
        improved = _validate(self.task, self.model, self.val_data, self.accelerator.device, row, result)
        if improved:
            self.best_state = full_weights(self.raw_model)
            pos.bad_rows = 0
        else:
            pos.bad_rows += 1
        result.history.append(row)
        _show_epoch(self.accelerator, self.bar, self.desc, row, self.task.metric)
        if self.cfg.patience is not None and pos.bad_rows >= self.cfg.patience:
            best = f"step {result.best_step}" if result.best_step is not None else f"epoch {result.best_epoch}"
            log.info("%s: early stop after %s (best %s)", self.desc, _when(row), best)
            pos.stopped = last = True
        self.cadence.best_changed |= improved
        if self.cadence.due(last=last):
            self._save()

    def _save(self) -> None:
        if self.state_dir is None:
            return
        with self.cadence.writing():
            gathered = gather_training_state(self.trained, self.optimizer) if self.sharded else None  # every process
            if self.accelerator.is_main_process:
                _save_state(self.state_dir, self.trained, self.optimizer, self.scheduler, self.pos, self.result,
                            self.best_state, self.cadence.best_changed, gathered)

    def _resume(self) -> None:
        """Load a resumable state into the model, optimizer, scheduler and RNG; the history into `result`; the
        position (epoch, batch, the row in progress) into `pos`; the best-on-validation weights."""
        saved = load_training_state(self.state_dir, model=self.trained, optimizer=self.optimizer, scheduler=self.scheduler)
        extra, result = saved["extra"], self.result
        result.history = extra["history"]
        result.best_epoch, result.best_step = extra["best_epoch"], extra.get("best_step")
        result.best_val_score = extra.get("best_val_score", extra.get("best_val_accuracy"))  # (older checkpoints)
        result.best_val_loss = extra.get("best_val_loss", float("nan"))
        result.train_seconds = extra["train_seconds"]
        self.pos = _Position.restored(saved["step"], saved["epoch"], extra)
        best = _best_path(self.state_dir)
        if result.history:  # a validation has happened (a state saved every N steps may come before the first)
            if not best.exists():  # written before the state: without it the best validation is lost
                raise UserError(f"{self.desc}: the checkpoint in {self.state_dir} has lost its best-on-validation "
                                f"weights {best}: put that file back, or start afresh without --resume")
            self.best_state = load_model_file(best)[0]
        self.bar.update(self.pos.step)
        log.info("%s: resumed after step %d (epoch %d, batch %d)", self.desc, self.pos.step, self.pos.epochs_done + 1,
                 self.pos.batch)


def _resumed(loader):
    """The batches of an epoch resumed in its middle. A DataLoader draws its iterator's base seed from the global
    RNG when the first batch is fetched; the uninterrupted run drew it at the start of the epoch, before the saved
    RNG state, so here that fetch must leave the RNG as restored (or every dropout mask after it would shift)."""
    batches = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(batches, None)
    if first is not None:
        yield first
        yield from batches


def _when(row: dict) -> str:
    return f"step {row['step']}" if "step" in row else f"epoch {row['epoch']}"


def _check_fit(method, val_data, cfg, accelerator, desc: str):
    """Refuse what cannot train before anything runs; return the validation data (None when it has no rows)."""
    if cfg.jitter and _is_cached(getattr(method, "teacher", None)):
        raise UserError(f"{desc}: train.jitter={cfg.jitter} with a cached teacher, whose outputs are of the un-jittered "
                        "inputs: set train.jitter=0 or use the live teacher")
    check_engine(accelerator)
    if cfg.batch_size % accelerator.num_processes:
        raise UserError(f"train.batch_size={cfg.batch_size} is the global batch and must divide evenly among the "
                        f"{accelerator.num_processes} processes: use a multiple of {accelerator.num_processes}")
    if val_data is not None and hasattr(val_data, "__len__") and len(val_data) == 0:
        return None  # no validation rows (val_fraction: 0): keep the last epoch's weights
    return val_data


def _prepare(model, method, loader, cfg, accelerator):
    """(prepared model, optimizer, Accelerate's optimizer, prepared loader), with the method's trainable parts built."""
    model.to(accelerator.device)
    # trainable parts of the method (regressors, peers), before the optimizer exists; a cached teacher gets
    # that batch's outputs first, so a feature method can read the cached layers' shapes
    first = send_to_device(next(iter(loader)), accelerator.device)
    _feed_teacher(getattr(method, "teacher", None), first, first[0])
    method.setup(model, first[0])
    method.modules.to(accelerator.device)
    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP shards a copy in place; its trained weights are gathered back into the caller's model at the end.
        # FSDP2 shards a model only together with an optimizer, whose parameters it swaps for their shards: that
        # one is thrown away, and the real one is built over the sharded parameters plus the method's own.
        model = copy.deepcopy(model)
        prepared_model, _ = accelerator.prepare(model, make_optimizer(model.parameters(), cfg))
        optimizer = make_optimizer(list(prepared_model.parameters()) + list(method.parameters()), cfg)
        return prepared_model, optimizer, accelerator.prepare_optimizer(optimizer), accelerator.prepare_data_loader(loader)
    optimizer = make_optimizer(list(model.parameters()) + list(method.parameters()), cfg)
    prepared_model, prepared_opt, prepared_loader = accelerator.prepare(model, optimizer, loader)
    return prepared_model, optimizer, prepared_opt, prepared_loader


def _validate(task, model, val_data, device, row: dict, result: FitResult) -> bool:
    """Score the epoch on the validation rows (into `row`); whether it is the best so far (then recorded in
    `result`). Without validation rows every epoch is the best: the last one is kept."""
    if val_data is not None:
        val = task.evaluate(model, val_data, device=device)
        row.update({f"val_{task.metric}": val["score"], "val_loss": val["loss"]})
        if result.history and not task.better(val["score"], result.best_val_score, val["loss"], result.best_val_loss):
            return False
    result.best_epoch, result.best_step = row["epoch"], row.get("step")
    result.best_val_score = row.get(f"val_{task.metric}", float("nan"))
    result.best_val_loss = row.get("val_loss", float("nan"))
    return True


def _show_epoch(accelerator, bar, desc: str, row: dict, metric: str) -> None:
    """The epoch's figures to the trackers (tracking.py), the progress bar and the log."""
    log_epoch(accelerator, desc, row)
    bar.set_postfix(epoch=row["epoch"], loss=f"{row['train_loss']:.4f}",
                    **{k: f"{row[k]:.4f}" for k in (f"val_{metric}",) if k in row})
    log.info("%s epoch %d: %s", desc, row["epoch"], {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})


class _Cadence:
    """When to write the resumable state: after the first and the last epoch, and otherwise once the time since the
    last write is at least COST_RATIO times what that write took, so writing costs at most ~1/COST_RATIO of the
    training time (epochs of a few milliseconds, a small table's, would otherwise spend 10x their time writing).
    A kill loses at most those epochs, and replaying them is deterministic. Under several processes every epoch is
    written (the processes must agree, and a gather under FSDP is collective)."""

    COST_RATIO = 10.0

    def __init__(self, every_epoch: bool):
        self.every_epoch = every_epoch
        self.write_seconds: float | None = None  # None: nothing written yet
        self.written_at = 0.0
        self.best_changed = False  # a better epoch since the last write: its weights go with the next one

    def due(self, last: bool) -> bool:
        if self.every_epoch or last or self.write_seconds is None:
            return True
        return time.perf_counter() - self.written_at >= self.COST_RATIO * self.write_seconds

    @contextlib.contextmanager
    def writing(self):
        start = time.perf_counter()
        yield
        self.written_at = time.perf_counter()
        self.write_seconds = self.written_at - start
        self.best_changed = False


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights as full tensors. Under FSDP the shards are gathered: a collective that
    every process runs, and every process gets the whole state."""
    if not is_sharded(model):
        return copy.deepcopy(model.state_dict())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: t.detach().clone() for name, t in state.items()}


def _best_path(state_dir) -> Path:
    # beside the state folder, not inside it: save_training_state replaces that folder whole
    return Path(state_dir).parent / f"{Path(state_dir).name}.best.safetensors"


def _save_state(state_dir, model, optimizer, scheduler, pos: _Position, result: FitResult, best_state, improved: bool,
                gathered):
    if improved and best_state is not None:
        # best weights first: a kill between the two writes leaves the older state, and replaying those steps
        # (deterministic) writes the same best weights again
        Path(state_dir).parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(_best_path(state_dir), best_state, None, "best weights")  # tied weights: one copy per name
    extra = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "best_val_score": result.best_val_score,
        "best_val_loss": result.best_val_loss,
        "train_seconds": result.train_seconds,
        **pos.saved(),
    }
    save_training_state(state_dir, model=model, optimizer=optimizer, scheduler=scheduler, step=pos.step,
                        epoch=pos.epochs_done, extra=extra, gathered=gathered)
