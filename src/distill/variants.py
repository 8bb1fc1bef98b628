"""Variants: more distilled students in the same run, e.g. Kim & Rush's word-KD, seq-KD, seq-inter and word + seq.

    variants:
      seq-kd:    {data: {targets: auto}, distill: {soft_weight: 0, hard_weight: 1}}
      seq-inter: {data: {targets: auto, target_choice: closest}, distill: {soft_weight: 0, hard_weight: 1}}

A variant names what it changes of the distilled student: `distill.*` (merged into the recipe's distill section, or
replacing it when it names another method), `student.distill_train.*` (merged likewise), `data.targets` and
`data.target_choice`. Nothing else: every variant trains the student's network from the same initial weights and
batches as `scratch` and `student`, so the only difference between them is how the teacher teaches. The runner
treats the student and every variant as distilled stages of one loop (`distilled_stages`): each is checked before
anything trains, trained, resumed, evaluated and reported under its name.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from distill.errors import UserError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]*$")  # a folder and file name in the run (no dots: no report.md)
RESERVED = {"teacher", "scratch", "student", "student+bias", "teacher+specialists", "state", "tracking", "export",
            "teacher-cache", "teacher-targets"}  # roles and folders of a run
ALLOWED = "distill.*, student.distill_train.*, data.targets and data.target_choice"


def check_names(variants: dict) -> None:
    """Variant names are run folder names and tracker keys: refused when reserved, unsafe or colliding."""
    keys = {}
    for name in variants:
        if not NAME.match(str(name)) or name in RESERVED or re.fullmatch(r"(assistant|specialist)\d+", name):
            raise ValueError(f"variants.{name}: a variant's name must be letters, digits, _ + - (no dots) and not a role "
                             f"or folder of the run ({', '.join(sorted(RESERVED))}, assistantN, specialistN): rename it")
        key = re.sub(r"[^\w.\-/]", "_", name)  # as trackers see it (tracking.metric_key)
        if key in keys:
            raise ValueError(f"variants.{name} and variants.{keys[key]} are the same name to trackers ({key}): rename one")
        keys[key] = name


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _forbidden(partial: dict) -> str | None:
    """The first dotted key of `partial` that a variant may not set, or None."""
    for section, value in partial.items():
        allowed = {"distill": None, "student": {"distill_train"}, "data": {"targets", "target_choice"}}.get(section, set())
        if allowed is None:
            continue
        if not isinstance(value, dict) or not allowed:
            return section
        extra = [k for k in value if k not in allowed]
        if extra:
            return f"{section}.{extra[0]}"
    return None


def variant_raw(base: dict, name: str, partial: Any) -> dict:
    """The whole recipe of variant `name` as a plain dict: `base` (a recipe's fields, validated or plain) with
    `partial` merged in and no variants of its own."""
    if not isinstance(partial, dict) or not partial:
        raise ValueError(f"variants.{name}: give what the variant changes, e.g. {{distill: {{temperature: 2}}}} "
                         f"(it may change {ALLOWED})")
    bad = _forbidden(partial)
    if bad:
        raise ValueError(f"variants.{name}.{bad}: a variant may change only {ALLOWED} (it trains the student's network "
                         "on the student's rows from the same initial weights): remove it, or run another recipe")
    raw = {k: _plain(v) for k, v in base.items() if k != "variants"}
    distill = partial.get("distill") or {}
    if isinstance(distill, dict) and distill.get("method", raw["distill"]["method"]) == raw["distill"]["method"]:
        distill = {**raw["distill"], **distill}  # same method: the recipe's settings unless the variant sets them
    train = (partial.get("student") or {}).get("distill_train") or {}
    if train:
        raw["student"] = {**raw["student"], "distill_train": {**(raw["student"].get("distill_train") or {}), **train}}
    raw["data"] = {**raw["data"], **(partial.get("data") or {})}
    return {**raw, "distill": distill}


def distilled_stages(recipe) -> dict:
    """{"student": the recipe, variant name: its merged recipe, ...}: every distilled student of the run, in order."""
    from distill.recipe import Recipe

    base = {field: getattr(recipe, field) for field in type(recipe).model_fields}
    return {"student": recipe, **{name: Recipe.model_validate(variant_raw(base, name, partial))
                                  for name, partial in recipe.variants.items()}}


def targets_key(stage) -> tuple:
    """What decides a distilled stage's training rows: the same key, the same rows (and the same teacher cache)."""
    d = stage.data
    return (d.targets, d.target_choice) if d.targets else (None, None)


def checked(name: str, check, *args):
    """check(*args), its one-line refusal naming the variant (the student's as it is)."""
    try:
        return check(*args)
    except UserError as e:
        if name == "student":
            raise
        raise UserError(f"variants.{name}: {e}") from None
