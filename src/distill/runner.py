"""One experiment from one recipe: teacher, scratch student, distilled students (the student and the recipe's
variants), evaluated and reported.

Everything a user can get wrong is checked before anything is written. The run is built in
`<output_dir>/<name>.partial/` and renamed to `<output_dir>/<name>/` only when complete, so a run folder
is never half-written; `resume=True` continues a killed run from its `.partial` folder.
"""

import copy
import dataclasses
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import set_seed

from distill.checkpoint import load_model_file, load_weights, read_model_record, save_model
from distill.durable import (WriteError, atomic_write_text, check_sealed, checked_json, read_checked_json,
                             remove_temp_files, seal)
from distill.errors import UserError
from distill.methods import REGISTRY, build_method
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import Recipe, recipe_to_yaml
from distill.report import format_table, model_card, strict_json, write_report, write_results
from distill.run_checks import check_layers, check_rows, check_schedule, check_split_sizes, run_warnings
from distill.signals import TeacherEnsemble
from distill.signals.specialists import GeneralistWithSpecialists, check_class_sets, find_class_sets, train_specialist
from distill.students import build_model, model_config_adapter
from distill.tasks import make_task
from distill.tasks.classification import model_record
from distill.transfer import BiasShifted, check_bias_rows, choose_bias, class_shift, errors_on_classes, recipe_rows
from distill.train import fit, make_accelerator
from distill.teaching import Teaching
from distill.tracking import Tracking
from distill.variants import checked, distilled_stages

log = logging.getLogger("distill")
ROLES = ("teacher", "scratch", "student")


def check_task_fits(task, recipe: Recipe) -> None:
    """Recipe features that a task cannot do are refused with one line, before anything is loaded or trained."""
    method = REGISTRY[recipe.distill.method]
    if not task.continuous_inputs:
        if method.needs_continuous_inputs:
            raise UserError(f"distill.method={method.name} perturbs or differentiates the inputs, which are token ids "
                            f"in a {task.name} task: choose a method that works on logits or layers (kd, dkd, topk, "
                            "noisy, hints, mutual, transformer)")
        for role, cfg in (("teacher", recipe.teacher), ("student", recipe.student), *((f"assistants[{i}]", a) for i, a in enumerate(recipe.assistants))):
            for train in (cfg.train, getattr(cfg, "distill_train", None)):
                if train is not None and train.jitter:
                    raise UserError(f"{role}.train.jitter shifts images by pixels; {task.name} inputs are token ids: set it to 0")
    if task.continuous_inputs:  # images and tables: every recipe feature applies
        return
    unsupported = {"teacher.specialists": recipe.teacher.specialists, "transfer.omit_classes": recipe.transfer.omit_classes,
                   "transfer.rows: heldout": recipe.transfer.rows == "heldout"}
    for key, value in unsupported.items():
        if value:
            raise UserError(f"{key} is not available for {task.name} yet (it is for images and tables): remove it")


