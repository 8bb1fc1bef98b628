"""Tasks: what differs between workloads (see base.py). The data set of a recipe decides its task."""

from distill.tasks.base import Task
from distill.tasks.classification import ClassificationTask


def make_task(recipe, teacher_checkpoint: str | None = None) -> Task:
    dataset = recipe.data.dataset
    if dataset in ("imdb", "text"):
        from distill.tasks.text_classification import TextClassificationTask

        return TextClassificationTask(recipe, teacher_checkpoint)
    if dataset in ("en-es", "parallel"):
        from distill.tasks.translation import TranslationTask

        return TranslationTask(recipe, teacher_checkpoint)
    if dataset in ("imdb-lm", "lm"):
        from distill.tasks.causal_lm import CausalLMTask

        return CausalLMTask(recipe, teacher_checkpoint)
    if dataset == "conll":
        from distill.tasks.tagging import TaggingTask

        return TaggingTask(recipe, teacher_checkpoint)
    return ClassificationTask(recipe, teacher_checkpoint)


__all__ = ["ClassificationTask", "Task", "make_task"]
