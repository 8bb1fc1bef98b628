"""The training loop, on Hugging Face Accelerate: one loop for teachers, scratch students and distilled students.

What differs between them is the `method` (a loss for a batch); the loop only steps, validates, keeps
the best weights on validation, stops early, and writes a resumable checkpoint after every epoch.
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

from distill.checkpoint import load_model_file, write_safetensors
from distill.data.arrays import batch_collate
from distill.training_state import (
    gather_training_state,
    has_training_state,
    is_sharded,
    load_training_state,
    save_training_state,
)
from distill.errors import UserError
from distill.methods.base import Method
from distill.tasks.base import Task
from distill.tasks.classification import ClassificationTask, random_shift
from distill.tracking import log_epoch

log = logging.getLogger("distill")
DEFAULT_EPOCHS = 20  # when train.epochs is not set ...
DEFAULT_MIN_STEPS = 1000  # ... raised until training takes this many steps (see resolve_epochs)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    best_epoch: int = 0
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


def check_engine(accelerator: Accelerator) -> None:
    """distill trains under DDP and FSDP; other engines are refused rather than half-working."""
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(f"Accelerate is set up for {accelerator.distributed_type.value}, which distill does not support: "
                        "use DDP or FSDP (accelerate config)")
    if accelerator.gradient_accumulation_steps != 1:  # the loop steps on every batch
        raise UserError(f"Accelerate is set up to accumulate gradients over {accelerator.gradient_accumulation_steps} "
                        "batches, which distill's loop does not do: set gradient_accumulation_steps 1 and a larger "
                        "train.batch_size")


def make_loader(data: Dataset | DataLoader, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Batches of `batch_size` rows from any map-style dataset (shuffled by `generator`, so an epoch's order depends
    on the seed and the epoch only), Subset, or IterableDataset (in its own order); a DataLoader is used as given.
    Datasets that gather a whole batch at once (__getitems__: distill's in-memory and text datasets) are collated
    by themselves; any other dataset's rows go through PyTorch's default collate."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, collate_fn=batch_collate)
    sampler = BatchSampler(RandomSampler(data, generator=generator), batch_size, drop_last=False)
    return DataLoader(data, batch_sampler=sampler, collate_fn=batch_collate)


def steps_per_epoch(loader: DataLoader) -> int | None:
    """Batches in one pass over `loader`, or None when its dataset does not tell (an IterableDataset without len)."""
    try:
        return len(loader)
    except TypeError:
        return None


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def resolve_epochs(cfg, steps: int | None, desc: str = "train") -> int:
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
        if needed > epochs:
            log.info("%s: %d epochs of %d steps, to reach train.min_steps=%d", desc, needed, steps, min_steps)
            epochs = needed
    return epochs


def make_scheduler(optimizer, cfg, steps_per_epoch: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant / cosine / linear decay to zero, stepped once per batch."""
    if steps_per_epoch is None:
        if cfg.schedule != "constant" or cfg.warmup_epochs:
            raise UserError(f"train.schedule={cfg.schedule} / warmup_epochs={cfg.warmup_epochs} need the number of "
                            "batches in an epoch, which this IterableDataset does not give (no __len__): set "
                            "train.schedule=constant and warmup_epochs=0, or give the dataset a __len__")
        steps_per_epoch = 1
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
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

    state_dir: where a resumable checkpoint (model, optimizer, scheduler, RNG, epoch, history) is written (see
    _Cadence); resume=True continues one. val_data=None keeps the last weights. task: what the batches and models
    are and how they are scored (default: in-memory (x, y) classification); its metric picks the best epoch."""
    task = task or ClassificationTask()
    accelerator = accelerator or make_accelerator()
    val_data = _check_fit(method, val_data, cfg, accelerator, desc)
    set_seed(seed)  # dropout, jitter and any sampling in the method: the same seed gives the same run
    generator = torch.Generator()
    loader = make_loader(train_data, cfg.batch_size, generator)
    cfg = cfg.model_copy(update={"epochs": resolve_epochs(cfg, steps_per_epoch(loader), desc)})
    target = model  # what the caller gets back trained: under FSDP a plain module, as with one process
    prepared_model, optimizer, prepared_opt, prepared_loader = _prepare(model, method, loader, cfg, accelerator)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch(loader))
    raw_model = accelerator.unwrap_model(prepared_model)
    trained = nn.ModuleDict({"student": raw_model, "method": method.modules})  # what a checkpoint holds

    result = FitResult()
    best_state = None
    start_epoch, step, bad_epochs = 1, 0, 0
    if resume and state_dir is not None and has_training_state(state_dir):
        start_epoch, step, bad_epochs, best_state = _resume(state_dir, trained, optimizer, scheduler, result, cfg, desc)

    loop = _Loop.build(prepared_model, raw_model, method, cfg, accelerator, optimizer, prepared_opt, scheduler, task)
    total_steps = cfg.epochs * (steps_per_epoch(loader) or 0) or None  # None: an IterableDataset of unknown length
    cadence = _Cadence(every_epoch=accelerator.num_processes > 1)
    bar = loop.bar = tqdm(total=total_steps, initial=min(step, total_steps or step), desc=desc, disable=None if progress and accelerator.is_local_main_process else True, leave=False)
    for epoch in range(start_epoch, cfg.epochs + 1):
        generator.manual_seed(seed * 1_000_003 + epoch)  # the shuffle of epoch e depends only on (seed, e): resumable
        prepared_model.train()
        method.modules.train()
        method.start_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, parts_sum, n_batches = loop.epoch(prepared_loader)
        step += n_batches
        row = _epoch_row(epoch, loss_sum, parts_sum, n_batches, time.perf_counter() - t0, scheduler, cfg, desc)
        result.train_seconds += row["seconds"]
        improved = _validate(task, prepared_model, val_data, accelerator.device, row, result)
        if improved:
            best_state = full_weights(raw_model)
            bad_epochs = 0
        else:
            bad_epochs += 1
        result.history.append(row)
        _show_epoch(accelerator, bar, desc, row, task.metric)
        stop = cfg.patience is not None and bad_epochs >= cfg.patience
        cadence.best_changed |= improved
        if state_dir is not None and cadence.due(last=stop or epoch == cfg.epochs):
            with cadence.writing():
                gathered = gather_training_state(trained, optimizer) if sharded else None  # under FSDP: every process
                if accelerator.is_main_process:
                    _save_state(state_dir, trained, optimizer, scheduler, step, epoch, result, bad_epochs, best_state,
                                cadence.best_changed, stop, gathered)
        if stop:
            log.info("%s: early stop after epoch %d (best epoch %d)", desc, epoch, result.best_epoch)
            break
    bar.close()
    if best_state is None and sharded:
        best_state = full_weights(raw_model)
    if best_state is not None:
        target.load_state_dict(best_state)
    result.student = target
    return result


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
    result.best_epoch = row["epoch"]
    result.best_val_score = row.get(f"val_{task.metric}", float("nan"))
    result.best_val_loss = row.get("val_loss", float("nan"))
    return True


def _show_epoch(accelerator, bar, desc: str, row: dict, metric: str) -> None:
    """The epoch's figures to the trackers (tracking.py), the progress bar and the log."""
    log_epoch(accelerator, desc, row)
    bar.set_postfix(epoch=row["epoch"], loss=f"{row['train_loss']:.4f}",
                    **{k: f"{row[k]:.4f}" for k in (f"val_{metric}",) if k in row})
    log.info("%s epoch %d: %s", desc, row["epoch"], {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})


