"""Figures of concepts, drawn on the original image through `render.geometry`.

- `explanation_figure`: the image, the model's top classes, and one overlaid heatmap per top concept with its
  id and importance in the panel title.
- `atlas_concept_figure` / `atlas_overview_figure`: the crops that activate a concept most.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # never open a window; figures go to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from ..errors import C2MFError  # noqa: E402
from .geometry import InputGeometry, heatmap_to_original  # noqa: E402

#: One colormap for every heatmap c2mf draws (non-negative codes), and one for signed codes (PCA).
HEATMAP_CMAP = "inferno"
SIGNED_CMAP = "RdBu_r"
#: A panel's colour scale is at least this fraction of the strongest concept's in the same figure.
PANEL_FLOOR = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as RGB, or fail with one clear error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise C2MFError(f"image {str(p)!r} does not exist: check the path")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise C2MFError(f"cannot read image {str(p)!r} ({e}): give a JPEG, PNG or other file PIL can open") from None


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return a[..., :3]


def _display_size(H: int, W: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(H, W))
    return max(1, round(H * s)), max(1, round(W * s))


def overlay_rgba(
    values: np.ndarray,
    seen: np.ndarray | None,
    norm: mcolors.Normalize,
    cmap: str = HEATMAP_CMAP,
    max_alpha: float = 0.8,
) -> np.ndarray:
    """RGBA overlay of a heatmap: colour from `cmap`, opacity growing with the value (|value| when signed),
    so weak regions leave the image visible; transparent where the model saw nothing."""
    v = np.asarray(values, dtype=np.float64)
    rgba = plt.get_cmap(cmap)(norm(v))
    if norm.vmin is not None and norm.vmin < 0:
        strength = np.abs(v) / max(abs(norm.vmin), abs(norm.vmax), 1e-12)
    else:
        strength = (v - norm.vmin) / max(norm.vmax - norm.vmin, 1e-12)
    rgba[..., 3] = max_alpha * np.clip(strength, 0.0, 1.0) ** 0.7
    if seen is not None:
        rgba[..., 3] *= seen
    return rgba


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptPanel:
    """One concept of an explanation: its id, importance for the explained class, and codes on the grid."""

    concept: int
    importance: float
    heatmap: np.ndarray
    name: str | None = None


def _heatmap_norm(panels: Sequence[ConceptPanel]) -> tuple[mcolors.Normalize, str]:
    """One scale for every panel of a figure (vmax = the largest |U| shown); diverging if any code is signed."""
    lo = min((float(np.min(p.heatmap)) for p in panels), default=0.0)
    hi = max((float(np.max(p.heatmap)) for p in panels), default=1.0)
    if lo < -1e-12 * max(abs(hi), 1.0):
        m = max(abs(lo), abs(hi), 1e-12)
        return mcolors.Normalize(-m, m), SIGNED_CMAP
    return mcolors.Normalize(0.0, max(hi, 1e-12)), HEATMAP_CMAP


def _panel_norm(p: ConceptPanel, signed: bool, floor: float) -> mcolors.Normalize:
    """Per-panel scale: 0 to the panel's max (or symmetric around 0 for signed codes), but never below
    `floor`, so a concept that is barely present is drawn faint instead of its noise stretched to full colour."""
    m = float(np.max(np.abs(p.heatmap))) if signed else float(np.max(p.heatmap))
    m = max(m, floor, 1e-12)
    return mcolors.Normalize(-m, m) if signed else mcolors.Normalize(0.0, m)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def explanation_figure(
    image: Image.Image | np.ndarray,
    geometry: InputGeometry,
    top_classes: Sequence[tuple[str, float]],
    panels: Sequence[ConceptPanel],
    *,
    importances: Sequence[tuple[int, float]] | None = None,
    title: str | None = None,
    explained: str | None = None,
    importance_label: str = "importance",
    shared_scale: bool = False,
    panel_inches: float = 2.4,
    max_side: int = 512,
) -> Figure:
    """One figure per image, for a paper or a notebook.

    Top row: the image (the model's crop dashed), the top classes with probabilities, and the importance of
    each concept for the explained class (the concepts drawn below in colour). Below: one panel per concept,
    the image greyed with the concept's codes overlaid (colour and opacity grow with U), titled with its rank,
    id, importance and peak code. Regions outside the model's crop are darkened: the model never saw them.

    Args:
        image: the original image.
        geometry: its preprocessing geometry (`input_geometry`).
        top_classes: (label, probability) pairs, most probable first.
        panels: the concepts to draw, in the order to draw them (most important first).
        importances: (concept id, importance) of every concept, for the bar chart; default the panels'.
        title: figure title (e.g. the file name).
        explained: the class the importances are for.
        importance_label: what the importance numbers are ("Grad-CAM", "IG" ...).
        shared_scale: one colour scale for all panels (compare magnitudes) instead of one per panel (see
            where each concept is, however weak; the default, since the importance is printed on the panel).
        panel_inches: width of one concept panel in inches.
        max_side: the image is drawn downscaled to at most this many pixels per side.
    """
    rgb = _as_rgb_array(image)
    H, W = rgb.shape[:2]
    dh, dw = _display_size(H, W, max_side)
    shown = np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.BILINEAR)) if (dh, dw) != (H, W) else rgb
    aspect = dh / dw
    n = len(panels)
    ncols = max(3, min(n, 5))
    nrows = max(1, math.ceil(n / ncols))
    img_h = panel_inches * aspect
    top_h = max(panel_inches * min(aspect, 1.2), 2.0)
    fig_w = ncols * panel_inches + 0.8
    fig_h = top_h + 0.5 + nrows * (img_h + 0.55) + 0.2
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110, layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[top_h + 0.5, nrows * (img_h + 0.6)])
    top = outer[0].subgridspec(1, 3, width_ratios=[1.0, 1.1, 1.1])
    extent = (0, W, H, 0)
    l, t, r, b = geometry.crop_box()
    cropped = (l, t, r, b) != (0.0, 0.0, float(W), float(H))

    ax_img = fig.add_subplot(top[0, 0])
    ax_img.imshow(shown, extent=extent, interpolation="lanczos")
    if cropped:
        ax_img.add_patch(Rectangle((l, t), r - l, b - t, fill=False, ec="white", lw=1.2, ls="--"))
    ax_img.set_title(f"image {W}x{H}" + (" (dashed: model crop)" if cropped else ""), fontsize=8.5)
    ax_img.set_axis_off()

    _barh(fig.add_subplot(top[0, 1]), [_short(lbl, 34) for lbl, _ in top_classes],
          [float(p) for _, p in top_classes], f"top-{len(top_classes)} classes", "probability",
          ["#4c72b0"] * len(top_classes), xlim=(0.0, 1.0))

    imp = list(importances) if importances is not None else [(p.concept, p.importance) for p in panels]
    imp = sorted(imp, key=lambda cv: -cv[1])[:10]
    drawn = {p.concept for p in panels}
    _barh(fig.add_subplot(top[0, 2]), [f"concept {c}" for c, _ in imp], [float(v) for _, v in imp],
          f"concept importance ({importance_label})", importance_label,
          ["#dd8452" if c in drawn else "#bbbbbb" for c, _ in imp])

    signed = any(float(np.min(p.heatmap)) < -1e-12 * max(float(np.max(np.abs(p.heatmap))), 1.0) for p in panels)
    shared, cmap = _heatmap_norm(panels)
    grid = outer[1].subgridspec(nrows, ncols)
    gray = (0.3 * shown.astype(np.float32) + 0.7 * shown.mean(axis=2, keepdims=True))
    if cropped:  # darken what the model never saw
        _, seen_px = heatmap_to_original(np.zeros((1, 1)), geometry, out_size=(dh, dw))
        gray = gray * np.where(seen_px, 1.0, 0.45)[..., None]
    gray = gray.astype(np.uint8)
    axes = []
    for k, p in enumerate(panels):
        ax = fig.add_subplot(grid[k // ncols, k % ncols])
        axes.append(ax)
        values, seen = heatmap_to_original(p.heatmap, geometry, out_size=(dh, dw))
        norm = shared if shared_scale else _panel_norm(p, signed, PANEL_FLOOR * float(shared.vmax))
        ax.imshow(gray, extent=extent, interpolation="lanczos")
        ax.imshow(overlay_rgba(values, seen, norm, cmap), extent=extent, interpolation="bilinear")
        name = f" '{_short(p.name, 18)}'" if p.name else ""
        peak = float(np.max(np.abs(p.heatmap)))
        ax.set_title(
            f"#{k + 1}  concept {p.concept}{name}\n{importance_label} {_fmt(float(p.importance))}"
            f"  ·  max U {_fmt(peak)}",
            fontsize=8.5,
        )
        ax.set_axis_off()
    for k in range(n, nrows * ncols):
        fig.add_subplot(grid[k // ncols, k % ncols]).set_axis_off()
    if axes:
        bar_norm = shared if shared_scale else (mcolors.Normalize(-1, 1) if signed else mcolors.Normalize(0, 1))
        label = "U (codes)" if shared_scale else "U / panel max"
        cb = fig.colorbar(plt.cm.ScalarMappable(norm=bar_norm, cmap=cmap), ax=axes, shrink=0.85, aspect=25,
                          pad=0.01)
        cb.set_label(label, fontsize=8)
        cb.ax.tick_params(labelsize=7)
    head = title or ""
    if explained is not None:
        head = (head + "  ·  " if head else "") + f"concepts for class: {explained}"
    if head:
        fig.suptitle(head, fontsize=10)
    return fig


def _barh(ax: Any, labels: list[str], values: list[float], title: str, xlabel: str, colors: list[str],
          xlim: tuple[float, float] | None = None) -> None:
    """A horizontal bar chart, first item on top, each bar labelled with its value."""
    y = np.arange(len(values))
    ax.barh(y, values, color=colors, height=0.7)
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.invert_yaxis()
    lo = min([0.0, *values]) if xlim is None else xlim[0]
    hi = max([0.0, *values]) if xlim is None else xlim[1]
    span = max(hi - lo, 1e-12)
    ax.set_xlim(lo - (0.02 * span if lo < 0 else 0.0), hi + 0.28 * span)
    if xlim is not None:
        ax.set_xticks(np.linspace(xlim[0], xlim[1], 6))
    ax.axvline(0.0, color="black", lw=0.6)
    for yi, v in zip(y, values):
        ax.text(v + 0.02 * span if v >= 0 else 0.02 * span, yi, _fmt(v), va="center", fontsize=7)
    ax.set_xlabel(xlabel, fontsize=7.5)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=8.5)
    ax.spines[["top", "right"]].set_visible(False)


def _short(s: str, n: int) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def _tile(crop: np.ndarray, size: int) -> np.ndarray:
    """A crop resized to fit a size x size square (aspect kept, letterboxed in white)."""
    im = Image.fromarray(_as_rgb_array(crop))
    s = size / max(im.width, im.height)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas)


def atlas_concept_figure(
    concept: int,
    crops: Sequence[np.ndarray],
    values: Sequence[float],
    captions: Sequence[str] | None = None,
    *,
    name: str | None = None,
    ncols: int = 4,
    tile_px: int = 160,
) -> Figure:
    """A grid of the crops that activate one concept most, each titled with its activation (and caption)."""
    n = max(1, len(crops))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * 1.9, nrows * 2.15 + 0.45), dpi=110, squeeze=False, layout="constrained"
    )
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= len(crops):
            continue
        ax.imshow(_tile(crops[k], tile_px))
        cap = f"U = {_fmt(float(values[k]))}"
        if captions is not None:
            cap = "\n".join(_short(line, 24) for line in str(captions[k]).split("\n")) + "\n" + cap
        ax.set_title(cap, fontsize=7.5)
    fig.suptitle(f"concept {concept}" + (f" '{name}'" if name else "") + f": top {len(crops)} regions", fontsize=10)
    return fig


def atlas_overview_figure(
    rows: Sequence[tuple[int, Sequence[np.ndarray]]],
    names: dict[int, str] | None = None,
    *,
    per_row: int = 6,
    tile_px: int = 110,
    extra: dict[int, str] | None = None,
) -> Figure:
    """One row per concept with its strongest crops: the page to skim when naming concepts.

    Args:
        rows: (concept id, crops strongest first) per concept.
        names: optional concept names (CLIP or user labels).
        per_row: crops shown per concept.
        extra: optional one-line note per concept (e.g. importance or gate), shown under its id.
    """
    n = max(1, len(rows))
    fig, axes = plt.subplots(
        n, per_row, figsize=(per_row * 1.15 + 1.3, n * 1.2 + 0.5), dpi=110, squeeze=False,
        gridspec_kw={"wspace": 0.04, "hspace": 0.08},
    )
    fig.subplots_adjust(left=1.25 / (per_row * 1.15 + 1.3), right=0.99, top=1 - 0.45 / (n * 1.2 + 0.4), bottom=0.01)
    for r, (concept, crops) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(crops):
                ax.imshow(_tile(crops[c], tile_px))
        label = f"concept {concept}"
        if names and concept in names:
            label += f"\n'{_short(names[concept], 14)}'"
        if extra and concept in extra:
            label += f"\n{extra[concept]}"
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8.5, labelpad=6)
    fig.suptitle("concept atlas: strongest regions per concept", fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int | None = None) -> Path:
    """Write a figure as PNG atomically (temporary file, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
