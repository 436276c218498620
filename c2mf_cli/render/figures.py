"""Figures of concepts, drawn on the original image through `render.geometry`.

- `explanation_figure`: the image, the model's top classes, the concepts' importances, and per meaningful
  concept its heatmap (where) beside its atlas crops (what); composed as arrays with PIL, not matplotlib, so
  that explaining an image costs tens of milliseconds of drawing.
- `atlas_concept_figure` / `atlas_overview_figure`: the crops that activate a concept most.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .._io import atomic_path
from .geometry import InputGeometry, heatmap_to_original

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when an atlas figure is drawn (not by explain,
    whose figures are PIL: importing pyplot cost about a tenth of explain's start)."""
    import matplotlib

    matplotlib.use("Agg")  # never open a window; figures go to files
    import matplotlib.pyplot as plt

    return plt

#: One colormap for every heatmap c2mf draws (non-negative codes), and one for signed codes (PCA).
HEATMAP_CMAP = "inferno"
SIGNED_CMAP = "RdBu_r"
#: A panel's colour scale is at least this fraction of the strongest concept's in the same figure.
PANEL_FLOOR = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return a[..., :3]


# ---------------------------------------------------------------------------------------------------------------
# Heatmap panels as arrays (no matplotlib figure per panel: an explanation is drawn in tens of milliseconds)
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _lut(cmap: str) -> np.ndarray:
    """(256, 3) float colours of a matplotlib colormap, read once per process."""
    from matplotlib import colormaps

    return colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]


def overlay(base: np.ndarray, values: np.ndarray, seen: np.ndarray | None, vmax: float, *, signed: bool,
            max_alpha: float = 0.8) -> np.ndarray:
    """The heatmap over `base` (uint8 RGB): colour from the colormap, opacity growing with the value (|value|
    when signed) so weak regions leave the image visible; nothing drawn where the model saw nothing."""
    v = np.asarray(values, dtype=np.float32)
    m = max(float(vmax), 1e-12)
    if signed:
        t, strength = np.clip(0.5 + 0.5 * v / m, 0.0, 1.0), np.clip(np.abs(v) / m, 0.0, 1.0)
    else:
        t = strength = np.clip(v / m, 0.0, 1.0)
    rgb = _lut(SIGNED_CMAP if signed else HEATMAP_CMAP)[(t * 255).astype(np.int32)] * 255.0
    alpha = (max_alpha * strength ** 0.7)[..., None]
    if seen is not None:
        alpha = alpha * seen[..., None]
    return (base * (1.0 - alpha) + rgb * alpha).astype(np.uint8)


@dataclass(frozen=True)
class ConceptPanel:
    """One concept of an explanation: its id, importance for the explained class, codes on the grid, and
    optionally its name, gate and atlas crops (the regions of a store that activate it most: its "what")."""

    concept: int
    importance: float
    heatmap: np.ndarray
    name: str | None = None
    gate: float | None = None
    crops: tuple[np.ndarray, ...] = ()


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


@lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib) when found, else PIL's own scalable default font."""
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size)


_INK, _MUTED, _POS, _NEG, _OFF, _WARN = (25, 25, 30), (110, 110, 118), (221, 132, 82), (76, 114, 176), \
    (190, 190, 195), (180, 70, 20)


