"""The Python API: distil any teacher nn.Module into any student nn.Module, in our loop or in yours.

    from distill import Distiller
    d = Distiller(teacher, student, method="kd", temperature=4.0, hard_weight=0.1, soft_weight=0.9)
    # your loop (call d.start_epoch(epoch) at each epoch for methods with schedules):
    loss, parts = d.loss(x, y)          # teacher forward (no grad) + student forward + method loss
    loss.backward(); optimizer.step()   # optimise d.parameters() (the student's, plus any the method adds)
    # or ours (Accelerate, best-on-validation, early stopping, resumable checkpoints):
    result = d.fit(train_dataset, val_dataset, epochs=20, lr=1e-3)
"""

from pathlib import Path

from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from distill import saving
from distill.errors import UserError
from distill.methods import REGISTRY, Method, build_method
from distill.signals import LiveTeacher
from distill.train import FitResult, fit


class Distiller:
    def __init__(self, teacher: nn.Module | None, student: nn.Module, method: str = "kd", *, teacher_precision: str = "fp32",
                 **params):
        """params are the method's config fields (see `distill methods`); teacher_precision fp16/bf16 runs a half
        copy of the teacher. method="supervised" trains the student alone (teacher=None): the no-teacher baseline."""
        if method not in REGISTRY:
            raise UserError(f"unknown method {method!r}: choose one of {', '.join(sorted(REGISTRY))}")
        cls = REGISTRY[method]
        try:
            config = cls.Config(method=method, **params)
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"{method}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        if teacher is None and cls.needs_teacher:
            raise UserError(f"method {method!r} needs a teacher: pass one, or method='supervised' to train the student alone")
        self.teacher = teacher
        self.student = student
        self.method = build_method(config, LiveTeacher(teacher, teacher_precision) if teacher is not None else None)
        self.result: FitResult | None = None  # the last fit's history and best epoch
        self._ready = False  # set once the method has built its trainable parts (see setup)

    def setup(self, example) -> None:
        """Let the method build its trainable parts (e.g. hint regressors, peer students) from one input batch.
        Call it before creating your optimizer; `fit` does it for you."""
        self.method.setup(self.student, example)
        self._ready = True

    def loss(self, x, y=None):
        """(loss, parts) for one batch; parts are detached tensors for logging."""
        if not self._ready:
            self.setup(x)
        return self.method(self.student, x, y)

    def start_epoch(self, epoch: int) -> None:
        """Tell the method which epoch (1-based) begins, for methods with schedules (e.g. DKD's warm-up)."""
        self.method.start_epoch(epoch)

    def parameters(self) -> list[nn.Parameter]:
        if not self._ready and type(self.method).setup is not Method.setup:
            raise UserError(f"method {self.method.name!r} builds trainable parts from the data: call "
                            "distiller.setup(x) with one input batch before creating the optimizer")
        return list(self.student.parameters()) + list(self.method.parameters())

    def fit(self, train_data, val_data=None, *, seed: int = 0, state_dir=None, resume: bool = False,
            progress: bool = True, trackers=None, tracking_dir=None, **train_params) -> FitResult:
        """Train the student with our loop and leave it with its best-on-validation weights (result.student).

        train_data: any map-style Dataset yielding (x, y), a Subset, an IterableDataset, or a DataLoader (used as
        given: its batch size counts, so passing another batch_size is refused). train_params are TrainConfig
        fields (epochs, min_steps, lr, batch_size, optimizer, schedule, ...; `distill methods` and the README).
        trackers: Accelerate trackers (["tensorboard", "mlflow", ...]) that get every epoch's metrics as
        `<method>/<key>`, writing under tracking_dir (default ./tracking)."""
        from distill.recipe import TrainConfig
        from distill.tracking import fit_tracking

        if isinstance(train_data, DataLoader):
            given = train_params.get("batch_size")
            if given is not None and given != train_data.batch_size:
                raise UserError(f"fit(batch_size={given}) with a DataLoader of batch_size={train_data.batch_size}: the "
                                "DataLoader's batches are used as they are; pass the dataset instead, or drop batch_size")
            if train_data.batch_size:
                train_params = {**train_params, "batch_size": train_data.batch_size}
        if isinstance(train_data, IterableDataset) and not hasattr(train_data, "__len__"):
            # a stream of unknown length: the default cosine schedule cannot be laid out over it
            train_params = {"schedule": "constant", **train_params}
        try:
            cfg = TrainConfig(**train_params)
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"train.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        self._ready = True  # fit calls method.setup itself
        with fit_tracking(trackers, tracking_dir, {"distill": self.method.config.model_dump(mode="json"),
                                                   "train": cfg.model_dump(mode="json")}) as accelerator:
            self.result = fit(self.student, self.method, train_data, val_data, cfg, seed=seed, state_dir=state_dir,
                              resume=resume, desc=self.method.name, progress=progress, accelerator=accelerator)
        return self.result

    def save(self, path, *, init_kwargs: dict | None = None, data: dict | None = None) -> Path:
        """Write the student to folder `path`: model.safetensors (weights) and distill.json (how to rebuild it, the
        method and its settings, the last fit's best epoch and history). init_kwargs: the arguments of your model's
        class, for `distill.load(path, model=YourClass)`; data: the recipe `data:` section it was trained on (e.g.
        {"dataset": "table", "path": "x.csv", "label_column": "y"}), so `distill eval path` needs no data arguments.
        Load it back with `distill.load(path)`."""
        return saving.save(path, self.student, method=self.method, fit=self.result, init_kwargs=init_kwargs, data=data)
