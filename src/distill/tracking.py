"""Experiment tracking through Accelerate's trackers (`report.trackers`, `Distiller.fit(trackers=...)`).

Logged: the recipe as flat parameters ("student.train.lr"), every epoch's row of every role as `<role>/<key>` at
step = epoch (so scratch and student curves overlay), the final figures as `final/<role>/<field>`, the results
table as TensorBoard text, and results.json / report.md / history.json / plots as MLflow artifacts.

Where files go: `report.tracking_dir`, by default the run folder's `tracking/` (built inside `<name>.partial/` and
moved with the run when it is published). MLflow keeps its runs in `tracking/mlflow/mlflow.db` (SQLite: its file
store is deprecated in MLflow 3) unless MLFLOW_TRACKING_URI names a server and no tracking_dir is set. Stored paths
do not survive a move, so the MLflow experiment's artifact location is the published folder, and the artifacts
are logged after the publish.

Only the main process logs (Accelerate's trackers do that). A tracker that fails during the run is dropped with
one warning, and the run goes on; one that cannot start is a one-line refusal before training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

from accelerate.utils import LoggerType

from distill.durable import atomic_write_text
from distill.errors import UserError

log = logging.getLogger("distill")

TRACKERS = tuple(t.value for t in LoggerType if t is not LoggerType.ALL)
# tracker -> (pip package, modules any of which Accelerate can log with)
PACKAGES = {"tensorboard": ("tensorboard", ("tensorboard", "tensorboardX")), "wandb": ("wandb", ("wandb",)),
            "trackio": ("trackio", ("trackio",)), "comet_ml": ("comet-ml", ("comet_ml",)), "aim": ("aim", ("aim",)),
            "mlflow": ("mlflow", ("mlflow",)), "clearml": ("clearml", ("clearml",)), "dvclive": ("dvclive", ("dvclive",)),
            "swanlab": ("swanlab", ("swanlab",))}
# wandb keeps one step counter for the whole run and drops data logged at a smaller step than its last one: it
# counts its own steps and gets the epoch as a value, `<role>/epoch`
RUN_STEP_TRACKERS = ("wandb",)
FINAL_FIELDS = ("score", "params", "size_mb_fp32", "latency_ms", "throughput_per_s")
ARTIFACTS = ("results.json", "report.md", "history.json", "curves.png", "accuracy_vs_size.png")


def check_trackers(names, own_mlflow_store: bool, field: str = "report.trackers") -> None:
    """Refuse, before anything is trained, trackers that Accelerate would silently drop (package missing)."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{field}: unknown tracker {name!r}: choose from {', '.join(TRACKERS)}")
        pip, modules = PACKAGES.get(name, (name, (name,)))  # (a tracker added to Accelerate after this list)
        if not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"{field}: {name} needs the {pip} package, which is not installed: "
                            f"pip install {pip} (or remove {name} from {field})")
    if "mlflow" in names and own_mlflow_store and not all(importlib.util.find_spec(m) for m in ("sqlalchemy", "alembic")):
        raise UserError(f"{field}: mlflow keeps its runs in an SQLite file (tracking/mlflow/mlflow.db), which "
                        "needs SQLAlchemy and alembic: pip install mlflow (not mlflow-skinny), or set "
                        "MLFLOW_TRACKING_URI to your tracking server")


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested recipe as flat "a.b.c" keys with str / int / float / bool values (what trackers take); characters
    MLflow refuses in a name become _ (variants.word+seq.data.targets -> variants.word_seq.data.targets)."""
    flat = {}
    for key, value in config.items():
        name = metric_key(f"{prefix}{key}")
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = {str(i): v for i, v in enumerate(value)}  # assistants: assistants.0.model.hidden, ...
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)  # null, [64, 64]: as in the recipe
        else:
            flat[name] = value
    return flat


def metric_key(*parts: str) -> str:
    """A metric name every tracker takes: ("final", "student+bias", "score") -> "final/student_bias/score". MLflow
    refuses characters other than letters, digits, _ - . / : and space; TensorBoard rewrites spaces ("specialist 1")."""
    return re.sub(r"[^\w.\-/]", "_", "/".join(parts))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def final_metrics(results: dict) -> dict:
    """`final/<role>/<field>` of every model in results.json, with speed-up and compression against the teacher."""
    models = results.get("models", {})
    teacher = models.get("teacher", {})
    values = {}
    for role, m in models.items():
        fields = {f: m.get(f) for f in FINAL_FIELDS}
        if _number(teacher.get("latency_ms")) and _number(m.get("latency_ms")) and m["latency_ms"] > 0:
            fields["speedup"] = teacher["latency_ms"] / m["latency_ms"]
        if _number(teacher.get("params")) and _number(m.get("params")) and m["params"] > 0:
            fields["compression"] = teacher["params"] / m["params"]
        values.update({metric_key("final", role, f): float(v) for f, v in fields.items() if _number(v)})
    return values


def log_epoch(accelerator, role: str, row: dict) -> None:
    """One history row (train_loss, train_<part>, val_<metric>, val_loss, lr, seconds) as `<role>/<key>` at step =
    its epoch (or its optimiser step, with train.eval_every); non-finite values (no validation rows) are left out. Nothing without trackers."""
    if not accelerator.trackers:
        return
    values = {metric_key(role, k): float(v) for k, v in row.items() if k not in ("epoch", "step") and _number(v)}
    x = "step" if "step" in row else "epoch"  # rows every train.eval_every steps are logged at their step
    for tracker in list(accelerator.trackers):
        if tracker.name in RUN_STEP_TRACKERS:
            _safely(accelerator, tracker, "log", {**values, metric_key(role, x): row[x]})
        else:
            _safely(accelerator, tracker, "log", values, step=row[x])


def _safely(accelerator, tracker, what: str, *args, quiet: bool = False, **kwargs) -> None:
    """A tracker's failure must not lose the run: warn once and go on without that tracker."""
    try:
        getattr(tracker, what)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any error of any tracker package
        if tracker in accelerator.trackers:
            accelerator.trackers.remove(tracker)
        if not quiet:
            _warn(f"tracker {tracker.name} failed ({type(e).__name__}: {_first_line(e)}); the run goes on without it")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0]


