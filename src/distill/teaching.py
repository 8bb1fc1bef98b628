"""What each distilled stage of a run learns from: its training rows and its teacher signal.

A distilled stage (the student, or a variant, see distill.variants) learns from
  - rows: the students' rows, with the targets its data.targets names (translation, language models: a `distill
    generate` folder, or `auto`, the teacher's decoding written into the run folder after the teacher stage, kept
    when the run is published as `teacher-targets/`); stages with the same data.targets and target_choice share
    one set of rows;
  - a signal: the live teacher, or a teacher cache (teacher.cache: a folder written by `distill cache`, or `auto`,
    the teacher's logits written into the run folder) over exactly the student's rows, which every stage with the
    student's rows reads when it learns from the teacher itself (not from an assistant).
Everything that can be checked before anything trains is checked by `check`, one line per refusal.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from distill.cache_fit import check_cache_fits
from distill.errors import UserError
from distill.methods import REGISTRY
from distill.signals import CachedDataset, CachedTeacher, LiveTeacher, open_cache
from distill.variants import checked, targets_key

log = logging.getLogger("distill")
TARGETS = "teacher-targets"  # data.targets: auto, in the run folder


def check_auto_cache(recipe) -> None:
    """teacher.cache: auto stores logits only: methods that need the teacher network or its layers are refused."""
    from distill.cache_fit import check_cache_jitter, teacher_layers

    method = REGISTRY[recipe.distill.method]
    reads = "its layers" if teacher_layers(recipe.distill) else "the network" if method.reads_network(recipe.distill) else None
    if reads:
        raise UserError(f"teacher.cache: auto stores the teacher's logits only, and distill.method={method.name} reads "
                        f"{reads}: remove teacher.cache")
    check_cache_jitter(recipe)


class Teaching:
    def __init__(self, recipe, task, student_rows, partial: Path, *, teacher_checkpoint: str | None, main: bool):
        self.recipe, self.task, self.student_rows, self.partial = recipe, task, student_rows, partial
        self.teacher_checkpoint, self.main = teacher_checkpoint, main
        self.cache = None
        self._rows: dict[tuple, object] = {}
        cache = recipe.teacher.cache
        self.stored = bool(cache and cache != "auto")  # a `distill cache` folder, known before the run

    def teacher_weights(self) -> Path:
        """The teacher's saved weights: given (--teacher), or written by this run's teacher stage."""
        return Path(self.teacher_checkpoint) if self.teacher_checkpoint else self.partial / self.task.saved_name("teacher")

    def rows(self, stage):
        """The rows a distilled stage learns from, made once per (data.targets, target_choice)."""
        key = targets_key(stage)
        if key not in self._rows:
            data, teacher = stage.data, self.teacher_checkpoint
            if data.targets == "auto":  # written by `prepare`, after the teacher stage
                data, teacher = data.model_copy(update={"targets": str(self.partial / TARGETS)}), str(self.teacher_weights())
            self._rows[key] = self.task.distill_rows(self.student_rows, data, teacher)
        return self._rows[key]

    def reads_cache(self, stage, from_teacher: bool) -> bool:
        """Whether a stage learning from the teacher itself (from_teacher) reads the cache: only over its rows."""
        return bool(self.recipe.teacher.cache) and from_teacher and targets_key(stage) == targets_key(self.recipe)

    def open_stored(self, teacher) -> None:
        """teacher.cache: DIR, opened and checked against the student's rows (and the teacher, when given)."""
        if self.recipe.data.targets == "auto":
            raise UserError("teacher.cache holds outputs over rows known before the run, and data.targets: auto makes "
                            "the student's rows in the run: use teacher.cache: auto, or generate the targets first")
        rows = self.rows(self.recipe)
        try:
            self.cache = open_cache(self.recipe.teacher.cache, teacher=teacher, dataset=rows)
        except UserError as e:
            raise UserError(f"teacher.cache: {e} (`distill cache` with this recipe caches the rows its students learn from)") from None

    def check(self, distilled: dict, teacher, student_init, *, live: bool) -> None:
        """Every distilled stage before anything is written: its rows (data.targets folders read and checked), its
        method against the teacher (when there is a live one) and the cache it reads (if any)."""
        for name, stage in distilled.items():
            checked(name, self._check_stage, name, stage, teacher, student_init, live)

    def _check_stage(self, name, stage, teacher, student_init, live: bool) -> None:
        r = self.recipe
        auto = stage.data.targets == "auto"
        if auto:
            self._check_generates(stage, live)
        rows = None if auto else self.rows(stage)
        # with assistants, the student's check stands for the first assistant's, which reads the cache
        if self.reads_cache(stage, from_teacher=name == "student" or not r.assistants):
            if r.teacher.cache == "auto":
                check_auto_cache(stage)
            else:
                check_cache_fits(self.cache, stage, rows, student_init)
        elif not live and not r.assistants:
            raise UserError("its data.targets differ from the student's, so it learns from the live teacher, which "
                            "teacher.cache stands in for here: pass --teacher PATH too")
        if live:
            REGISTRY[stage.distill.method].check(stage.distill, teacher, student_init)

    def _check_generates(self, stage, live: bool) -> None:
        r = self.recipe
        if r.teacher.ensemble or not live:
            raise UserError("data.targets: auto decodes with one teacher network: not with teacher.ensemble or a "
                            "teacher.cache without --teacher; give one teacher, or data.targets: a generated folder")
        if stage.data.target_choice == "closest" and r.generate.k_best < 2:
            raise UserError("data.target_choice: closest picks among the teacher's k best translations, and "
                            "generate.k_best is 1: set generate.k_best (Kim & Rush: 5)")

    def prepare(self, teacher, accelerator, distilled: dict, student_init) -> None:
        """After the teacher stage: data.targets auto, then teacher.cache auto (over the student's rows, which may be
        those targets). Written once by the main process; every process then reads them."""
        if any(stage.data.targets == "auto" for stage in distilled.values()):
            self._auto_targets(teacher, accelerator)
        if self.recipe.teacher.cache == "auto":
            self.cache = self._auto_cache(teacher, accelerator, student_init)

    def _auto_targets(self, teacher, accelerator) -> None:
        """The teacher's decoding of the students' training rows (recipe.generate), sharded and atomic, so
        --resume continues at the first unfinished shard (distill.generate); reused when already complete."""
        from distill.generate import generate, model_sha256

        path, g = self.partial / TARGETS, self.recipe.generate
        if self.main and not path.exists():
            t0 = time.perf_counter()
            generate(self.task, teacher, self.student_rows, path, teacher_sha256=model_sha256(self.teacher_weights()),
                     num_beams=g.beam, k_best=g.k_best, max_new_tokens=g.max_new_tokens, sample=g.sample,
                     temperature=g.temperature, seed=self.recipe.seed, batch_size=g.batch_size,
                     shard_size=g.shard_size, resume=True, progress=log.info, device=accelerator.device)
            log.info("%s: %d rows in %.1f s", TARGETS, len(self.student_rows), time.perf_counter() - t0)
        accelerator.wait_for_everyone()

    def _auto_cache(self, teacher, accelerator, student_init):
        """teacher.cache: auto: the teacher's full float32 logits over the students' rows, written once in the run
        folder (resumable) by the main process; every distilled epoch then reads them instead of running the
        teacher, with the same result as the live teacher (it runs in eval mode either way)."""
        from distill.signals.cache import write_cache

        path, rows = self.partial / "teacher-cache", self.rows(self.recipe)
        if self.main:
            t0 = time.perf_counter()
            write_cache(teacher, rows, path, dtype="float32", batch_size=self.task.inference_batch, device=accelerator.device)
            log.info("teacher-cache: %d rows in %.1f s", len(rows), time.perf_counter() - t0)
        accelerator.wait_for_everyone()
        cache = open_cache(path, dataset=rows)
        check_cache_fits(cache, self.recipe, rows, student_init)
        return cache

    def signal(self, teacher, stage, from_teacher: bool):
        """(teacher signal, training rows) of a distilled stage: the cache when it reads one, else the live teacher."""
        rows = self.rows(stage)
        if self.cache is not None and self.reads_cache(stage, from_teacher):
            return CachedTeacher(), CachedDataset(rows, self.cache)
        return LiveTeacher(teacher, self.recipe.teacher.precision), rows