def _epoch_row(epoch, loss_sum, parts_sum, n_batches, seconds, scheduler, cfg, desc: str) -> dict:
    """The epoch's training figures (mean loss and loss terms per batch); a non-finite loss stops training."""
    train_loss = loss_sum.item() / max(1, n_batches)
    if not math.isfinite(train_loss):
        raise UserError(f"{desc}: the training loss became {train_loss} in epoch {epoch}; lower train.lr (now {cfg.lr}) "
                        "or set train.grad_clip")
    row = {"epoch": epoch, "train_loss": train_loss, "seconds": seconds, "lr": scheduler.get_last_lr()[0]}
    row.update({f"train_{k}": float(v) / max(1, n_batches) for k, v in parts_sum.items()})
    return row


@dataclass
class _Loop:
    """What one optimisation step needs; `epoch` runs the steps of one pass over the loader."""

    model: nn.Module
    method: Method
    cfg: object
    accelerator: Accelerator
    stepper: object  # the optimizer, or Accelerate's wrapper of it when fp16 loss scaling needs it
    scheduler: object
    params: list  # what gradient clipping sees: the student's and the method's parameters
    constrain: object  # the model's weight constraint after each step, or None
    autocast: object
    share_rows: bool  # weight each process's loss by its share of the step's rows (see fit)
    bar: object = None

    @classmethod
    def build(cls, prepared_model, raw_model, method, cfg, accelerator, optimizer, prepared_opt, scheduler, task):
        params = list(prepared_model.parameters()) + list(method.parameters())  # what gradient clipping sees
        # examples own different numbers of label rows (a tagger's words): each process's per-row mean is weighted
        # by its share of the step's rows, so DDP's average of gradients is the mean over all rows, as with one process
        share_rows = task.variable_rows and accelerator.num_processes > 1
        constrain = getattr(raw_model, "apply_constraints", None)
        # Accelerate's optimizer wrapper and autocast only matter for fp16 loss scaling and mixed precision (distill
        # uses neither gradient accumulation nor XLA); the wrapper's step also looks up optional packages on every
        # call, about 0.4 ms a batch, so without them the loop steps the optimizer itself.
        stepper = prepared_opt if accelerator.scaler is not None else optimizer
        autocast = accelerator.autocast if accelerator.mixed_precision != "no" else contextlib.nullcontext
        return cls(prepared_model, method, cfg, accelerator, stepper, scheduler, params, constrain, autocast, share_rows)

    def epoch(self, loader) -> tuple[torch.Tensor, dict, int]:
        """(sum of the batch losses, sums of the named loss parts, batches) of one pass over `loader`."""
        method, cfg, accelerator = self.method, self.cfg, self.accelerator
        loss_sum = torch.zeros((), device=accelerator.device)
        parts_sum: dict[str, torch.Tensor] = {}
        n_batches = 0
        for batch in loader:
            x, y = batch[0], batch[1]
            _feed_teacher(getattr(method, "teacher", None), batch, x)
            if cfg.jitter:
                x = random_shift(x, cfg.jitter)
            with self.autocast():
                loss, parts = method(self.model, x, y)
            if self.share_rows:
                loss = loss * _row_share(y, accelerator)
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                _average_gradients(method.parameters(), accelerator)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(self.params, cfg.grad_clip)
            self.stepper.step()
            self.scheduler.step()
            self.stepper.zero_grad(set_to_none=True)
            if self.constrain is not None:
                self.constrain()
            loss_sum += loss.detach()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            n_batches += 1
            self.bar.update(1)
        return loss_sum, parts_sum, n_batches


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


