"""A model saved by distill (a .safetensors file, a text model's folder, or a Distiller.save folder), rebuilt with its task and test data.

The file alone is enough: its description (safetensors metadata or distill.json) names the model and the data it
was trained on, so `distill eval` and `distill export` need no recipe.
"""

from __future__ import annotations

from pathlib import Path


def load_saved(checkpoint: str, overrides: list[str] | tuple = (), data_dir: str | None = None):
    """(model in eval mode, task, data) of a saved model; `overrides` (data.key=value) and `data_dir` change
    where its data is read from, not which rows it holds."""
    from distill.checkpoint import load_model_file, load_weights
    from distill.errors import UserError
    from distill.recipe import apply_overrides, validate_recipe
    from distill.tasks import make_task
    from distill.tasks.classification import build_from_record
    from distill.tasks.text import read_record

    stray = [o for o in overrides if not o.startswith("data.")]
    if stray:  # the model is fixed by the file; anything but where its data is would be silently ignored
        raise UserError(f"override {stray[0]!r} has no effect on a saved model: only data.key=value (where its data "
                        "is read from) applies here")
    source = checkpoint
    folder = Path(checkpoint).is_dir()  # a text model (save_pretrained folder with distill.json), or Distiller.save's
    if folder and read_record(checkpoint)["task"] == "classification":
        checkpoint, folder = str(Path(checkpoint) / "model.safetensors"), False  # Distiller.save: weights + description
    model = None
    if folder:
        record = read_record(checkpoint)
    else:
        state, record = load_model_file(checkpoint)
        model = build_from_record(record, checkpoint)
        load_weights(model, state, source=checkpoint)
    given = {o.partition("=")[0] for o in overrides}
    if not record.get("data") and "data.dataset" not in given:
        raise UserError(f"{source} does not record the data it was trained on: name it, e.g. `distill eval {source} "
                        "data.dataset=table data.path=FILE.csv data.label_column=COLUMN` (or save it with "
                        "Distiller.save(DIR, data={...}))")
    data_raw = apply_overrides({"data": dict(record.get("data") or {})}, list(overrides))
    if data_dir:
        data_raw["data"]["data_dir"] = data_dir
    recipe = validate_recipe({**data_raw, "seed": record.get("seed", 0)}, source=checkpoint)
    task = make_task(recipe, checkpoint if folder else None)
    data = task.load_data()
    if folder:
        model = task.load_model(checkpoint, data)
    return model.eval(), task, data
