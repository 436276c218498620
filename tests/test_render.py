"""Geometry of the preprocessing (c2mf_cli.render.geometry), heatmaps on the original image, and the figures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from c2mf_cli.errors import C2MFError
from c2mf_cli.inputs.models import Preprocess
from c2mf_cli.render.figures import (
    ConceptPanel,
    atlas_concept_figure,
    atlas_overview_figure,
    explanation_figure,
    save_figure,
    save_png,
)
from c2mf_cli.render.geometry import geometry_for, heatmap_to_original


def input_geometry(original: tuple[int, int], size: int | tuple[int, int], crop_pct: float = 1.0):
    """The geometry of c2mf's Preprocess at this input size and crop_pct."""
    h, w = (size, size) if isinstance(size, int) else size
    return geometry_for(Preprocess(input_size=(3, h, w), crop_pct=crop_pct), original)

SIZES = [(227, 227), (300, 200), (200, 300), (481, 97), (64, 640), (180, 240), (150, 150)]


def _timm_eval_geometry(H: int, W: int, input_size: tuple[int, int], crop_pct: float):
    """Run timm's real eval transform (resize + centre crop) on coordinate images: for every model-input pixel,
    the original (y, x) it was interpolated from. A linear ramp stays linear under bilinear resampling, so
    away from the borders this is exact."""
    from timm.data import create_transform

    t = create_transform(input_size=(3, *input_size), crop_pct=crop_pct, interpolation="bilinear")
    geo_steps = t.transforms[:-2]  # resize, centre crop; drop ToTensor/Normalize (3-channel)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    out = []
    for ramp in (yy, xx):
        im = Image.fromarray(ramp, mode="F")
        for step in geo_steps:
            im = step(im)
        out.append(np.asarray(im))
    return np.stack(out, axis=-1)  # (h, w, 2) original coordinates


@pytest.mark.parametrize("H,W", SIZES)
@pytest.mark.parametrize("input_size,crop_pct", [((224, 224), 0.875), ((32, 32), 1.0)])
def test_input_to_original_matches_timm_transform(H, W, input_size, crop_pct):
    geo = input_geometry((H, W), input_size, crop_pct=crop_pct)
    truth = _timm_eval_geometry(H, W, input_size, crop_pct)
    assert truth.shape[:2] == geo.input_size
    h, w = input_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    mapped = geo.input_to_original(np.stack([yy, xx], axis=-1))
    # interior only: at the image border the resampling filter clamps and the ramp bends
    sy, sx = geo.scale
    m = int(np.ceil(2 * max(sy, sx, 1.0))) + 1
    inner = (mapped[..., 0] > m) & (mapped[..., 0] < H - m) & (mapped[..., 1] > m) & (mapped[..., 1] < W - m)
    assert inner.mean() > 0.5
    # PIL's resampling kernels are truncated, so a ramp is reproduced to ~0.07 px, not exactly; an off-by-one
    # in the resize or crop would move every point by a whole resized pixel (>= 0.8 original px here)
    np.testing.assert_allclose(mapped[inner], truth[inner], atol=0.1 * max(sy, sx, 1.0))


def test_geometry_roundtrip_and_crop_box():
    geo = input_geometry((300, 500), 224, crop_pct=0.875)
    assert geo.resized == (256, 426)
    assert geo.crop_offset == (16, 101)
    pts = np.array([[0.0, 0.0], [10.5, 200.25], [224.0, 224.0]])
    np.testing.assert_allclose(geo.original_to_input(geo.input_to_original(pts)), pts)
    l, t, r, b = geo.crop_box()
    assert 0 < l < r < 500 and 0 < t < b < 300
    assert abs((r - l) / (b - t) - 1.0) < 1e-2  # square stays square (up to the resize's truncation)
    assert input_geometry((10, 10), 32).crop_offset == (0, 0)
    # the crop box the Preprocess reports is the geometry's: one description, not two
    pp = Preprocess(input_size=(3, 224, 224), crop_pct=0.875)
    np.testing.assert_allclose(geometry_for(pp, (300, 500)).crop_box(), pp.crop_box(500, 300))
    with pytest.raises(C2MFError, match="empty"):
        geometry_for(pp, (0, 10))


