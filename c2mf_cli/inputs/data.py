"""Image datasets (folder, CUB-200-2011, CSV), the train/test split, class-to-output maps, and crops.

A dataset resolves to a list of `Item(path, class_name, label)` where `label` is the model's output index of
the class. Nothing here runs a model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import C2MFError, UsageError
from .class_check import IDENTITY

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
Split = Literal["train", "test", "all"]


@dataclass(frozen=True)
class Item:
    path: str
    class_name: str
    label: int  # the model's output index for this class


@dataclass(frozen=True)
class DatasetSpec:
    """Where the images are and how to split them. `kind` is detected from the path when "auto"."""

    root: str
    kind: Literal["auto", "folder", "cub", "csv"] = "auto"
    split: Split = "all"
    test_fraction: float = 0.2
    seed: int = 0
    class_index: str | None = None
    max_per_class: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_kind(root: Path) -> str:
    if root.is_file() and root.suffix.lower() in {".csv", ".tsv"}:
        return "csv"
    if root.is_dir() and (root / "images.txt").is_file() and (root / "image_class_labels.txt").is_file():
        return "cub"
    if root.is_dir():
        return "folder"
    raise C2MFError(f"data {str(root)!r} does not exist: give an image folder, a CUB-200-2011 folder or a CSV file")


def _folder(root: Path) -> list[tuple[str, str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise C2MFError(f"image folder {str(root)!r} has no class sub-folders: expected ROOT/<class>/<image>")
    out, empty = [], []
    for c in classes:
        # A broken symlink is kept: it is then skipped and listed as unreadable instead of vanishing unnoticed.
        files = sorted(
            p for p in (root / c).rglob("*")
            if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        out.extend((str(p), c) for p in files)
        if not files:
            empty.append(c)
    if not out:
        raise C2MFError(f"image folder {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if empty:
        # Labels follow the sorted folder names (as torchvision's ImageFolder does, which refuses empty folders
        # too): dropping a folder silently would shift the output index of every class after it.
        raise C2MFError(
            f"{len(empty)} class folder(s) of {str(root)!r} hold no images (e.g. {', '.join(map(repr, empty[:3]))}; "
            f"image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder(s)"
        )
    return out


def _read_table(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise C2MFError(f"CUB file {str(path)!r} is missing")
    table = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            key, _, value = line.strip().partition(" ")
            if not key.isdigit() or not value.strip():
                raise C2MFError(f"CUB file {str(path)!r} line {i + 1}: expected '<id> <value>', got {line.strip()!r}")
            table[int(key)] = value.strip()
    return table


def _cub(root: Path, split: Split) -> tuple[list[tuple[str, str]], bool]:
    images = _read_table(root / "images.txt")
    labels = _read_table(root / "image_class_labels.txt")
    names = _read_table(root / "classes.txt") if (root / "classes.txt").is_file() else {}
    is_train = _read_table(root / "train_test_split.txt") if split != "all" else {}
    out = []
    for image_id, rel in sorted(images.items()):
        if split != "all" and (is_train.get(image_id) == "1") != (split == "train"):
            continue
        if image_id not in labels or not labels[image_id].isdigit():
            raise C2MFError(f"image {image_id} ({rel}) has no class id in {str(root / 'image_class_labels.txt')!r}")
        label = int(labels[image_id])
        cls = names.get(label, rel.split("/")[0])
        out.append((str(root / "images" / rel), cls))
    return out, split != "all"


_PATH_HEADERS = {"path", "file", "filename", "file_name", "filepath", "image", "image_path", "img", "name"}
_LABEL_HEADERS = {"label", "class", "class_name", "classname", "target", "category", "y"}


def _csv(path: Path) -> list[tuple[str, str]]:
    """Rows of path,label; relative paths are relative to the CSV's folder. A header row is recognised by its names."""
    rows = []
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise hide the header row
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f, dialect=dialect))
    except UnicodeDecodeError as e:
        raise C2MFError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    for i, row in enumerate(table):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            sep = "tab" if dialect == "excel-tab" else "comma"
            raise C2MFError(f"{str(path)!r} line {i + 1}: expected path,label ({sep}-separated), got {row[0]!r}")
        p, label = row[0].strip(), row[1].strip()
        full = Path(p) if Path(p).is_absolute() else path.parent / p
        if i == 0 and (p.lower() in _PATH_HEADERS or label.lower() in _LABEL_HEADERS) and not full.is_file():
            continue
        rows.append((os.path.abspath(full), label))
    if not rows:
        raise C2MFError(f"CSV {str(path)!r} lists no images")
    return rows


