"""PNG figures of evaluation results: insertion/deletion curves, accuracy against k, confidence histograms.

matplotlib with the Agg backend (no display needed, safe in worker processes). Every function takes plain
numbers (lists / arrays, as in the evaluation JSON), writes one PNG atomically (temporary name, then
os.replace) and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .._io import atomic_path  # noqa: E402


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def insertion_deletion_curves(
    curves: Mapping[str, Mapping[str, Mapping[str, Sequence[float] | float]]],
    path: str | Path,
    *,
    quantity: str = "prob",
    title: str | None = None,
) -> Path:
    """Insertion (left) and deletion (right) curves, one line per method and ranking.

    curves[label][mode] with mode in {"insertion", "deletion"} holds "x", the `quantity` ("prob" or "accuracy")
    and its "<quantity>_auc", as written by `InsertionDeletion.to_dict()`. The label is e.g. "c2mf k=10 / IG".
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, ("insertion", "deletion")):
        for label, modes in curves.items():
            c = modes[mode]
            ax.plot(c["x"], c[quantity], marker=".", label=f"{label}  (AUC {float(c[f'{quantity}_auc']):.3f})")
        ax.set_title(f"{mode} ({'higher' if mode == 'insertion' else 'lower'} AUC is better)")
        ax.set_xlabel(f"fraction of concepts {'inserted' if mode == 'insertion' else 'deleted'}")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        _legend(ax, len(curves))
    axes[0].set_ylabel("probability of the class" if quantity == "prob" else "accuracy")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _legend(ax: plt.Axes, n: int) -> None:
    """A legend that stays readable: inside the axes for a few lines, below them (in columns) for many, so it
    never hides the curves."""
    if n <= 4:
        ax.legend(fontsize=9, framealpha=0.9)
    else:
        ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def accuracy_vs_k(
    series: Mapping[str, Sequence[tuple[int, float, float]]],
    path: str | Path,
    *,
    ylabel: str = "per-class reconstruction accuracy",
    title: str | None = None,
) -> Path:
    """Mean +- std (error bars) against k, one line per method: series[method] = [(k, mean, std), ...]."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=label)
    ax.set_xlabel("number of concepts k")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, len(series))
    if title:
        ax.set_title(title)
    return _save(fig, path)


def confidence_histograms(hist: Mapping[str, Sequence[float] | float], path: str | Path, *,
                          title: str | None = None) -> Path:
    """The two max-softmax histograms of `metrics.ood.confidence_histograms` (whole images vs crops)."""
    edges = list(hist["edges"])
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.bar(edges[:-1], hist["in_fraction"], width=widths, align="edge", alpha=0.6,
           label=f"whole images (mean {float(hist['mean_in']):.3f})")
    ax.bar(edges[:-1], hist["out_fraction"], width=widths, align="edge", alpha=0.6,
           label=f"crops (mean {float(hist['mean_out']):.3f})")
    ax.set_xlabel("max-softmax confidence")
    ax.set_ylabel("fraction of inputs")
    ax.set_xlim(0, 1)
    ax.legend()
    ax.set_title(title or f"confidence gap {float(hist['mean_gap']):.3f}")
    return _save(fig, path)