def _warn(message: str) -> None:
    log.warning(message)  # log.txt
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # the console


class Tracking:
    """The trackers of one run: started once the accelerator exists, fed by the training loop (log_epoch),
    closed after the report, and, for MLflow, given the run's files once they are published."""

    def __init__(self, names, project: str, config: dict, tracking_dir: str | Path | None, live_dir: Path,
                 final_dir: Path | None = None, run_id_file: Path | None = None, field: str = "report.trackers"):
        self.names, self.project, self.config, self.field = list(dict.fromkeys(names)), project, config, field
        self.run_id_file = run_id_file  # the MLflow run a resumed run goes on with
        self.live_dir = Path(tracking_dir or live_dir).absolute()  # where the trackers write during the run
        self.final_dir = Path(tracking_dir or final_dir or live_dir).absolute()  # where those files end up
        self.server = None if tracking_dir else os.environ.get("MLFLOW_TRACKING_URI")  # the user's MLflow
        self.accelerator, self.mlflow_run, self.previous_uri, self.uri_set = None, None, None, False
        check_trackers(self.names, own_mlflow_store=self.server is None, field=field)

    @classmethod
    def for_run(cls, recipe, partial: Path, out: Path) -> "Tracking":
        r = recipe.report
        return cls(r.trackers, recipe.name, recipe.model_dump(mode="json"), r.tracking_dir, partial / "tracking",
                   out / "tracking", run_id_file=partial / "state" / "mlflow-run-id")

    def accelerator_options(self) -> dict:
        """make_accelerator's keywords: none without trackers (the accelerator is then the same as before)."""
        return {"trackers": self.names, "tracking_dir": str(self.live_dir)} if self.names else {}

    def _mlflow_uri(self, folder: Path) -> str:
        return self.server or f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"

    def start(self, accelerator, resume: bool = False) -> None:
        """Start every tracker and log the flat config; a tracker that cannot start is refused in one line.
        resume: MLflow goes on with the killed run's MLflow run (TensorBoard adds a file to the same folder)."""
        self.accelerator = accelerator
        if not self.names:
            return
        dropped = [n for n in self.names if n not in {str(t) for t in accelerator.log_with}]
        if dropped:  # Accelerate leaves out, silently, a tracker whose package it cannot find
            raise UserError(f"{self.field}: Accelerate cannot find {dropped[0]}: pip install {PACKAGES.get(dropped[0], dropped)[0]}")
        init = {}
        if "mlflow" in self.names and accelerator.is_main_process:
            import mlflow

            self.previous_uri = os.environ.get("MLFLOW_TRACKING_URI")  # what mlflow.set_tracking_uri replaces
            if self.server is None:
                _close_sqlite(self._mlflow_uri(self.live_dir))  # a connection cached by an earlier use of this path
            mlflow.set_tracking_uri(self._mlflow_uri(self.live_dir))
            self.uri_set = True
            if self.server is None:  # the artifacts are logged where the run folder is published
                init["mlflow"] = {"logging_dir": str(self.final_dir / "mlflow" / "artifacts")}
            if resume and self.run_id_file is not None and self.run_id_file.is_file():
                init.setdefault("mlflow", {})["run_id"] = self.run_id_file.read_text().strip()
        try:
            accelerator.init_trackers(self.project, config=flat_config(self.config), init_kwargs=init)
        except Exception as e:  # noqa: BLE001
            self.finish(quiet=True)  # end those that did start
            raise UserError(f"{self.field}: a tracker could not start ({type(e).__name__}: {_first_line(e)}): "
                            f"fix it, or remove it from {self.field}") from None
        if "mlflow" in self.names and accelerator.is_main_process:
            self.mlflow_run = accelerator.get_tracker("mlflow").tracker.info.run_id
            if self.run_id_file is not None:
                atomic_write_text(self.run_id_file, self.mlflow_run)

    def log_results(self, results: dict) -> None:
        """The final figures as metrics, the table as TensorBoard text; then close the trackers (before the run
        folder moves)."""
        from distill.report import _markdown_table

        acc = self.accelerator
        values = final_metrics(results)
        for tracker in list(acc.trackers) if acc is not None else []:
            _safely(acc, tracker, "log", values)
            if tracker.name == "tensorboard":  # Accelerate's TensorBoard tracker writes a str as text (markdown)
                _safely(acc, tracker, "log", {"final/results": _markdown_table(results)})
        self.finish()

    def finish(self, quiet: bool = False) -> None:
        """Close every tracker (Accelerate's end_training would also destroy the process group, which the
        runner still needs) and give MLflow back its previous tracking URI."""
        acc = self.accelerator
        for tracker in list(acc.trackers) if acc is not None else []:
            _safely(acc, tracker, "finish", quiet=quiet)
        if acc is not None:
            acc.trackers.clear()
        if self.uri_set:
            import mlflow

            mlflow.set_tracking_uri(self.previous_uri)
            self.uri_set = False
            if self.server is None:
                _close_sqlite(self._mlflow_uri(self.live_dir))

    def log_artifacts(self, run_dir: Path) -> None:
        """MLflow: the run's results, report and plots, from the published run folder."""
        if self.mlflow_run is None:
            return
        from mlflow.tracking import MlflowClient

        if self.server is None:
            _close_sqlite(self._mlflow_uri(self.final_dir))  # e.g. a client of the run this one replaced
        try:
            client = MlflowClient(tracking_uri=self._mlflow_uri(self.final_dir))
            for name in ARTIFACTS:
                if (Path(run_dir) / name).is_file():
                    client.log_artifact(self.mlflow_run, str(Path(run_dir) / name))
        except Exception as e:  # noqa: BLE001
            _warn(f"tracker mlflow: the run's files were not logged as artifacts ({type(e).__name__}: {_first_line(e)})")
        finally:
            if self.server is None:
                _close_sqlite(self._mlflow_uri(self.final_dir))


def _close_sqlite(uri: str) -> None:
    """MLflow keeps, for the life of the process, one store and one SQLAlchemy engine per database URI (private
    caches, no public way to drop them). The run folder moves when published and a later run of the same recipe
    reuses its path, so both must be forgotten, or that run would write into the moved (or deleted) file;
    tests/test_tracking.py runs a recipe twice in one process to hold this."""
    with contextlib.suppress(Exception):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        type(_tracking_store_registry)._get_store_with_resolved_uri.cache_clear()
        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()


@contextlib.contextmanager
def fit_tracking(trackers, tracking_dir, config: dict, project: str = "distill"):
    """Distiller.fit(trackers=[...]): an accelerator that logs to them (under tracking_dir, default ./tracking),
    or None without trackers."""
    if not trackers:
        yield None
        return
    from distill.train import make_accelerator

    tracking = Tracking(trackers, project, config, tracking_dir, Path("tracking"), field="trackers")
    tracking.start(make_accelerator(**tracking.accelerator_options()))
    try:
        yield tracking.accelerator
    finally:
        tracking.finish()