class Experiment:
    """Holds the validated pieces of a run; `run()` trains, evaluates and writes the report."""

    def __init__(self, recipe: Recipe, *, stages=ROLES, teacher_checkpoint: str | None = None, progress: bool = True):
        self.recipe = recipe
        self.stages = tuple(stages)
        self.progress = progress
        self.teacher_checkpoint = teacher_checkpoint or recipe.teacher.checkpoint
        self.teacher_given = bool(self.teacher_checkpoint or recipe.teacher.ensemble)  # loaded, not trained here
        cache = recipe.teacher.cache
        stored = cache and cache != "auto"  # a cache written by `distill cache` can stand in for the teacher
        if "teacher" not in self.stages and not self.teacher_given and not stored and {"student"} & set(self.stages):
            raise UserError("distilling needs a teacher: pass --teacher PATH (.safetensors, or a text model's folder) "
                            "or set teacher.checkpoint in the recipe")
        if stored and "teacher" in self.stages and not self.teacher_given:
            raise UserError("teacher.cache holds the outputs of an existing teacher, not of one trained in this run: "
                            "use `distill distill RECIPE teacher.cache=DIR` (add --teacher PATH to report the teacher too)")
        self.out = Path(recipe.output_dir) / recipe.name
        self.partial = self.out.with_name(self.out.name + ".partial")
        # under `accelerate launch` every process trains; only the main one writes the run folder
        self.main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
        # --- everything a user can get wrong, before anything is written ---
        self.task = make_task(recipe, self.teacher_checkpoint)
        self.distilled = distilled_stages(recipe)  # the student and the recipe's variants
        for name, stage in self.distilled.items():
            checked(name, check_task_fits, self.task, stage)
        self.data = self.task.load_data()
        self._check_transfer()
        self.teacher_rows, self.student_rows = recipe_rows(recipe, self.data.train)
        self.teacher_rows = self.task.supervised_rows(self.teacher_rows)
        set_seed(recipe.seed)
        spec = recipe.teacher.specialists
        if spec and spec.class_sets:
            try:
                check_class_sets(spec.class_sets, self.data.num_classes)
            except UserError as e:
                raise UserError(f"teacher.specialists.class_sets: {e}") from None
        self.teacher = self._build_teacher()
        # the student starts from the teacher as loaded (hf-shrink's layers, embeddings): scratch and student alike
        self.student_init = self.task.build_model(recipe.student.model, self.data, self.teacher)
        # translation: the teacher's generated targets (data.targets); teacher.cache
        self.teaching = Teaching(recipe, self.task, self.student_rows, self.partial,
                                 teacher_checkpoint=self.teacher_checkpoint, main=self.main)
        live = not (stored and not self.teacher_given)  # else the stored cache stands in for the teacher
        if "student" in self.stages:
            if stored:  # the teacher network is needed only to check the cache was written by it
                self.teaching.open_stored(self.teacher if self.teacher_given else None)
            if live:
                self.task.check_compatible(self.teacher, self.student_init, self.data)
            self.teaching.check(self.distilled, self.teacher, self.student_init, live=live)
        for i, a in enumerate(recipe.assistants, 1):
            try:
                self.task.check_compatible(self.teacher, self.task.build_model(a.model, self.data, self.teacher), self.data)
            except UserError as e:
                raise UserError(f"assistants[{i - 1}]: {e}") from None
        self._preflight(live)
        self.tracking = Tracking.for_run(recipe, self.partial, self.out)  # trackers' packages checked here

    def _preflight(self, live: bool) -> None:
        """Checked before anything trains (run_checks): enough rows in every split and for every stage, each stage's
        schedule shorter than its training, and the layers a feature method names present in the networks."""
        r, stages = self.recipe, self.stages
        check_split_sizes(self.data, r.data.val_fraction)
        trained = []  # (role, train settings, rows, method): every stage this run trains
        if "teacher" in stages and not self.teacher_given:
            trained.append(("teacher", r.teacher.train, len(self.teacher_rows), None))
        if "scratch" in stages:
            trained.append(("scratch", r.student.train, len(self.task.supervised_rows(self.student_rows)), None))
        if "student" in stages:
            trained += [(f"assistants[{i}]", a.train, len(self.student_rows), r.distill) for i, a in enumerate(r.assistants)]
            trained += [(name, stage.student.distill_train or stage.student.train, len(self.student_rows), stage.distill)
                        for name, stage in self.distilled.items()]
        for role, train, rows, method in trained:
            name, role = (role, "student") if role in self.distilled else ("student", role)  # variants: named by checked
            checked(name, check_rows, rows, role)
            checked(name, check_schedule, train, rows, role, method)
        if "student" in stages:
            for name, stage in self.distilled.items():
                checked(name, check_layers, stage.distill, self.teacher if live else None, self.student_init,
                        self.student_rows, r.teacher.precision)

    def _check_transfer(self) -> None:
        t, data = self.recipe.transfer, self.data
        bad = [c for c in t.omit_classes if c >= data.num_classes]
        if bad:
            raise UserError(f"transfer.omit_classes: class {bad[0]} is out of range for {data.name}, whose classes are 0..{data.num_classes - 1}")
        if t.omit_classes and (data.train.y == -1).any():
            raise UserError("transfer.omit_classes with unlabelled training rows (data.unlabelled_fraction > 0): their "
                            "classes are unknown, so omitted classes would stay in the transfer set; set one of the two to 0")
        if t.omit_classes and t.bias_correction == "auto" and "student" in self.stages:
            check_bias_rows(data.val, t.omit_classes)

    def _check_same_recipe(self) -> None:
        """Resuming with another recipe would mix stages trained on different settings (even splits): refuse."""
        saved = self.partial / "recipe.yaml"
        if not saved.exists():
            return
        before, now = yaml.safe_load(saved.read_text()), yaml.safe_load(recipe_to_yaml(self.recipe))
        diff = _first_difference(before, now)
        if diff:
            raise UserError(f"--resume: {self.partial} was started with {diff[0]}={diff[1]!r}, now {diff[2]!r}; "
                            "resume with the same recipe, or run without --resume to start over")

    def _build_teacher(self) -> torch.nn.Module:
        """The recipe's teacher; from a checkpoint, the architecture stored in it (else the recipe's);
        from teacher.ensemble, the listed checkpoints as one TeacherEnsemble."""
        recipe, data = self.recipe, self.data
        if self.teacher_checkpoint:
            return self.task.load_model(self.teacher_checkpoint, data)
        if recipe.teacher.ensemble:
            e = recipe.teacher.ensemble
            return TeacherEnsemble([self.task.load_model(p, data) for p in e.checkpoints], e.weights, e.combine)
        return self.task.build_model(recipe.teacher.model, data)

    def run(self, resume: bool = False) -> dict:
        if not self.main:
            if resume:
                self._check_same_recipe()  # read-only: every process must refuse, or the others wait forever
            return self._run(resume)
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        if resume:
            check_resumable(self.recipe, resume)
            self._check_same_recipe()
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.partial / "log.txt")
        except OSError as e:
            raise UserError(f"cannot write the run folder {self.partial} ({e.strerror}): set output_dir to a writable folder") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler.handleError = lambda record: None  # a full disk: no traceback per log line; the next write says it
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            results = self._run(resume)
        except UserError as e:
            self.tracking.finish()
            if not resume and not isinstance(e, WriteError):  # a full disk: what was written is kept for --resume
                handler.close()
                shutil.rmtree(self.partial, ignore_errors=True)
            raise
        except BaseException:  # killed: the .partial folder stays for --resume; the trackers are closed
            self.tracking.finish(quiet=True)
            raise
        finally:  # a killed run's log must not go on collecting later runs' lines (API, tests)
            log.removeHandler(handler)
            handler.close()
        self._publish()
        self.tracking.log_artifacts(self.out)  # MLflow copies them: from their published place
        return results

    def _run(self, resume: bool) -> dict:
        r = self.recipe
        if self.main:
            atomic_write_text(self.partial / "recipe.yaml", recipe_to_yaml(r))
        log.info("recipe %s on %s: %d train / %d val / %d test rows", r.name, self.data.name, len(self.data.train), len(self.data.val), len(self.data.test))
        accelerator = make_accelerator(r.mixed_precision, **self.tracking.accelerator_options())
        self.tracking.start(accelerator, resume)
        self.models, self.histories, self.seconds, self.epochs = {}, {}, {}, {}
        teacher = self._teacher_stage(accelerator, resume)
        self._students(teacher, accelerator, resume)
        if r.transfer.omit_classes and r.transfer.bias_correction is not None and "student" in self.models:
            self.models["student+bias"] = self._bias_corrected(self.models["student"])
            self.seconds["student+bias"], self.epochs["student+bias"] = self.seconds["student"], self.epochs["student"]
        if not self.main:
            return {}  # the main process evaluates, measures and writes
        return self._results()

    def _stage(self, role, model, role_cfg, method, accelerator, resume, train=None, data=None) -> torch.nn.Module:
        """Train (or, resuming, load) one role and record its history, seconds and epochs."""
        self.models[role], self.histories[role], self.seconds[role], self.epochs[role] = self._train_role(
            role, model, role_cfg, method, accelerator, resume, train=train, data=data)
        return self.models[role]

    def _teacher_stage(self, accelerator, resume: bool):
        """The teacher (trained here or loaded), with its specialists; None when a stored cache stands in for it."""
        r = self.recipe
        if self.teacher_given or ("teacher" not in self.stages and self.teaching.cache is None):
            self.models["teacher"] = self.teacher
        elif "teacher" in self.stages:
            self._stage("teacher", self.teacher, r.teacher, Supervised(SupervisedConfig()), accelerator, resume, data=self.teacher_rows)
        teacher = self.models["teacher"].to(accelerator.device) if "teacher" in self.models else None
        if r.teacher.specialists and "student" in self.stages:
            teacher = self.models["teacher+specialists"] = self._with_specialists(teacher, accelerator, resume)
            self.seconds["teacher+specialists"] = None
        return teacher

    def _students(self, teacher, accelerator, resume: bool) -> None:
        """Assistants, scratch, then every distilled stage (the student and its variants) from the same initial
        weights as scratch: only the teaching differs. Assistants form a chain: each learns from the one before,
        the students from the last."""
        r = self.recipe
        if "student" in self.stages:
            self.teaching.prepare(teacher, accelerator, self.distilled, self.student_init)  # targets / cache: auto
            for i, a in enumerate(r.assistants, 1):
                set_seed(r.seed + i)
                # from the trained teacher (hf-shrink layers, embeddings): the same in a fresh and a resumed run
                model = self.task.build_model(a.model, self.data, self.models.get("teacher", self.teacher))
                signal, rows = self.teaching.signal(teacher, r, from_teacher=i == 1)
                teacher = self._stage(f"assistant{i}", model, a, build_method(r.distill, signal), accelerator, resume, data=rows)
                teacher = teacher.to(accelerator.device)
        if "scratch" in self.stages:
            self._stage("scratch", copy.deepcopy(self.student_init), r.student, Supervised(SupervisedConfig()), accelerator,
                        resume, train=r.student.train, data=self.task.supervised_rows(self.student_rows))
        if "student" not in self.stages:
            return
        for role, stage in self.distilled.items():
            signal, rows = self.teaching.signal(teacher, stage, from_teacher=not r.assistants)
            self._stage(role, copy.deepcopy(self.student_init), r.student, build_method(stage.distill, signal), accelerator,
                        resume, train=stage.student.distill_train or stage.student.train, data=rows)

    def _results(self) -> dict:
        """Every model evaluated on the test split and measured; results.json, history.json and report.md written."""
        r, task = self.recipe, self.task
        task.judge = self.models["teacher"].cpu().eval() if "teacher" in self.models else None  # scores the models' samples
        results = {"recipe": r.name, "task": task.name, "dataset": self.data.name, "models": {}}
        example = lambda n: task.latency_inputs(self.data, n)  # noqa: E731
        for role, model in self.models.items():
            model = model.cpu().eval()
            scores = dict(task.test_scores(model, self.data))
            score, test_size = scores.pop("score"), scores.pop("n")
            card = model_card(task.timed(model), example, latency_batch=r.report.latency_batch, throughput_batch=r.report.throughput_batch, repeats=r.report.repeats)
            results["models"][role] = {
                "metric": task.metric, "score": score, **scores, "test_size": test_size, **card,
                "train_seconds": self.seconds.get(role), "epochs": self.epochs.get(role),
            }
            if r.transfer.omit_classes:
                results["models"][role]["omitted_class_errors"] = errors_on_classes(model, self.data.test, r.transfer.omit_classes)
            if isinstance(model, BiasShifted):
                results["models"][role]["bias_correction"] = model.value
        if isinstance(self.models.get("teacher+specialists"), GeneralistWithSpecialists):
            results["specialists"] = {"class_sets": self.models["teacher+specialists"].class_sets}
        results["transfer"] = {"rows": r.transfer.rows, "teacher_rows": len(self.teacher_rows), "student_rows": len(self.student_rows),
                               "omit_classes": r.transfer.omit_classes}
        results["config"] = r.model_dump(mode="json")
        results["warnings"] = run_warnings(results["models"], task.baseline_score(self.data), task.metric)
        for line in results["warnings"]:
            log.warning("warning: %s", line)
        write_results(self.partial, results)
        atomic_write_text(self.partial / "history.json", strict_json(self.histories, indent=1))
        write_report(self.partial, results, self.histories)
        self.tracking.log_results(results)
        return results

    def _with_specialists(self, generalist, accelerator, resume: bool) -> GeneralistWithSpecialists:
        """Hinton et al. 2015 §5: class sets from the generalist's confusions, one specialist per set."""
        spec, r = self.recipe.teacher.specialists, self.recipe
        sets = spec.class_sets
        if not sets:
            with torch.inference_mode():
                logits = torch.cat([generalist.eval()(x.to(accelerator.device)).cpu()
                                    for x in self.teacher_rows.x.split(1024)])
            sets = find_class_sets(torch.softmax(logits / spec.temperature, -1), spec.count, seed=r.seed)
        log.info("specialists on class sets %s", sets)
        model_cfg = self._teacher_model_config()
        build = lambda n: build_model(model_cfg, self.data.input_shape, n)  # noqa: E731
        rows = dataclasses.replace(self.data, train=self.teacher_rows)
        specialists = []
        for m, classes in enumerate(sets):
            # specialistN.safetensors: saved in the run, reused by --resume when its class set is the same
            weights, role = self.partial / f"specialist{m + 1}.safetensors", f"specialist{m + 1}"
            record = {**model_record(model_cfg, self.data, r), "num_classes": len(classes) + 1, "specialist_classes": classes}
            saved = load_model_file(weights) if resume and weights.exists() else None
            if saved is not None and saved[1].get("specialist_classes") == classes:
                log.info("%s: already trained, loading %s", role, weights)
                model = build(len(classes) + 1)
                load_weights(model, saved[0], source=str(weights))
                specialists.append(model.to(accelerator.device).eval())
                continue
            model = train_specialist(generalist, rows, classes, m, build, spec.train or r.teacher.train, seed=r.seed,
                                     accelerator=accelerator, progress=self.progress, special_share=spec.special_share,
                                     state_dir=self.partial / "state" / role, resume=resume)
            if self.main:
                save_model(weights, model, record)
            specialists.append(model)
        return GeneralistWithSpecialists(generalist, specialists, sets, spec.top_n)

    def _teacher_model_config(self):
        if self.teacher_checkpoint:
            record = read_model_record(self.teacher_checkpoint)  # the header only: the weights are loaded already
            if "model" in record:
                return model_config_adapter.validate_python(record["model"])
        return self.recipe.teacher.model

    def _bias_corrected(self, student: torch.nn.Module) -> BiasShifted:
        t, n = self.recipe.transfer, self.data.num_classes
        student = student.cpu()
        value = t.bias_correction if t.bias_correction != "auto" else choose_bias(student, self.data.val, t.omit_classes, n)
        log.info("student+bias: omitted classes %s raised by %.2f", t.omit_classes, value)
        corrected = BiasShifted(student, class_shift(n, t.omit_classes, value))
        corrected.value = float(value)  # reported as the bias
        return corrected

    def _train_role(self, role, model, role_cfg, method, accelerator, resume, train=None, data=None):
        weights = self.partial / self.task.saved_name(role)
        record = self.task.record(role_cfg.model, self.data)
        history_file = self.partial / f"{role}.history.json"
        if resume and weights.exists() and history_file.exists():
            log.info("%s: already trained, loading %s", role, weights)
            if weights.is_dir():  # a text model's folder (a .safetensors file checks its own sha256)
                check_sealed(weights, f"delete it to train {role} again, or rerun without --resume")
            model = self.task.load_trained(model, weights)
            saved = read_checked_json(history_file, f"delete it and {weights} to train {role} again, or rerun without --resume")
            return model, saved["history"], saved["train_seconds"], epochs_run(saved["history"])
        t0 = time.perf_counter()
        result = fit(model, method, self.teacher_rows if data is None else data, self.data.val, train or role_cfg.train, seed=self.recipe.seed,
                     accelerator=accelerator, state_dir=self.partial / "state" / role, resume=resume,
                     desc=role, progress=self.progress, task=self.task)
        score = f"val {self.task.metric} {result.best_val_score:.4f}" if result.best_val_score == result.best_val_score else "no validation split: last epoch kept"
        log.info("%s: best epoch %d (%s), %.1f s", role, result.best_epoch, score, time.perf_counter() - t0)
        model = accelerator.unwrap_model(model)
        if self.main:
            self.task.save_model(model, weights, record)
            atomic_write_text(history_file, checked_json({"history": result.history, "train_seconds": result.train_seconds}))
        return model, result.history, result.train_seconds, epochs_run(result.history)

    def _publish(self) -> None:
        """Swap the finished run into place; the resumable training state is no longer needed."""
        leftovers = [self.partial / "state", self.partial / "teacher-cache", *self.partial.glob("*.history.json")]
        remove_temp_files(self.partial)  # of writes a kill interrupted before --resume
        # SHA256SUMS of every file of the run; first, so that a full disk here still leaves a run --resume finishes
        seal(self.partial, leave_out={p.name for p in leftovers})
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        old = self.out.with_name(self.out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed in the middle of this swap
        if self.out.exists():
            self.out.rename(old)
        self.partial.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)


