"""`distill bench` on a causal-LM recipe: every variant runs its steps, and the hand-written loop computes the same
forward-KL loss as distill's divergence method (so the comparison is of loops, not of losses)."""

import pytest
import torch

from distill.recipe import validate_recipe
from distill.speed_lm import LM_VARIANTS, _setup, run_lm_variant
from lm_fixtures import lm_recipe


@pytest.fixture
def raw(tmp_path):
    r = lm_recipe(tmp_path)
    r["student"]["train"]["batch_size"] = 8
    return validate_recipe(r).model_dump(mode="json")


@pytest.mark.parametrize("variant", [v for v in LM_VARIANTS if v != "cached"])
def test_each_variant_times_its_steps(raw, variant):
    out = run_lm_variant(variant, raw, None, 4, 1, 32, 8)
    assert len(out["step_seconds"]) >= 3 and all(s > 0 for s in out["step_seconds"])
    assert out["peak_mb"] >= out["start_mb"] > 0


def test_the_cached_variant_reads_a_top_k_cache(raw, tmp_path):
    from distill.signals import write_cache

    _, train, teacher, _ = _setup(raw, 1, 32)
    write_cache(teacher, train, tmp_path / "cache", top_k=8, batch_size=16)
    out = run_lm_variant("cached", raw, str(tmp_path / "cache"), 4, 1, 32, 8)
    assert len(out["step_seconds"]) >= 3


def test_the_plain_loop_loss_is_the_divergence_methods(raw):
    import torch.nn.functional as F

    from distill.methods.divergence import Divergence, DivergenceConfig
    from distill.signals import LiveTeacher

    _, train, teacher, student = _setup(raw, 1, 32)
    x, y = train.__getitems__(list(range(8)))
    with torch.no_grad():
        t, s = teacher(x), student(x)
        plain = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        ours, _ = Divergence(DivergenceConfig(), LiveTeacher(teacher))(student, x, y)
    assert float(plain) == pytest.approx(float(ours), rel=1e-5)