def _coordinate_image(H: int, W: int) -> Image.Image:
    """RGB image whose pixel (y, x) stores x in R (+ high bits in B) and y in G (+ high bits in B)."""
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx % 256, yy % 256, (xx // 256) + 16 * (yy // 256)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("H,W", SIZES + [(20, 29)])
@pytest.mark.parametrize("size,crop_pct", [(224, 0.875), (32, 1.0), ((160, 224), 0.9)])
def test_geometry_matches_c2mf_preprocess(H, W, size, crop_pct):
    """Exactly the pixels `models.Preprocess` feeds the model: with nearest resampling, model-input pixel
    (i, j) is the original pixel under the mapped centre."""
    h, w = (size, size) if isinstance(size, int) else size
    pp = Preprocess(input_size=(3, h, w), crop_pct=crop_pct, interpolation="nearest")
    geo = geometry_for(pp, (H, W))
    fed = np.asarray(pp.input_image(_coordinate_image(H, W))).astype(int)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    mapped = geo.input_to_original(np.stack([yy, xx], axis=-1))
    inside = (mapped[..., 0] >= 0) & (mapped[..., 0] < H) & (mapped[..., 1] >= 0) & (mapped[..., 1] < W)
    got_x = fed[..., 0] + 256 * (fed[..., 2] % 16)
    got_y = fed[..., 1] + 256 * (fed[..., 2] // 16)
    # PIL's nearest picks floor(centre); allow the float rounding of an exact .0 boundary
    assert np.mean(np.abs(got_x[inside] - np.floor(mapped[..., 1][inside])) <= 1) == 1.0
    assert np.mean(np.abs(got_y[inside] - np.floor(mapped[..., 0][inside])) <= 1) == 1.0
    assert np.mean(got_x[inside] == np.floor(mapped[..., 1][inside])) > 0.9


@pytest.mark.parametrize("H,W", [(227, 227), (300, 200), (120, 480)])
def test_heatmap_cell_lands_on_its_region(H, W):
    """A single hot grid cell peaks, on the original image, at the centre of the region that cell saw."""
    geo = input_geometry((H, W), 224, crop_pct=0.875)
    for cell in [(0, 0), (3, 5), (6, 6)]:
        hm = np.zeros((7, 7))
        hm[cell] = 1.0
        values, seen = heatmap_to_original(hm, geo)
        assert values.shape == (H, W) and seen.shape == (H, W)
        centre = geo.input_to_original(np.array([(cell[0] + 0.5) * 32, (cell[1] + 0.5) * 32]))
        cy, cx = int(centre[0]), int(centre[1])
        assert values[cy, cx] > 0.9  # the cell's value sits at the centre of what it saw...
        if cell[1] < 6:  # ...and is gone one cell further right
            assert values[cy, min(int(centre[1] + 32 * geo.scale[1]), W - 1)] < 0.05
    # a constant heatmap stays constant; the seen mask is the crop
    values, seen = heatmap_to_original(np.full((7, 7), 2.0), geo)
    np.testing.assert_allclose(values, 2.0, rtol=1e-6)
    l, t, r, b = geo.crop_box()
    assert seen.sum() == pytest.approx((r - l) * (b - t), rel=0.05)


def test_heatmap_downscaled_render_matches_full():
    geo = input_geometry((400, 600), 224, crop_pct=0.875)
    hm = np.random.default_rng(0).random((7, 7))
    full, _ = heatmap_to_original(hm, geo)
    small, _ = heatmap_to_original(hm, geo, out_size=(200, 300))
    np.testing.assert_allclose(small, full[::2, ::2], atol=0.05)


def test_cell_box_is_inside_and_constant_size():
    geo = input_geometry((227, 300), 224, crop_pct=0.875)
    boxes = [geo.cell_box((i, j), (7, 7), window=2.0) for i in range(7) for j in range(7)]
    sizes = {(r - l, b - t) for l, t, r, b in boxes}
    assert len(sizes) == 1
    for l, t, r, b in boxes:
        assert 0 <= l < r <= 300 and 0 <= t < b <= 227
    l, t, r, b = geo.cell_box((3, 3), (7, 7), window=1.0)
    cy, cx = geo.input_to_original(np.array([3.5 * 32, 3.5 * 32]))
    assert abs((l + r) / 2 - cx) <= 1 and abs((t + b) / 2 - cy) <= 1


def _panels(n: int, signed: bool = False) -> list[ConceptPanel]:
    rng = np.random.default_rng(1)
    return [
        ConceptPanel(j, float(1.0 / (j + 1)), rng.random((7, 7)) - (0.5 if signed else 0.0)) for j in range(n)
    ]


@pytest.mark.parametrize("n,signed", [(5, False), (3, True), (8, False)])
def test_explanation_figure_draws_panels_and_atlas_crops(tmp_path, n, signed):
    img = np.random.default_rng(0).integers(0, 200, (180, 260, 3), dtype=np.uint8)
    geo = input_geometry((180, 260), 224, crop_pct=0.875)
    args = (img, geo, [("cat", 0.7), ("dog", 0.2)])
    plain = explanation_figure(*args, _panels(n, signed), title="x.jpg", lines=["explained: cat"],
                               importance_label="Grad-CAM")
    assert isinstance(plain, Image.Image)
    assert 900 <= plain.width <= 1400 and 500 < plain.height < 2000
    # with atlas crops, each concept gets a row: its heatmap (where) beside its crops (what)
    green = np.zeros((20, 30, 3), dtype=np.uint8)
    green[..., 1] = 255
    panels = [replace(p, crops=(green,) * 3) for p in _panels(n, signed)]
    atlas = np.asarray(explanation_figure(*args, panels, title="x.jpg", importance_label="Grad-CAM"))
    is_green = (atlas == (0, 255, 0)).all(axis=-1)
    assert is_green.sum() > n * 3 * 20 * 30 * 0.8
    assert not (np.asarray(plain) == (0, 255, 0)).all(axis=-1).any()
    assert atlas.shape[0] > np.asarray(plain).shape[0]  # one row per concept
    path = save_png(Image.fromarray(atlas), tmp_path / "fig.png")
    with Image.open(path) as im:
        assert im.size == (atlas.shape[1], atlas.shape[0])
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_explanation_figure_draws_a_small_image_at_panel_size():
    """A 32 px CIFAR image is drawn up to the panel size, not as a stamp."""
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    geo = input_geometry((32, 32), 32)
    fig = explanation_figure(img, geo, [("cat", 0.7)], _panels(2), panel_px=200)
    assert fig.height > 2 * 200


def test_atlas_figures(tmp_path):
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8) for i in range(6)]
    fig = atlas_concept_figure(3, crops, list(range(6, 0, -1)), [f"img{i}" for i in range(6)], ncols=3)
    assert sum(1 for ax in fig.axes if ax.get_title()) == 6
    save_figure(fig, tmp_path / "c.png")
    fig = atlas_overview_figure([(0, crops), (1, crops[:2])], names={0: "red"}, per_row=4)
    assert len(fig.axes) == 8
    assert "red" in fig.axes[0].get_ylabel()
    save_figure(fig, tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
