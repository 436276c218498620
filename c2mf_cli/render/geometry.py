"""Where each pixel of the model input came from in the original image, and heatmaps mapped back through it.

A model sees a resized, centre-cropped copy of an image; its activation grid (CNN feature map or ViT patch
tokens) covers that crop. Every picture c2mf draws is drawn on the ORIGINAL image, so this module says where
the model input sits in it (`InputGeometry`, built by `geometry_for` from the very `Preprocess` that fed the
model, so the two cannot drift apart) and maps grid heatmaps back through that geometry (`heatmap_to_original`).

Coordinates are continuous pixel coordinates: pixel i covers [i, i + 1), its centre is i + 0.5. Points are
(y, x) pairs; boxes are (left, top, right, bottom) like PIL. Grid cell (i, j) covers the input pixels
[i·h/gh, (i+1)·h/gh) x [j·w/gw, (j+1)·w/gw), which is how convolution stages and ViT patches tile the input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import C2MFError
from ..inputs.models import Preprocess

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class InputGeometry:
    """Where the model input came from in the original image: resize to `resized`, then crop `crop_offset`.

    Attributes:
        original: (H, W) of the original image.
        resized: (Hr, Wr) after the resize step.
        crop_offset: (top, left) of the crop in the resized image; negative where the crop was padded.
        input_size: (h, w) of the model input.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    crop_offset: tuple[int, int]
    input_size: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per resized pixel, (sy, sx)."""
        return self.original[0] / self.resized[0], self.original[1] / self.resized[1]

    def input_to_original(self, points: np.ndarray) -> np.ndarray:
        """Map (y, x) points in model-input pixel coordinates to original-image pixel coordinates."""
        p = np.asarray(points, dtype=np.float64)
        sy, sx = self.scale
        out = np.empty_like(p)
        out[..., 0] = (p[..., 0] + self.crop_offset[0]) * sy
        out[..., 1] = (p[..., 1] + self.crop_offset[1]) * sx
        return out

    def original_to_input(self, points: np.ndarray) -> np.ndarray:
        """Inverse of `input_to_original`."""
        p = np.asarray(points, dtype=np.float64)
        sy, sx = self.scale
        out = np.empty_like(p)
        out[..., 0] = p[..., 0] / sy - self.crop_offset[0]
        out[..., 1] = p[..., 1] / sx - self.crop_offset[1]
        return out

    def crop_box(self) -> tuple[float, float, float, float]:
        """The part of the original image the model saw, (left, top, right, bottom), clipped to the image."""
        (t, l), (b, r) = self.input_to_original(np.array([[0.0, 0.0], list(map(float, self.input_size))]))
        H, W = self.original
        return max(l, 0.0), max(t, 0.0), min(r, float(W)), min(b, float(H))

    def cell_box(self, cell: tuple[int, int], grid: tuple[int, int], window: float = 2.0) -> Box:
        """A box of the original image around grid cell (i, j): `window` cells wide, kept inside the image.

        The box is centred on the cell centre where it fits; near an edge it is shifted (not shrunk) so that
        every crop of an atlas shows the same amount of context.
        """
        gh, gw = grid
        h, w = self.input_size
        ch, cw = h / gh, w / gw
        cy, cx = (cell[0] + 0.5) * ch, (cell[1] + 0.5) * cw
        half = np.array([window * ch / 2, window * cw / 2])
        (t, l), (b, r) = self.input_to_original(np.array([[cy, cx] - half, [cy, cx] + half]))
        H, W = self.original
        (x0, x1), (y0, y1) = _fit_box(l, r, W), _fit_box(t, b, H)
        return x0, y0, x1, y1


def _fit_box(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Round [lo, hi) to integers and shift it inside [0, size) without changing its length where possible."""
    length = max(1, min(size, int(round(hi - lo))))
    start = int(round(lo))
    start = min(max(start, 0), size - length)
    return start, start + length


def geometry_for(preprocess: Preprocess, original: tuple[int, int]) -> InputGeometry:
    """The geometry of `preprocess` (resize, then centre crop) for an image of size `original` (H, W).

    Asks the Preprocess itself (`resized_size`, `crop_offset`): the heatmaps follow exactly the pixels the
    model was fed.
    """
    H, W = int(original[0]), int(original[1])
    if H < 1 or W < 1:
        raise C2MFError(f"image size {original} is empty: nothing to explain")
    rw, rh = preprocess.resized_size(W, H)
    left, top = preprocess.crop_offset(W, H)
    return InputGeometry((H, W), (int(rh), int(rw)), (int(top), int(left)), preprocess.size)


def _interp_matrix(n_out: int, n_grid: int, grid_extent: float, to_input: np.ndarray) -> np.ndarray:
    """(n_out, n_grid) linear-interpolation weights from grid cells to output pixels.

    `to_input` gives, for each output pixel centre, its coordinate in the model input along this axis; the
    grid cell centres sit at (k + 0.5) · grid_extent / n_grid (align_corners=False), clamped at the edges.
    """
    g = to_input * n_grid / grid_extent - 0.5
    g = np.clip(g, 0.0, n_grid - 1.0)
    lo = np.floor(g).astype(int)
    hi = np.minimum(lo + 1, n_grid - 1)
    frac = g - lo
    m = np.zeros((n_out, n_grid))
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


def heatmap_to_original(
    heatmap: np.ndarray, geometry: InputGeometry, out_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Upsample a grid heatmap (gh, gw) onto the original image through the preprocessing geometry.

    Bilinear between grid-cell centres (the convention of `F.interpolate(align_corners=False)`), so a cell's
    value sits at the centre of the image region it covers.

    Args:
        heatmap: values on the model's spatial grid.
        geometry: how the original image became the model input.
        out_size: (H', W') to render at (a downscaled copy of the original for figures); default the original.

    Returns:
        (values, seen): float32 (H', W') heatmap and a bool mask of the pixels inside the model's crop; pixels
        outside it were never seen by the model and carry the nearest edge value.
    """
    hm = np.asarray(heatmap, dtype=np.float64)
    if hm.ndim != 2:
        raise C2MFError(f"a heatmap must be a 2-D grid, got shape {hm.shape}")
    H, W = geometry.original
    oh, ow = out_size or (H, W)
    sy, sx = geometry.scale
    # centre of each output pixel, in original pixels, then in model-input pixels
    ys = (np.arange(oh) + 0.5) * H / oh / sy - geometry.crop_offset[0]
    xs = (np.arange(ow) + 0.5) * W / ow / sx - geometry.crop_offset[1]
    h, w = geometry.input_size
    ry = _interp_matrix(oh, hm.shape[0], h, ys)
    rx = _interp_matrix(ow, hm.shape[1], w, xs)
    values = (ry @ hm @ rx.T).astype(np.float32)
    seen = ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
    return values, seen
