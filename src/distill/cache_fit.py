"""Whether a teacher cache can stand in for the live teacher in a recipe's distilled stage, checked before
anything is written.

A cache stores the teacher's outputs for the un-augmented transfer rows: its logits (all of them, or the top k
with the full logsumexp) and, optionally, the outputs of some teacher layers. A method fits when it needs
nothing else, and, for a top-k cache, when its loss is exact on what is stored.
"""

import copy

import torch

from distill.data.arrays import gather
from distill.errors import UserError
from distill.methods import build_method
from distill.recipe import Recipe
from distill.signals import CachedTeacher
from distill.signals.cache_format import row_counts

_RENORMALISED_KD = ("kl", "soft_ce")  # exact on the teacher renormalised to its top k


def _topk_problem(config, stored_k: int) -> str | None:
    """Why this method's loss is not exact on a top-`stored_k` cache, or None."""
    name = config.method
    if name in ("kd", "hints", "attention"):
        if config.soft_loss not in _RENORMALISED_KD:
            return f"its soft_loss={config.soft_loss} needs every logit: use soft_loss kl or soft_ce"
        return None
    if name == "topk":
        if config.k > stored_k:
            return f"its k={config.k} is more than the {stored_k} stored: set distill.k <= {stored_k} or cache a larger --top-k"
        if config.rest == "bucket" and config.temperature != 1:
            return ("its rest bucket at temperature != 1 needs logsumexp(t / T), and the cache stores it at T = 1: "
                    "set distill.temperature=1 or rest=renormalize")
        return None
    return "use method kd, hints or attention (soft_loss kl or soft_ce) or topk"


def teacher_layers(config) -> list[str]:
    """The teacher layers a method reads (hints: teacher_layer; attention: teacher_layers): what a cache for it
    must store as features."""
    one = getattr(config, "teacher_layer", None)
    return list(dict.fromkeys([*([one] if one else []), *(getattr(config, "teacher_layers", None) or [])]))


def check_cache_jitter(recipe: Recipe) -> None:
    """A cache holds the teacher's outputs of the un-jittered rows: the first distilled stage must not jitter."""
    first = recipe.assistants[0] if recipe.assistants else recipe.student
    train = getattr(first, "distill_train", None) or first.train
    if train.jitter:
        raise UserError(f"train.jitter={train.jitter} with teacher.cache, whose outputs are of the un-jittered rows: "
                        "set jitter 0 for the distilled stage or remove teacher.cache")


def check_cache_fits(cache, recipe: Recipe, rows, student) -> None:
    """Refuse, with one line, a cache that cannot serve the recipe's first distilled stage exactly."""
    n = min(2, len(rows))  # the first examples, and the cached rows they own (their words, for a tagger)
    x, y = (rows.x[:n], rows.y[:n]) if isinstance(getattr(rows, "x", None), torch.Tensor) else gather(rows, list(range(n)))
    logits, extras = cache.batch(list(range(int(row_counts(rows)[:n].sum()))))
    with torch.inference_mode():
        outputs = student.eval()(x).shape[-1]
    student.train()
    if cache.num_classes != outputs:
        raise UserError(f"teacher.cache holds {cache.num_classes} classes per row but the student predicts {outputs}: use a cache of a teacher for these classes")
    method = recipe.distill
    if cache.top_k is not None:
        why = _topk_problem(method, cache.top_k)
        if why:
            raise UserError(f"teacher.cache stores only the top {cache.top_k} logits, which distill.method={method.method} "
                            f"cannot use exactly ({why}), or use a full-logit cache")
    missing = [name for name in teacher_layers(method) if name not in cache.feature_layers]
    if missing:
        raise UserError(f"distill.method={method.method} reads teacher layer(s) {', '.join(missing)}, which teacher.cache "
                        f"does not store: write the cache with `distill cache RECIPE --features {' '.join(missing)}` "
                        "(the default for this recipe), or use the live teacher")
    check_cache_jitter(recipe)
    probe = build_method(method, CachedTeacher())  # methods that need the network refuse here, before any training
    probe.teacher.feed(logits, inputs=x, **extras)
    student = copy.deepcopy(student)  # a forward in train mode would move batch-norm statistics of the real one
    probe.setup(student, x)
    probe(student, x, y)
