"""A seeded synthetic image world whose concepts are known: the ground truth for concept discovery.

Each image holds the two or three visual primitives (a red disk, blue stripes, a checkerboard...) that define
its class, at random positions and scales, on a varied background, with small distractor shapes that belong
to no class. Several classes share primitives, as real concepts are shared, so a shared dictionary has
something to exploit. Every primitive's pixels are known exactly: primitives never overlap each other or the
distractors, and each image comes with a label map (0 background, 1 + p for primitive p, 255 distractor).

Layout written by `generate(config, out_dir)`:

    out_dir/world.json              config, primitives, classes, every image's path / label / primitives
    out_dir/masks.npz               train_labels, test_labels: uint8 (n, H, W) label maps, world.json order
    out_dir/train/<class>/NNN.png   one sub-folder per class (ImageFolder layout)
    out_dir/test/<class>/NNN.png

Same config -> same bytes in every file (each image has its own generator seeded by (seed, split, class, i),
and the npz is written with fixed zip timestamps).
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .._io import atomic_path, write_json
from ..errors import C2MFError
from ..inputs.images import read_image

ENCODING_TYPE = "c2mf-synthetic-world"
ENCODING_VERSION = 1
SPLITS = ("train", "test")
DISTRACTOR = 255

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Primitive:
    """One visual concept: a shape drawn in one colour, or a two-colour texture inside a shape."""

    name: str
    shape: str  # disk, ring, triangle, square, diamond, cross, stripes, checker
    colors: tuple[RGB, ...]  # one colour, or two for a texture (stripes, checker)


# The vocabulary, in a fixed order: `WorldConfig.n_primitives` takes the first n. Colours are saturated (or
# near black / white) so they never coincide with the muted backgrounds and distractors.
VOCABULARY: tuple[Primitive, ...] = (
    Primitive("red_disk", "disk", ((220, 30, 30),)),
    Primitive("blue_stripes", "stripes", ((30, 60, 220), (245, 245, 245))),
    Primitive("green_triangle", "triangle", ((30, 190, 40),)),
    Primitive("checkerboard", "checker", ((15, 15, 15), (245, 245, 245))),
    Primitive("yellow_ring", "ring", ((240, 220, 20),)),
    Primitive("purple_square", "square", ((140, 30, 200),)),
    Primitive("orange_cross", "cross", ((250, 130, 0),)),
    Primitive("cyan_diamond", "diamond", ((0, 210, 230),)),
)


@dataclass(frozen=True)
class WorldConfig:
    """What the synthetic world looks like. The resolved config is written into world.json."""

    n_classes: int = 6
    n_primitives: int = 8
    images_per_class: int = 80  # train images per class
    test_per_class: int = 40
    image_size: int = 64
    min_scale: float = 0.24  # primitive side as a fraction of the image side
    max_scale: float = 0.36
    max_distractors: int = 3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if not 2 <= self.n_primitives <= len(VOCABULARY):
            raise C2MFError(f"n_primitives={self.n_primitives}: choose 2 to {len(VOCABULARY)}")
        if self.n_classes < 2:
            raise C2MFError(f"n_classes={self.n_classes}: a classifier needs at least 2 classes")
        if self.image_size < 32:
            raise C2MFError(f"image_size={self.image_size}: use at least 32 pixels so primitives stay readable")
        if self.images_per_class < 1 or self.test_per_class < 1:
            raise C2MFError("images_per_class and test_per_class must be at least 1")
        if not 0.05 < self.min_scale <= self.max_scale <= 0.4:
            raise C2MFError("scales must satisfy 0.05 < min_scale <= max_scale <= 0.4")


@dataclass(frozen=True)
class ImageRecord:
    """One generated image: where it is, its class, and the primitives (indices into `World.primitives`)."""

    split: str
    path: str  # relative to the world root
    label: int
    primitives: tuple[int, ...]
    boxes: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1) of each primitive, exclusive ends


@dataclass
class World:
    """A generated world on disk: its config, vocabulary, class definitions, images and masks."""

    root: Path
    config: WorldConfig
    primitives: list[Primitive]
    classes: list[str]
    class_primitives: list[tuple[int, ...]]  # for each class, the primitive indices that define it
    images: list[ImageRecord]
    _labels: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> "World":
        """Open a world written by `generate`; fails clearly on a missing or foreign folder."""
        root = Path(root)
        meta_path = root / "world.json"
        if not meta_path.is_file():
            raise C2MFError(f"{root} holds no world.json: generate a world first (c2mf demo)")
        meta = json.loads(meta_path.read_text())
        if meta.get("encoding-type") != ENCODING_TYPE:
            raise C2MFError(f"{meta_path} is not a c2mf synthetic world (encoding-type {meta.get('encoding-type')!r})")
        if meta.get("encoding-version", 0) > ENCODING_VERSION:
            raise C2MFError(
                f"{meta_path} has encoding-version {meta['encoding-version']}, newer than this c2mf reads "
                f"({ENCODING_VERSION}): upgrade c2mf or regenerate the world"
            )
        prims = [Primitive(p["name"], p["shape"], tuple(tuple(c) for c in p["colors"])) for p in meta["primitives"]]
        images = [
            ImageRecord(r["split"], r["path"], r["label"], tuple(r["primitives"]), tuple(tuple(b) for b in r["boxes"]))
            for r in meta["images"]
        ]
        return cls(
            root=root,
            config=WorldConfig(**meta["config"]),
            primitives=prims,
            classes=list(meta["classes"]),
            class_primitives=[tuple(c) for c in meta["class_primitives"]],
            images=images,
        )

    @property
    def primitive_names(self) -> list[str]:
        return [p.name for p in self.primitives]

    def records(self, split: str) -> list[ImageRecord]:
        _check_split(split)
        return [r for r in self.images if r.split == split]

    def paths(self, split: str) -> list[Path]:
        """Absolute image paths of a split, in world.json order (the order of `labels_map`)."""
        return [self.root / r.path for r in self.records(split)]

    def labels(self, split: str) -> np.ndarray:
        return np.array([r.label for r in self.records(split)], dtype=np.int64)

    def label_maps(self, split: str) -> np.ndarray:
        """uint8 (n, H, W): 0 background, 1 + p for primitive p, 255 distractor."""
        _check_split(split)
        if split not in self._labels:
            with np.load(self.root / "masks.npz") as z:
                self._labels[split] = z[f"{split}_labels"]
        return self._labels[split]

    def primitive_masks(self, split: str) -> np.ndarray:
        """bool (n, n_primitives, H, W): the pixels of each primitive in each image (all False if absent)."""
        lm = self.label_maps(split)
        return lm[:, None, :, :] == (np.arange(len(self.primitives), dtype=np.uint8) + 1)[None, :, None, None]

    def image_array(self, split: str, i: int) -> np.ndarray:
        """uint8 (H, W, 3) of the i-th image of a split."""
        return np.asarray(read_image(self.paths(split)[i]))

    def class_matrix(self) -> np.ndarray:
        """bool (n_classes, n_primitives): which primitives define each class."""
        m = np.zeros((len(self.classes), len(self.primitives)), dtype=bool)
        for y, ps in enumerate(self.class_primitives):
            m[y, list(ps)] = True
        return m


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise C2MFError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------- class design


def design_classes(n_classes: int, n_primitives: int, seed: int) -> list[tuple[int, ...]]:
    """Pick 2-3 primitives per class: sets distinct, none inside another, every primitive used.

    With more class slots than primitives, some primitives are necessarily shared by several classes.
    """
    # LYM inequality: an antichain of 2- and 3-sets has at most max(C(n,2), C(n,3)) members
    if n_classes > max(math.comb(n_primitives, 2), math.comb(n_primitives, 3)):
        raise C2MFError(
            f"cannot design {n_classes} distinct classes of 2-3 primitives from {n_primitives} primitives: "
            "use fewer classes or more primitives"
        )
    rng = np.random.default_rng([seed, 7919])
    for _ in range(2_000):
        sets: list[frozenset[int]] = []
        for _y in range(n_classes):
            for _try in range(50):
                size = int(rng.choice([2, 3], p=[0.5, 0.5])) if n_primitives >= 3 else 2
                s = frozenset(int(p) for p in rng.choice(n_primitives, size=size, replace=False))
                if all(not (s <= t or t <= s) for t in sets):
                    sets.append(s)
                    break
            else:
                break
        if len(sets) == n_classes and set().union(*sets) == set(range(n_primitives)):
            return [tuple(sorted(s)) for s in sets]
    raise C2MFError(
        f"cannot design {n_classes} distinct classes of 2-3 primitives from {n_primitives} primitives: "
        "use fewer classes or more primitives"
    )


# ---------------------------------------------------------------------------------------------- drawing


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """A bool (size, size) footprint of the shape, and for textures an int map choosing colour 0 or 1."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - c, yy - c
    r = size / 2.0
    d2 = dx * dx + dy * dy
    angle = rng.uniform(0, 2 * math.pi)
    ca, sa = math.cos(angle), math.sin(angle)
    ux = ca * dx + sa * dy  # the rotated x coordinate
    if shape == "disk":
        return d2 <= r * r, None
    if shape == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2), None
    if shape == "square":
        return np.ones((size, size), dtype=bool), None
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) <= r, None
    if shape == "cross":
        arm = max(size / 6.0, 1.0)
        return (np.abs(dx) <= arm) | (np.abs(dy) <= arm), None
    if shape == "triangle":
        # equilateral triangle inscribed in the disk of radius r, rotated
        verts = [(r * math.cos(angle + k * 2 * math.pi / 3), r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
        inside = np.ones((size, size), dtype=bool)
        for k in range(3):
            (x1, y1), (x2, y2) = verts[k], verts[(k + 1) % 3]
            cross = (x2 - x1) * (dy - y1) - (y2 - y1) * (dx - x1)
            inside &= cross >= 0
        return inside, None
    if shape == "stripes":
        period = max(size / 4.0, 3.0)
        return np.ones((size, size), dtype=bool), (np.floor(ux / (period / 2)).astype(np.int64) % 2)
    if shape == "checker":
        cell = max(size / 4.0, 2.0)
        return np.ones((size, size), dtype=bool), (
            (np.floor(xx / cell).astype(np.int64) + np.floor(yy / cell).astype(np.int64)) % 2
        )
    raise ValueError(f"unknown shape {shape!r}")


def _muted(rng: np.random.Generator, lo: int = 70, hi: int = 180, spread: int = 30) -> np.ndarray:
    """A low-saturation colour: every channel within `spread` of one grey level."""
    level = rng.uniform(lo, hi)
    return np.clip(level + rng.uniform(-spread, spread, size=3), 0, 255)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    kind = int(rng.integers(3))
    if kind == 0:  # flat
        img = np.broadcast_to(_muted(rng), (size, size, 3)).astype(np.float64)
    elif kind == 1:  # linear gradient between two muted colours
        a, b = _muted(rng), _muted(rng)
        t = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        s = math.cos(t) * xx + math.sin(t) * yy
        s = (s - s.min()) / max(s.max() - s.min(), 1e-9)
        img = a[None, None, :] * (1 - s[..., None]) + b[None, None, :] * s[..., None]
    else:  # flat with pixel noise
        img = _muted(rng)[None, None, :] + rng.normal(0, 8, size=(size, size, 1))
    return np.clip(img, 60, 200)


def _place(occupied: np.ndarray, size: int, rng: np.random.Generator, tries: int = 400) -> tuple[int, int] | None:
    """Top-left corner of a free size x size box (one free pixel of margin), or None if none was found."""
    n = occupied.shape[0]
    for _ in range(tries):
        x0, y0 = (int(v) for v in rng.integers(0, n - size + 1, size=2))
        if not occupied[max(y0 - 1, 0) : y0 + size + 1, max(x0 - 1, 0) : x0 + size + 1].any():
            return x0, y0
    return None


def render_image(
    config: WorldConfig, primitives: list[Primitive], prim_ids: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Draw one image: returns uint8 (H, W, 3), the uint8 label map and each primitive's box."""
    n = config.image_size
    img = _background(n, rng)
    labels = np.zeros((n, n), dtype=np.uint8)
    occupied = np.zeros((n, n), dtype=bool)
    boxes: list[tuple[int, int, int, int]] = []
    order = list(prim_ids)
    rng.shuffle(order)
    placed: dict[int, tuple[int, int, int, int]] = {}
    for p in order:
        prim = primitives[p]
        for shrink in (1.0, 0.85, 0.7, 0.55):  # crowded images: shrink until the primitive fits
            size = max(int(round(n * rng.uniform(config.min_scale, config.max_scale) * shrink)), 6)
            pos = _place(occupied, size, rng)
            if pos is not None:
                break
        else:
            raise RuntimeError("could not place a primitive; lower max_scale")  # unreachable at sane scales
        x0, y0 = pos
        foot, tex = _shape_mask(prim.shape, size, rng)
        colors = np.array(prim.colors, dtype=np.float64)
        patch = colors[tex] if tex is not None else np.broadcast_to(colors[0], (size, size, 3))
        region = img[y0 : y0 + size, x0 : x0 + size]
        region[foot] = patch[foot]
        labels[y0 : y0 + size, x0 : x0 + size][foot] = p + 1
        occupied[y0 : y0 + size, x0 : x0 + size] = True
        placed[p] = (x0, y0, x0 + size, y0 + size)
    boxes = [placed[p] for p in prim_ids]
    for _ in range(int(rng.integers(0, config.max_distractors + 1))):
        size = max(int(round(n * rng.uniform(0.06, 0.12))), 3)
        pos = _place(occupied, size, rng, tries=50)
        if pos is None:
            continue
        x0, y0 = pos
        shape = ("disk", "square", "cross")[int(rng.integers(3))]
        foot, _ = _shape_mask(shape, size, rng)
        color = _muted(rng, 50, 205, 30)
        img[y0 : y0 + size, x0 : x0 + size][foot] = color
        labels[y0 : y0 + size, x0 : x0 + size][foot] = DISTRACTOR
        occupied[y0 : y0 + size, x0 : x0 + size] = True
    return np.round(img).astype(np.uint8), labels, boxes


# ---------------------------------------------------------------------------------------------- writing


def _write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so equal arrays give equal bytes."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def class_names(n_classes: int) -> list[str]:
    return [f"class_{y:02d}" for y in range(n_classes)]


def generate(
    config: WorldConfig,
    out_dir: str | os.PathLike[str],
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
) -> World:
    """Write the world described by `config` into `out_dir` and return it.

    A folder that already holds the same world (same config) is reused as is; a different world there is an
    error rather than a silent overwrite.
    """
    config.validate()
    out = Path(out_dir)
    meta_path = out / "world.json"
    if meta_path.is_file():
        try:
            existing = World.load(out)
        except (C2MFError, KeyError, TypeError, ValueError):
            existing = None
        if existing is not None and existing.config == config:
            return existing
        raise C2MFError(f"{out} already holds a different world: choose another --out folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    primitives = list(VOCABULARY[: config.n_primitives])
    class_sets = design_classes(config.n_classes, config.n_primitives, config.seed)
    names = class_names(config.n_classes)
    records: list[ImageRecord] = []
    label_maps: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    total = (config.images_per_class + config.test_per_class) * config.n_classes
    advance = progress("generate images", total) if progress is not None else (lambda n=1: None)
    for split_id, split in enumerate(SPLITS):
        count = config.images_per_class if split == "train" else config.test_per_class
        for y, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([config.seed, split_id, y, i])
                img, lm, boxes = render_image(config, primitives, class_sets[y], rng)
                rel = f"{split}/{name}/{i:03d}.png"
                Image.fromarray(img).save(out / rel, format="PNG", optimize=False)
                records.append(ImageRecord(split, rel, y, class_sets[y], tuple(boxes)))
                label_maps[split].append(lm)
                advance(1)
    _write_npz_deterministic(out / "masks.npz", {f"{s}_labels": np.stack(label_maps[s]) for s in SPLITS})
    meta = {
        "encoding-type": ENCODING_TYPE,
        "encoding-version": ENCODING_VERSION,
        "config": config.to_dict(),
        "primitives": [{"name": p.name, "shape": p.shape, "colors": [list(c) for c in p.colors]} for p in primitives],
        "classes": names,
        "class_primitives": [list(s) for s in class_sets],
        "label_map": {"background": 0, "primitive": "1 + index", "distractor": DISTRACTOR},
        "images": [
            {"split": r.split, "path": r.path, "label": r.label, "primitives": list(r.primitives),
             "boxes": [list(b) for b in r.boxes]}
            for r in records
        ],
    }
    write_json(meta_path, meta, indent=1)  # world.json last: its presence marks the world complete
    return World.load(out)
