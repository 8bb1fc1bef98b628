"""What a finished run should tell a user even when nothing failed: a model that learnt nothing usable, a student
that is not smaller than its teacher. One line each, in the log, in results.json ("warnings") and in report.md."""

from __future__ import annotations


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