class _Canvas:
    """A white page grown downwards as parts are added; text wrapped to a width."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.parts: list[tuple[int, int, Image.Image]] = []
        self.y = 0

    def text(self, x: int, text: str, size: int = 13, *, bold: bool = False, color=_INK, width: int | None = None,
             gap: int = 4) -> None:
        font = _font(size, bold)
        lines = _wrap(text, font, width or (self.width - x - 12))
        h = int(size * 1.3)
        im = Image.new("RGB", (self.width - x, h * len(lines)), "white")
        d = ImageDraw.Draw(im)
        for i, line in enumerate(lines):
            d.text((0, i * h), line, font=font, fill=color)
        self.add(x, im, gap)

    def add(self, x: int, im: Image.Image, gap: int = 8) -> None:
        self.parts.append((x, self.y, im))
        self.y += im.height + gap

    def image(self) -> Image.Image:
        page = Image.new("RGB", (self.width, self.y + 10), "white")
        for x, y, im in self.parts:
            page.paste(im, (x, y))
        return page


def _wrap(text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if font.getlength(cand) <= width or not line:
                line = cand
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _bars(rows: Sequence[tuple[str, float, tuple[int, int, int]]], width: int, title: str, *, lo: float | None = None,
          hi: float | None = None, row_h: int = 19) -> Image.Image:
    """A horizontal bar chart as an image: label, bar from a zero line, value; negative bars go left."""
    f, fb = _font(11), _font(12, True)
    label_w = int(min(max((f.getlength(r[0]) for r in rows), default=40) + 8, width * 0.45))
    vals = [v for _, v, _ in rows]
    lo = min([0.0, *vals]) if lo is None else lo
    hi = max([0.0, *vals]) if hi is None else hi
    span = max(hi - lo, 1e-12)
    left = 48 if lo < 0 else 0  # room for the values of negative bars, left of them
    plot_w = width - label_w - left - 54
    im = Image.new("RGB", (width, 22 + row_h * max(len(rows), 1) + 4), "white")
    d = ImageDraw.Draw(im)
    d.text((0, 0), title, font=fb, fill=_INK)
    label_w += left
    x0 = label_w + int(plot_w * (0.0 - lo) / span)
    for i, (label, v, color) in enumerate(rows):
        y = 22 + i * row_h
        shown = label
        while f.getlength(shown) > label_w - left - 6 and len(shown) > 4:
            shown = shown[:-2] + "…"
        d.text((label_w - left - 6 - f.getlength(shown), y + 2), shown, font=f, fill=_INK)
        x1 = label_w + int(plot_w * (v - lo) / span)
        d.rectangle([min(x0, x1), y + 3, max(x0, x1), y + row_h - 4], fill=color)
        txt = _fmt(v)
        tx = max(x0, x1) + 4 if v >= 0 else min(x0, x1) - 4 - f.getlength(txt)
        d.text((tx, y + 2), txt, font=f, fill=_MUTED)
    d.line([x0, 20, x0, 22 + row_h * len(rows)], fill=_INK, width=1)
    return im


def _dashed_box(d: ImageDraw.ImageDraw, box: tuple[float, float, float, float], color=(255, 255, 255)) -> None:
    l, t, r, b = box
    for (xa, ya, xb, yb) in ((l, t, r, t), (r, t, r, b), (r, b, l, b), (l, b, l, t)):
        n = max(1, int(max(abs(xb - xa), abs(yb - ya)) / 6))
        for i in range(0, n, 2):
            d.line([xa + (xb - xa) * i / n, ya + (yb - ya) * i / n,
                    xa + (xb - xa) * min(i + 1, n) / n, ya + (yb - ya) * min(i + 1, n) / n], fill=color, width=2)


def _colorbar(width: int, signed: bool, label: str) -> Image.Image:
    f = _font(11)
    im = Image.new("RGB", (width, 34), "white")
    ramp = np.linspace(0.0, 1.0, width - 2 * 60)
    lut = _lut(SIGNED_CMAP if signed else HEATMAP_CMAP)
    strip = (lut[(ramp * 255).astype(int)] * 255).astype(np.uint8)[None].repeat(10, axis=0)
    im.paste(Image.fromarray(strip), (60, 4))
    d = ImageDraw.Draw(im)
    d.text((60 - 6 - f.getlength("−1" if signed else "0"), 2), "−1" if signed else "0", font=f, fill=_INK)
    d.text((width - 60 + 6, 2), "1", font=f, fill=_INK)
    d.text(((width - f.getlength(label)) / 2, 17), label, font=f, fill=_MUTED)
    return im


def explanation_figure(
    image: Image.Image | np.ndarray,
    geometry: InputGeometry,
    top_classes: Sequence[tuple[str, float]],
    panels: Sequence[ConceptPanel],
    *,
    importances: Sequence[tuple[int, float]] | None = None,
    title: str = "",
    lines: Sequence[str] = (),
    notes: Sequence[str] = (),
    importance_label: str = "importance",
    panel_px: int = 240,
    crop_px: int = 104,
) -> Image.Image:
    """One picture per explained image, for a paper or a notebook (a PIL image; `save_png` writes it).

    Top: the title (the image file), `lines` (what was explained, whose gates were used), `notes` in colour
    (warnings said in words), then the image (the model's crop dashed), the top classes with probabilities and
    the signed importance of the concepts (drawn ones in colour). Below, one row per drawn concept: its
    heatmap on the image (where; colour and opacity grow with its codes U, one scale per panel) and, when
    given, its atlas crops (what). Concepts with positive importance (evidence for the class) come first,
    then those with negative importance (evidence against), in a section of their own.

    Args:
        image: the original image.
        geometry: its preprocessing geometry (`render.geometry.geometry_for`).
        top_classes: (label, probability) pairs, most probable first.
        panels: the concepts to draw, most important first (callers keep only meaningful ones).
        importances: (concept id, importance) of every concept, for the bar chart; default the panels'.
        importance_label: what the importance numbers are ("Grad-CAM", "IG" ...).
        panel_px: the longest side of a heatmap panel, in pixels.
        crop_px: the side of an atlas crop, in pixels.
    """
    rgb = _as_rgb_array(image)
    H, W = rgb.shape[:2]
    scale = panel_px / max(H, W)  # small images (CIFAR's 32 px) are drawn up to the panel size too
    dh, dw = max(1, round(H * scale)), max(1, round(W * scale))
    shown = np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.BILINEAR)) if (dh, dw) != (H, W) else rgb
    with_crops = any(p.crops for p in panels)
    n_crops = max((len(p.crops) for p in panels), default=0)
    width = max(3 * 300 + 40, dw + 24 + (n_crops * (crop_px + 6) + 24 if with_crops else 3 * (max(dw, 260) + 16)))
    page = _Canvas(width)
    page.y = 10
    if title:
        page.text(12, title, 17, bold=True)
    for line in lines:
        page.text(12, line, 13, gap=2)
    for note in notes:
        page.text(12, note, 13, color=_WARN, gap=2)
    page.y += 6

    # top row: the image, the classes, the importances
    l, t, r, b = geometry.crop_box()
    cropped = (l, t, r, b) != (0.0, 0.0, float(W), float(H))
    thumb = Image.fromarray(shown)
    if cropped:
        sx, sy = dw / W, dh / H
        _dashed_box(ImageDraw.Draw(thumb), (l * sx, t * sy, r * sx - 1, b * sy - 1))
    imp = list(importances) if importances is not None else [(p.concept, p.importance) for p in panels]
    imp = sorted(sorted(imp, key=lambda cv: -abs(cv[1]))[:10], key=lambda cv: -cv[1])  # 10 strongest, by sign
    drawn = {p.concept for p in panels}
    col_w = (width - dw - 48) // 2
    classes = _bars([(lbl, float(pr), _NEG) for lbl, pr in top_classes], col_w,
                    f"top-{len(top_classes)} classes (probability)", lo=0.0, hi=1.0)
    bars = _bars([(f"concept {c}", float(v), (_POS if v >= 0 else _NEG) if c in drawn else _OFF) for c, v in imp],
                 col_w, f"concept importance ({importance_label})")
    row = Image.new("RGB", (width, max(dh + 20, classes.height, bars.height)), "white")
    row.paste(thumb, (12, 0))
    ImageDraw.Draw(row).text((12, dh + 3), f"image {W}x{H}" + (" (dashed: model crop)" if cropped else ""),
                             font=_font(11), fill=_MUTED)
    row.paste(classes, (dw + 36, 0))
    row.paste(bars, (dw + 36 + col_w + 12, 0))
    page.add(0, row, 12)

    gray = 0.3 * shown.astype(np.float32) + 0.7 * shown.mean(axis=2, keepdims=True)
    if cropped:  # darken what the model never saw
        _, seen_px = heatmap_to_original(np.zeros((1, 1)), geometry, out_size=(dh, dw))
        gray = gray * np.where(seen_px, 1.0, 0.45)[..., None]
    signed = any(float(np.min(p.heatmap)) < -1e-12 * max(float(np.max(np.abs(p.heatmap))), 1.0) for p in panels)
    floor = PANEL_FLOOR * max((float(np.max(np.abs(p.heatmap))) for p in panels), default=0.0)
    groups = [("evidence for the class (positive importance)", [p for p in panels if p.importance >= 0]),
              ("evidence against the class (negative importance)", [p for p in panels if p.importance < 0])]
    for heading, group in groups:
        if not group:
            continue
        page.text(12, heading, 14, bold=True, gap=6)
        tiles = []
        for p in group:
            values, seen = heatmap_to_original(p.heatmap, geometry, out_size=(dh, dw))
            peak = float(np.max(np.abs(p.heatmap)))
            tiles.append((p, Image.fromarray(overlay(gray, values, seen, max(peak, floor), signed=signed)), peak))
        if with_crops:
            for p, tile, peak in tiles:
                page.add(0, _concept_row(p, tile, peak, importance_label, width, crop_px), 10)
        else:
            pitch = max(dw, 260) + 16  # room for the two caption lines
            per_row = max(1, (width - 12) // pitch)
            for s in range(0, len(tiles), per_row):
                strip = Image.new("RGB", (width, dh + 44), "white")
                for i, (p, tile, peak) in enumerate(tiles[s: s + per_row]):
                    x = 12 + i * pitch
                    _caption(strip, (x, 0), p, peak, importance_label, dw)
                    strip.paste(tile, (x, 40))
                page.add(0, strip, 8)
    if panels:
        page.add(0, _colorbar(min(width, 560), signed,
                              "heatmap: codes U of the concept / panel max" + (" (blue < 0 < red)" if signed else "")
                              + "; darkened: outside the model's crop"), 4)
    return page.image()


def _caption(im: Image.Image, at: tuple[int, int], p: ConceptPanel, peak: float, label: str, width: int) -> None:
    d = ImageDraw.Draw(im)
    name = f"  '{_short(p.name, 28)}'" if p.name else ""
    d.text(at, f"concept {p.concept}{name}", font=_font(13, True), fill=_INK)
    extra = f"  ·  gate {p.gate:.2f}" if p.gate is not None else ""
    d.text((at[0], at[1] + 18), f"{label} {_fmt(float(p.importance))}  ·  max U {_fmt(peak)}{extra}",
           font=_font(11), fill=_MUTED)


def _concept_row(p: ConceptPanel, tile: Image.Image, peak: float, label: str, width: int, crop_px: int) -> Image.Image:
    """Where (the heatmap) and what (the atlas crops) of one concept, side by side."""
    row = Image.new("RGB", (width, 40 + max(tile.height, crop_px + 16)), "white")
    _caption(row, (12, 0), p, peak, label, tile.width)
    row.paste(tile, (12, 40))
    x0 = 12 + tile.width + 24
    d = ImageDraw.Draw(row)
    d.text((x0, 24), "what: its strongest regions in the atlas", font=_font(11), fill=_MUTED)
    for i, c in enumerate(p.crops):
        row.paste(Image.fromarray(_tile(c, crop_px)), (x0 + i * (crop_px + 6), 40))
    if not p.crops:
        d.text((x0, 44), "(no atlas region for this concept)", font=_font(11), fill=_MUTED)
    return row


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write a PIL image as PNG atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=3)  # level 3: a fifth of level 6's time, ~10 % larger
    return path


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
    fig, axes = _pyplot().subplots(
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
    fig, axes = _pyplot().subplots(
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
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    finally:
        _pyplot().close(fig)
    return path