def load_class_index(path: str | Path) -> dict[str, int]:
    """Class name -> model output index, from several common JSON shapes.

    Accepted: {"name": 3}, {"classes": {"name": {"model_index": 3}}}, {"name": {"model_index": 3}}, and Keras'
    ImageNet file {"0": ["n01440764", "tench"], ...} (wnid -> index).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise C2MFError(f"class index {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise C2MFError(f"class index {str(p)!r} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("classes"), dict):
        data = data["classes"]
    out: dict[str, int] = {}
    if not isinstance(data, dict):
        raise C2MFError(f"class index {str(p)!r} must be a JSON object mapping class names to output indices")
    for key, value in data.items():
        if isinstance(value, int):
            out[key] = value
        elif isinstance(value, dict) and isinstance(value.get("model_index"), int):
            out[key] = value["model_index"]
        elif isinstance(value, list) and value and key.isdigit():
            out[str(value[0])] = int(key)
        else:
            raise C2MFError(f"class index {str(p)!r}: cannot read the entry for {key!r}")
    return out


def class_labels(path: str | Path) -> dict[str, str]:
    """Optional human-readable labels from a class index file (CUB's `model_label`, Keras' names)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if isinstance(data, dict) and isinstance(data.get("classes"), dict):
        data = data["classes"]
    out = {}
    for key, value in data.items() if isinstance(data, dict) else []:
        if isinstance(value, dict) and "model_label" in value:
            out[key] = str(value["model_label"])
        elif isinstance(value, list) and len(value) > 1:
            out[str(value[0])] = str(value[1])
    return out


def resolve_dataset(
    spec: DatasetSpec, num_outputs: int | None = None, *, log: Callable[[str], None] | None = None
) -> list[Item]:
    """The images of `spec` in a deterministic order (class, then path), with their model output indices.

    `log` receives warnings, such as classes left without images by the split.
    """
    root = Path(spec.root).expanduser().resolve()  # stores record absolute image paths
    kind = detect_kind(root) if spec.kind == "auto" else spec.kind
    if not root.exists():
        raise C2MFError(f"data {str(root)!r} does not exist")
    if spec.split not in ("train", "test", "all"):
        raise UsageError(f"unknown split {spec.split!r}: use train, test or all")
    if spec.max_per_class is not None and spec.max_per_class < 1:
        raise UsageError(f"--max-per-class must be at least 1, got {spec.max_per_class}")
    presplit = False
    if kind == "folder":
        pairs = _folder(root)
    elif kind == "cub":
        pairs, presplit = _cub(root, spec.split)
    elif kind == "csv":
        pairs = _csv(root)
    else:
        raise UsageError(f"unknown dataset kind {kind!r}: use auto, folder, cub or csv")

    classes = sorted({c for _, c in pairs})
    if spec.class_index and spec.class_index != IDENTITY:  # identity: folder i is output i, on purpose
        index = load_class_index(spec.class_index)
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise C2MFError(
                f"{len(unknown)} class(es) are not in the class index {spec.class_index!r} "
                f"(e.g. {', '.join(unknown[:3])}): add them, or drop them from the data"
            )
        label_of = {c: index[c] for c in classes}
    else:
        label_of = {c: i for i, c in enumerate(classes)}
    if num_outputs is not None:
        bad = [c for c, i in label_of.items() if not 0 <= i < num_outputs]
        if bad:
            hint = "" if spec.class_index and spec.class_index != IDENTITY else \
                " Map class folders to model outputs with --class-index FILE."
            raise C2MFError(
                f"{len(bad)} class(es) map to output indices outside the model's {num_outputs} outputs "
                f"(e.g. {bad[0]!r} -> {label_of[bad[0]]}).{hint}"
            )

    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for path, c in pairs:
        by_class[c].append(path)
    items: list[Item] = []
    for c in classes:
        paths = sorted(by_class[c])
        if spec.split != "all" and not presplit:
            paths = _seeded_split(paths, spec.split, spec.test_fraction, spec.seed, c)
        if spec.max_per_class is not None:
            paths = paths[: spec.max_per_class]
        items.extend(Item(p, c, label_of[c]) for p in paths)
    if not items:
        raise C2MFError(
            f"no images left in {str(root)!r} after the {spec.split!r} split: a class needs at least 2 images "
            "to give one to each side of a seeded split (or use --split all)"
        )
    kept = {it.class_name for it in items}
    lost = [c for c in classes if c not in kept]
    if lost and log is not None:
        log(
            f"warning: {len(lost)} class(es) have no images in the {spec.split!r} split and are left out "
            f"(e.g. {', '.join(lost[:3])}): a class needs at least 2 images to appear on both sides"
        )
    return items


