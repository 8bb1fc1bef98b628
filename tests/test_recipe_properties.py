"""Property: any recipe mapping and any `key=value` overrides either validate or are refused with a one-line
UserError, never another exception (hypothesis, derandomized so a run is repeatable)."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.errors import UserError
from distill.recipe import Recipe, load_recipe

# keys a recipe really has (so the fuzz reaches deep validators), plus some it does not
SECTIONS = {
    "data": ["dataset", "path", "val_fraction", "test_fraction", "max_length", "targets", "pack", "format", "image_size",
             "vocab_size", "unlabelled_rows", "train_rows", "target_choice", "source_column"],
    "teacher": ["model", "train", "checkpoint", "ensemble", "specialists", "cache", "precision"],
    "student": ["model", "train", "distill_train"],
    "distill": ["method", "temperature", "hard_weight", "soft_weight", "student_layer", "teacher_layer", "k", "rest"],
    "transfer": ["rows", "heldout_fraction", "omit_classes", "bias_correction"],
    "generate": ["beam", "k_best", "sample", "temperature"],
    "report": ["repeats", "trackers"],
    "variants": ["a", "b"],
    "assistants": [],
}
TRAIN_KEYS = ["epochs", "lr", "batch_size", "warmup_epochs", "warmup_steps", "max_steps", "schedule", "optimizer", "grad_accum"]
WORDS = ["kd", "hints", "dkd", "topk", "mlp", "cnn", "digits", "table", "lm", "en-es", "auto", "net.0", "x", "", "cosine",
         "sgd", "nope", "fp16", "heldout", "best", "closest", "chat"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(WORDS))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["kind", "method", "hidden", "epochs", "lr", "train", "model", "x"] + TRAIN_KEYS), inner,
                    max_size=3)), max_leaves=6)


@st.composite
def recipes(draw):
    raw = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "name", "seed", "typo"]), max_size=5, unique=True)):
        keys = SECTIONS.get(section, [])
        if keys and draw(st.booleans()):
            raw[section] = draw(st.dictionaries(st.sampled_from(keys), values, max_size=4))
        else:
            raw[section] = draw(values)
    return raw


key_paths = st.lists(st.sampled_from([*SECTIONS, "train", "model", "name", *TRAIN_KEYS, *WORDS[:6]]), min_size=1,
                     max_size=4).map(".".join)
overrides = st.lists(st.one_of(
    st.tuples(key_paths, st.sampled_from(["=", "", "=="]), st.one_of(st.sampled_from(WORDS), st.sampled_from(
        ["[1,2]", "{a: 1}", ".inf", ".nan", "-1", "0", "1e-3", "[", "{kind: mlp}", "null", "true"]))).map("".join),
    st.text(max_size=8)), max_size=3)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=recipes(), items=overrides)
def test_any_recipe_and_overrides_validate_or_fail_in_one_line(tmp_path, raw, items):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        recipe = load_recipe(path, items)
    except UserError as e:
        assert str(e) and "\n" not in str(e), str(e)
    else:
        assert isinstance(recipe, Recipe)


LAUGHS = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcde", "bcdef"))  # 10**6 values from 7 lines


@pytest.mark.parametrize("text, items, message", [
    ("name: x\n", ["data.val_fraction=.nan"], "data.val_fraction: nan is not a finite number"),
    ("name: x\n", ["teacher.train.lr=-.inf"], "teacher.train.lr: -inf is not a finite number"),
    ("name: x\n", ["variants.a.distill.temperature=.inf"], "variants.a.distill.temperature: inf"),
    ("name: x\n", ["student.model.hidden=[.inf]"], "student.model.hidden.0: inf"),
    ("name: x\n", ["distill=3"], "distill"),
    ("name: x\n", ["data..dataset=mnist"], "has an empty part"),
    ("name: x\n", ["seed=&a [*a]"], "contains itself (a YAML alias loop)"),
    ("student: &s {model: {hidden: [*s]}}\n", [], "contains itself (a YAML alias loop)"),
    (LAUGHS, [], "more than 100,000 values"),
])
def test_found_by_the_property(tmp_path, text, items, message):
    """Cases the property (or its longer runs) found: each is one line now, not inf accepted or a RecursionError."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as e:
        load_recipe(path, items)
    assert "\n" not in str(e.value)
