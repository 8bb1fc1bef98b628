"""Checks of a run, before and after it.

Before anything trains (called by the runner's `Experiment._preflight` once the data is loaded and the models are
built): each split has the rows its purpose needs, every stage's warm-up and its method's epoch schedule end before
its training does, and the layers a feature method names exist in the networks and give what it needs. A mistake
found here costs seconds, not a trained teacher.

After a run (`run_warnings`): what a user should hear even when nothing failed: a model that learnt nothing usable,
a student that is not smaller than its teacher. One line each, in the log, in results.json ("warnings") and in
report.md."""

from __future__ import annotations

import math

import torch

from distill.errors import UserError

# the fewest rows a split may have, and why: a model cannot learn from fewer training rows, and a score on fewer
# test or validation rows is mostly noise (a 1-row test set scores 0% or 100%)
MIN_ROWS = {"train": (10, "to learn from"), "val": (5, "to pick the best epoch on"),
            "test": (10, "for a test score that is not noise")}


def check_split_sizes(data, val_fraction: float = 0.0, splits=tuple(MIN_ROWS)) -> None:
    """Every split (of `splits`) has at least MIN_ROWS rows; the validation split may be empty only when
    data.val_fraction is 0 (then the last epoch is kept)."""
    for split, (minimum, purpose) in MIN_ROWS.items():
        if split not in splits:
            continue
        n = len(getattr(data, split))
        if split == "val" and n == 0 and val_fraction == 0:
            continue
        if n < minimum:
            fix = "give more rows" + (", or data.val_fraction: 0 to keep the last epoch" if split == "val" else "")
            raise UserError(f"{data.name}: the {split} split has {n} rows; it needs at least {minimum} {purpose}: {fix}")


def check_rows(rows: int, role: str) -> None:
    """The rows one stage trains on (the teacher's after transfer.rows: heldout, a student's labelled rows)."""
    minimum = MIN_ROWS["train"][0]
    if rows < minimum:
        raise UserError(f"{role} would train on {rows} rows; it needs at least {minimum}: give more training "
                        "rows, or change transfer.heldout_fraction / data.unlabelled_fraction")


def check_schedule(train, rows: int, role: str, method=None) -> None:
    """The stage's warm-up (train.warmup_steps or warmup_epochs) ends before its training does, and so do the epoch
    schedules of its method (distill.warmup_epochs of dkd, distill.hint_epochs of hints)."""
    from distill.schedule import check_warmup, plan_training

    plan = plan_training(train, math.ceil(rows / train.batch_size), role, quiet=True)
    check_warmup(train, plan, role)
    for field, limit, never in (("warmup_epochs", plan.epochs, "the loss never reaches its full weight"),
                                ("hint_epochs", plan.epochs - 1, "the KD loss is never added")):
        value = getattr(method, field, None) or 0
        if value > limit:
            raise UserError(f"{role}: distill.{field}={value} but it trains {plan.epochs} epochs, so {never}: lower "
                            f"distill.{field} or train longer")


def layer_fields(config) -> tuple[list[str], list[str]]:
    """(student layers, teacher layers) a method's config names (hints: student_layer / teacher_layer; attention:
    student_layers / teacher_layers)."""
    def names(one: str, many: str) -> list[str]:
        single = getattr(config, one, None)
        return [*([single] if single else []), *(getattr(config, many, None) or [])]

    return names("student_layer", "student_layers"), names("teacher_layer", "teacher_layers")


def check_layers(config, teacher, student, rows, precision: str = "fp32") -> None:
    """The layers a feature method names exist and give what it needs (attention: 4-D maps), checked on the networks
    as built, before the teacher trains: the method's setup reads their outputs' shapes on two of `rows` without
    side effects (features.probe). teacher None: a stored cache stands in for it, and the cache check covers it."""
    from distill.data.arrays import gather
    from distill.features import resolve_layers
    from distill.methods import build_method
    from distill.signals import LiveTeacher

    students, teachers = layer_fields(config)
    if not students and not teachers:
        return
    resolve_layers(student, students, "student")
    if teacher is None:
        return
    resolve_layers(teacher, teachers, "teacher")
    if precision != "fp32":  # (a half copy of the teacher is made only when distilling)
        raise UserError(f"distill.method={config.method} reads the teacher's layers in float32, and teacher.precision "
                        f"is {precision}: set teacher.precision: fp32")
    x = rows.x[:2] if isinstance(getattr(rows, "x", None), torch.Tensor) else gather(rows, [0, 1])[0]
    # LiveTeacher freezes the network it wraps, and this teacher may be about to train: give its flags back
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    try:
        build_method(config, LiveTeacher(teacher)).setup(student, x)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def run_warnings(models: dict, baseline: float | None, metric: str) -> list[str]:
    """models: results["models"] (role -> {"score", "params", ...}); baseline: the majority-class test score."""
    warnings = []
    if baseline is not None:
        for role, m in models.items():
            score = m.get("score")
            if score is not None and score == score and score <= baseline + 1e-12:
                warnings.append(f"{role} does not beat the majority-class baseline ({metric} {100 * score:.1f}% vs "
                                f"{100 * baseline:.1f}% for always answering the most common training label): it has "
                                "not learnt from the inputs; train longer (train.min_steps), raise train.lr, or use a "
                                "larger model")
    teacher = models.get("teacher", {}).get("params")
    for role in ("student", "scratch"):
        params = models.get(role, {}).get("params")
        if teacher and params and params >= teacher:
            warnings.append(f"the {role} has {params:,} parameters, {'as many as' if params == teacher else 'more than'} "
                            f"the teacher ({teacher:,}): distillation will not make it smaller; choose a smaller "
                            "student.model")
            break
    return warnings