def _seeded_split(paths: list[str], split: Split, fraction: float, seed: int, cls: str) -> list[str]:
    if not 0 < fraction < 1:
        raise UsageError(f"--test-fraction must be in (0, 1), got {fraction}")
    # The class name enters the seed so classes get independent permutations; sorting paths first makes the
    # split independent of file system order.
    digest = hashlib.sha256(f"{seed}:{cls}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    order = rng.permutation(len(paths))
    n_test = int(round(len(paths) * fraction))
    if len(paths) >= 2:
        n_test = min(max(n_test, 1), len(paths) - 1)
    test = set(order[:n_test].tolist())
    keep = [p for i, p in enumerate(paths) if (i in test) == (split == "test")]
    return keep


# ----------------------------------------------------------------------------------------------------------------
# Crops


@dataclass(frozen=True)
class CropSpec:
    """Crops taken on the preprocessed model input, each resized back to the input size.

    `size` is relative to the input's short side (64/224 is CRAFT's 64-px patch on a 224-px input);
    `stride` is relative to the crop size (CRAFT uses int(0.8 * 64)). `kind="random"` draws `count` square
    crops per image with sides in [size_min, size_max] (relative), seeded per image.
    """

    kind: Literal["grid", "random"] = "grid"
    size: float = 64 / 224
    stride: float = 0.8
    count: int = 16
    size_min: float = 0.2
    size_max: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def boxes(self, height: int, width: int, image_key: str = "") -> list[tuple[int, int, int]]:
        """Crops as (top, left, side) on an input of (height, width)."""
        short = min(height, width)
        if self.kind == "grid":
            side = max(1, int(round(self.size * short)))
            step = max(1, int(self.stride * side))
            tops = range(0, height - side + 1, step)
            lefts = range(0, width - side + 1, step)
            return [(t, l, side) for t in tops for l in lefts]
        if self.kind == "random":
            if not 0 < self.size_min <= self.size_max <= 1:
                raise UsageError("random crops need 0 < size_min <= size_max <= 1")
            digest = hashlib.sha256(f"{self.seed}:{image_key}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            out = []
            for _ in range(self.count):
                side = max(1, int(round(rng.uniform(self.size_min, self.size_max) * short)))
                out.append((int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side))
            return out
        raise UsageError(f"unknown crop kind {self.kind!r}: use grid or random")

    def n_crops(self, height: int, width: int) -> int:
        return len(self.boxes(height, width)) if self.kind == "grid" else self.count


def make_crops(x: torch.Tensor, boxes: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Cut `boxes` from one input (C, H, W) and resize each back to (H, W) bilinearly, as CRAFT's reference does."""
    h, w = x.shape[-2:]
    crops = [
        F.interpolate(x[None, :, t : t + s, l : l + s], size=(h, w), mode="bilinear", align_corners=False)
        for t, l, s in boxes
    ]
    return torch.cat(crops, 0)


def check_crop_geometry(spec: CropSpec, height: int, width: int) -> None:
    n = spec.n_crops(height, width)
    if n < 1:
        raise UsageError(f"crop settings give no crops on a {height}x{width} input: lower --crop-size")
    if spec.kind == "grid" and not 0 < spec.size <= 1:
        raise UsageError(f"--crop-size must be in (0, 1] (relative to the input), got {spec.size}")
    if spec.kind == "grid" and not 0 < spec.stride <= 1 + 1e-9:
        raise UsageError(f"--crop-stride must be in (0, 1] (relative to the crop size), got {spec.stride}")
    if math.isnan(spec.size):
        raise UsageError("--crop-size is NaN")