def epochs_run(history: list[dict]) -> int:
    """Epochs a role trained (history rows are epochs, or validations every train.eval_every steps)."""
    return int(history[-1]["epoch"]) if history else 0


def _first_difference(a, b, prefix=""):
    """(dotted key, old, new) of the first difference between two nested dicts, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def check_resumable(recipe: Recipe, resume: bool) -> None:
    """--resume continues a killed run: its <name>.partial folder must exist (checked before the data is loaded)."""
    out = Path(recipe.output_dir) / recipe.name
    partial = out.with_name(out.name + ".partial")
    if resume and not partial.is_dir():
        done = f"; {out} is a finished run" if out.exists() else ""
        raise UserError(f"--resume: there is no killed run to continue ({partial} does not exist{done}): run without --resume")


def run_recipe(recipe: Recipe, *, stages=ROLES, teacher_checkpoint=None, resume=False, progress=True) -> tuple[dict, Path]:
    check_resumable(recipe, resume)
    exp = Experiment(recipe, stages=stages, teacher_checkpoint=teacher_checkpoint, progress=progress)
    results = exp.run(resume=resume)
    return results, exp.out


def summary(results: dict, out: Path) -> str:
    return f"{format_table(results)}\n\nreport: {out / 'report.md'}\nresults: {out / 'results.json'}"
