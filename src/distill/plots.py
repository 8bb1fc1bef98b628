"""Plots for the run report: training curves and accuracy vs model size (PNG, Agg backend, atomic writes)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must happen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from distill.durable import AtomicTarget  # noqa: E402
from distill.report import ordered_models, quality_kind, quality_of  # noqa: E402


def _save(fig, path) -> Path:
    """savefig atomically (distill.durable); always closes the figure."""
    path = Path(path)
    try:
        with AtomicTarget(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history or []):
        if isinstance(row, dict) and _finite(row.get(key)):
            x = row.get("step", row.get("epoch"))  # rows every train.eval_every steps carry their step
            xs.append(x if _finite(x) else i + 1)
            ys.append(row[key])
    return xs, ys


def _role_order(roles) -> list[str]:
    roles = list(roles)
    return (["teacher"] if "teacher" in roles else []) + [r for r in roles if r != "teacher"]


_FIXED = {"teacher": 0, "scratch": 1, "student": 2}


def _color(role: str, others: list[str]) -> str:
    """The same colour for a role in every plot: teacher/scratch/student fixed, other roles after them."""
    if role in _FIXED:
        return f"C{_FIXED[role]}"
    return f"C{(3 + others.index(role)) % 10}" if role in others else "C9"


# What each logged part of a method's loss is (methods/*.py return them unweighted, as `parts`)
PART_NAMES = {"hard": "cross-entropy with the labels", "ce": "cross-entropy with the labels",
              "soft": "loss to the teacher's soft targets", "kl": "KL to the peers", "teacher": "KL to the teacher",
              "tckd": "target-class KD (DKD)", "nckd": "non-target-class KD (DKD)", "hint": "hint MSE",
              "derivative": "input-derivative matching", "bss": "boundary-sample KL", "at": "attention transfer",
              "hidden": "hidden-state loss", "attention": "attention KL", "embedding": "embedding MSE"}


def _keys(histories: dict) -> list[str]:
    seen = {}
    for rows in (histories or {}).values():
        for row in rows or []:
            if isinstance(row, dict):
                seen.update(dict.fromkeys(k for k, v in row.items() if _finite(v)))
    return list(seen)


def trained_without_validation(histories: dict) -> bool:
    """True when there are training rows but no role has a validation figure (val_fraction 0)."""
    keys = _keys(histories)
    return any(k.startswith("train_") for k in keys) and not any(k.startswith("val_") for k in keys)


def curve_panels(histories: dict) -> list[tuple[str, str]]:
    """(history key, axis label) of each panel: the validation metric, the validation loss (cross-entropy on
    the validation rows: comparable across roles), the total training loss (each role's own objective: not
    comparable across roles), then each logged training term on its own. Only keys some role has."""
    keys = _keys(histories)
    panels = [(k, "validation " + k[4:].replace("_", " ")) for k in keys if k.startswith("val_") and k != "val_loss"]
    if "val_loss" in keys:
        panels.append(("val_loss", "validation loss (cross-entropy)"))
    if "train_loss" in keys:
        panels.append(("train_loss", "total training loss\n(each role's own objective: not comparable)"))
    for k in keys:
        if k.startswith("train_") and k != "train_loss":
            name = k[len("train_"):]
            panels.append((k, f"training term '{name}', unweighted" + (f"\n({PART_NAMES[name]})" if name in PART_NAMES else "")))
    return panels


def plot_training_curves(histories: dict[str, list[dict]], path) -> Path | None:
    """One panel per figure in the histories (see curve_panels), one line per role that has it; None if nothing
    to plot. No validation panel when no role has validation rows."""
    panels = curve_panels(histories)
    roles = _role_order((histories or {}).keys())
    if not panels:
        return None
    others = [r for r in roles if r not in _FIXED]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        losses = []
        for role in roles:
            xs, ys = _series(histories[role], key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=role, color=_color(role, others))
                losses += ys
        if not key.startswith("val_") or key == "val_loss":
            if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
                ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        by_step = {"step" in row for role in roles for row in histories[role] or [] if isinstance(row, dict)}
        ax.set_xlabel({frozenset({True}): "step", frozenset({False}): "epoch"}.get(frozenset(by_step), "epoch or step"))
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_size(results: dict, path) -> Path | None:
    """Scatter of quality (accuracy %, or the task metric) against parameter count (log x), labelled by role."""
    models = ordered_models(results or {})
    kind, label = quality_kind(models)
    points = []
    for role, m in models.items():
        q, params = quality_of(m, kind), m.get("params")
        if q is not None and _finite(params) and params > 0:
            points.append((role, params, q * 100 if kind == "accuracy" else q))
    if not points:
        return None
    others = [r for r in models if r not in _FIXED]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for role, x, y in points:
        ax.scatter([x], [y], s=60, zorder=3, color=_color(role, others))
        ax.annotate(role, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs model size")
    ax.grid(alpha=0.3, which="both")
    ys = [y for _, _, y in points]
    pad = max((max(ys) - min(ys)) * 0.15, 0.5 if kind == "accuracy" else abs(max(ys)) * 0.05 or 0.1)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    xs = [x for _, x, _ in points]
    ax.set_xlim(min(xs) / 2, max(xs) * 2)
    fig.tight_layout()
    return _save(fig, path)
