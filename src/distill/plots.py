"""Plots for the run report: training curves and accuracy vs model size (PNG, Agg backend, atomic writes)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must happen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from distill.report import ordered_models, quality_kind, quality_of  # noqa: E402


def _save(fig, path) -> Path:
    """savefig to a temp file in the same folder, then os.replace; always closes the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history or []):
        if isinstance(row, dict) and _finite(row.get(key)):
            epoch = row.get("epoch")
            xs.append(epoch if _finite(epoch) else i + 1)
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


def plot_training_curves(histories: dict[str, list[dict]], path) -> Path | None:
    """Two panels (val accuracy vs epoch, train loss vs epoch), one line per role; None if nothing to plot."""
    metrics = [k for h in (histories or {}).values() for row in h for k in row if k.startswith("val_") and k != "val_loss"]
    metric = metrics[0] if metrics else "val_accuracy"  # the task's metric: accuracy, entity_f1, ...
    panels = [(metric, "validation " + metric[4:].replace("_", " ")), ("train_loss", "train loss")]
    data = {key: {} for key, _ in panels}
    for role in _role_order((histories or {}).keys()):
        for key, _ in panels:
            xs, ys = _series(histories[role], key)
            if xs:
                data[key][role] = (xs, ys)
    if not any(data.values()):
        return None
    others = [r for r in _role_order(histories) if r not in _FIXED]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, panels):
        for role, (xs, ys) in data[key].items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=role, color=_color(role, others))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        ax.grid(alpha=0.3)
        if data[key]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if data["train_loss"] and all(y > 0 for _, ys in data["train_loss"].values() for y in ys):
        axes[1].set_yscale("log")
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