def _resume(state_dir, trained, optimizer, scheduler, result: FitResult, cfg, desc: str):
    """Load a resumable checkpoint into the model, optimizer and scheduler, and its history into `result`;
    return (first epoch to train, step, epochs without improvement, best-on-validation weights)."""
    saved = load_training_state(state_dir, model=trained, optimizer=optimizer, scheduler=scheduler)
    extra = saved["extra"]
    result.history = extra["history"]
    result.best_epoch = extra["best_epoch"]
    result.best_val_score = extra.get("best_val_score", extra.get("best_val_accuracy"))  # (older checkpoints)
    result.best_val_loss = extra.get("best_val_loss", float("nan"))
    result.train_seconds = extra["train_seconds"]
    start_epoch = cfg.epochs + 1 if extra.get("stopped") else saved["epoch"] + 1  # stopped early: nothing left
    if not _best_path(state_dir).exists():  # written before every checkpoint: without it the best epoch is lost
        raise UserError(f"{desc}: the checkpoint in {state_dir} has lost its best-on-validation weights "
                        f"{_best_path(state_dir)}: put that file back, or start afresh without --resume")
    log.info("%s: resumed after epoch %d", desc, saved["epoch"])
    return start_epoch, saved["step"], extra["bad_epochs"], load_model_file(_best_path(state_dir))[0]


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights as full tensors. Under FSDP the shards are gathered: a collective that
    every process runs, and every process gets the whole state."""
    if not is_sharded(model):
        return copy.deepcopy(model.state_dict())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: t.detach().clone() for name, t in state.items()}


def _row_share(y: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """num_processes x (this process's rows / all processes' rows) for this step: 1 when the rows are shared evenly."""
    rows = torch.tensor(float(y.numel()), device=y.device)
    return rows * accelerator.num_processes / accelerator.reduce(rows.clone(), reduction="sum").clamp_min(1.0)


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


def _best_path(state_dir) -> Path:
    # beside the state folder, not inside it: save_training_state replaces that folder whole
    return Path(state_dir).parent / f"{Path(state_dir).name}.best.safetensors"


def _save_state(state_dir, model, optimizer, scheduler, step, epoch, result, bad_epochs, best_state, improved, stopped,
                gathered):
    if improved and best_state is not None:
        # best weights first: a kill between the two writes leaves the older state, and replaying that
        # epoch (deterministic) writes the same best weights again
        Path(state_dir).parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(_best_path(state_dir), best_state, None, "best weights")  # tied weights: one copy per name
    extra = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_score": result.best_val_score,
        "best_val_loss": result.best_val_loss,
        "train_seconds": result.train_seconds,
        "bad_epochs": bad_epochs,
        "stopped": stopped,
    }
    save_training_state(state_dir, model=model, optimizer=optimizer, scheduler=scheduler, step=step, epoch=epoch,
                        extra=extra, gathered=gathered)
