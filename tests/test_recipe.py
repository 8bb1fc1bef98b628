import pytest
import yaml

from distill.errors import UserError
from distill.recipe import apply_overrides, builtin_recipe_path, load_recipe, validate_recipe


def test_builtin_recipes_validate():
    for name in ("digits", "mnist-hinton"):
        r = load_recipe(builtin_recipe_path(name))
        assert r.name == name
    assert load_recipe().name == "digits"  # no path = the default recipe


def test_mnist_recipe_matches_hinton_section_3():
    r = load_recipe(builtin_recipe_path("mnist-hinton"))
    assert r.teacher.model.hidden == [1200, 1200] and r.teacher.model.dropout > 0 and r.teacher.train.jitter == 2
    assert r.student.model.hidden == [800, 800] and r.student.model.dropout == 0
    assert r.distill.temperature == 20


def test_overrides_are_parsed_as_yaml():
    raw = apply_overrides({"distill": {"temperature": 4}}, ["distill.temperature=8", "student.model.hidden=[64, 32]", "name=x"])
    assert raw == {"distill": {"temperature": 8}, "student": {"model": {"hidden": [64, 32]}}, "name": "x"}
    r = validate_recipe(raw)
    assert r.distill.temperature == 8.0 and r.student.model.hidden == [64, 32]


def test_distill_without_method_tag_means_kd():
    assert validate_recipe({"distill": {"temperature": 2}}).distill.method == "kd"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.temprature=3", "did you mean 'distill.temperature'"),
        ("teacher.model.dropot=0.1", "did you mean 'teacher.model.dropout'"),
        ("techer.model.hidden=[3]", "did you mean 'teacher'"),
        ("distill.temperature=0", "distill.temperature: Input should be greater than 0"),
        ("distill.temperature=-1", "greater than 0"),
        ("distill.hard_weight=-0.5", "distill.hard_weight: Input should be greater than or equal to 0"),
        ("distill.soft_weight=0", None),  # hard weight alone is a valid (if pointless) recipe
        ("student.train.epochs=many", "student.train.epochs: Input should be a valid integer"),
        ("data.dataset=cifar", "data.dataset"),
        ("distill.method=nope", "distill.method"),
    ],
)
def test_bad_recipes_get_one_clear_line(override, expected):
    if expected is None:
        load_recipe(None, [override])
        return
    with pytest.raises(UserError) as e:
        load_recipe(None, [override])
    message = str(e.value)
    assert expected in message and "\n" not in message


def test_both_weights_zero_is_refused():
    with pytest.raises(UserError, match="both 0"):
        load_recipe(None, ["distill.hard_weight=0", "distill.soft_weight=0"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(bad)
    with pytest.raises(UserError, match="key=value"):
        load_recipe(None, ["=3"])


def test_yaml_tags_are_not_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(evil)


def test_resolved_recipe_round_trips(tmp_path):
    from distill.recipe import recipe_to_yaml

    r = load_recipe(builtin_recipe_path("mnist-hinton"))
    again = validate_recipe(yaml.safe_load(recipe_to_yaml(r)))
    assert again == r
