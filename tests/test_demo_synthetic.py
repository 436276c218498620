"""The synthetic concept world: determinism, masks that match the drawn pixels, class design."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from c2mf_cli.demo.synthetic import (
    DISTRACTOR,
    VOCABULARY,
    World,
    WorldConfig,
    design_classes,
    generate,
)
from c2mf_cli.errors import C2MFError

SMALL = WorldConfig(n_classes=4, n_primitives=6, images_per_class=6, test_per_class=3, seed=3)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different_images(tmp_path: Path) -> None:
    generate(SMALL, tmp_path / "a")
    generate(SMALL, tmp_path / "b")
    a, b = _all_bytes(tmp_path / "a"), _all_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert len(a) == 2 + SMALL.n_classes * (SMALL.images_per_class + SMALL.test_per_class)
    assert all(a[k] == b[k] for k in a)
    other = WorldConfig(**{**SMALL.to_dict(), "seed": 4})
    generate(other, tmp_path / "c")
    c = _all_bytes(tmp_path / "c")
    assert a["train/class_00/000.png"] != c["train/class_00/000.png"]


def test_masks_match_drawn_pixels(tmp_path: Path) -> None:
    world = generate(SMALL, tmp_path / "w")
    palettes = {i: {tuple(c) for c in p.colors} for i, p in enumerate(world.primitives)}
    all_colors = set().union(*palettes.values())
    for split in ("train", "test"):
        maps = world.label_maps(split)
        records = world.records(split)
        assert maps.shape == (len(records), SMALL.image_size, SMALL.image_size)
        for i, rec in enumerate(records):
            img = world.image_array(split, i)
            lm = maps[i]
            present = {int(v) - 1 for v in np.unique(lm) if 0 < v < DISTRACTOR}
            assert present == set(rec.primitives) == set(world.class_primitives[rec.label])
            for p in rec.primitives:
                pix = {tuple(int(v) for v in c) for c in img[lm == p + 1]}
                assert pix and pix <= palettes[p], (split, i, world.primitives[p].name)
                if len(palettes[p]) == 2:  # textures show both colours
                    assert pix == palettes[p]
                x0, y0, x1, y1 = rec.boxes[rec.primitives.index(p)]
                ys, xs = np.nonzero(lm == p + 1)
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            rest = {tuple(int(v) for v in c) for c in img[(lm == 0) | (lm == DISTRACTOR)]}
            assert not rest & all_colors, "a background or distractor pixel has a primitive's colour"
    masks = world.primitive_masks("test")
    assert masks.dtype == bool and masks.shape[1] == SMALL.n_primitives
    assert np.array_equal(masks.any(axis=(2, 3)), world.class_matrix()[world.labels("test")])


def test_class_design_is_distinct_shared_and_covers_vocabulary() -> None:
    for seed in range(5):
        sets = design_classes(6, 8, seed)
        assert len(sets) == 6 and all(2 <= len(s) <= 3 for s in sets)
        assert len(set().union(*map(set, sets))) == 8
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                assert not set(a) <= set(b) and not set(b) <= set(a)
        counts = np.bincount(np.concatenate(sets), minlength=8)
        assert counts.max() >= 2  # some primitive is shared by several classes
    with pytest.raises(C2MFError, match="cannot design"):
        design_classes(40, 3, 0)


def test_load_round_trip_and_clear_errors(tmp_path: Path) -> None:
    world = generate(SMALL, tmp_path / "w")
    again = World.load(tmp_path / "w")
    assert again.config == SMALL and again.images == world.images
    assert again.primitive_names == [p.name for p in VOCABULARY[: SMALL.n_primitives]]
    assert generate(SMALL, tmp_path / "w").images == world.images  # same world: reused
    with pytest.raises(C2MFError, match="different world"):
        generate(WorldConfig(**{**SMALL.to_dict(), "seed": 9}), tmp_path / "w")
    with pytest.raises(C2MFError, match="no world.json"):
        World.load(tmp_path / "nowhere")
    with pytest.raises(C2MFError, match="n_primitives"):
        generate(WorldConfig(n_primitives=99), tmp_path / "x")
