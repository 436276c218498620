"""What a model is and how its input is prepared: plain dataclasses, cheap to import (no torch, no torch.fx).

The activation store and the dictionary file record these and rebuild them on read; nothing here builds a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from ...errors import UsageError

if TYPE_CHECKING:
    import torch

# How a layer's output maps to a store's rows: a spatial map (stored h, w, c), tokens (T, c) or a vector (c,).
# "nchw" names the kind of output (any spatial map), not the order of a stored row: see `row_layout`.
Layout = Literal["nchw", "tokens", "vector"]


def row_layout(layout: str, mode: str = "full", num_prefix_tokens: int = 0) -> str:
    """What one stored row holds, axis by axis, in words (what `c2mf info` shows)."""
    if mode == "crops":
        return "one crop's map averaged over positions: (c)"
    if layout == "nchw":
        return "spatial map, channels last: (h, w, c)"
    if layout == "tokens":
        return f"tokens: (tokens, c), the {num_prefix_tokens} prefix token(s) first, then the patch grid row by row"
    return "vector: (c)"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build the model: a timm name, `path/file.py:factory` or `package.module:factory`.

    `checkpoint` is a local weights file; `pretrained` asks timm for its hub weights (needs the network).
    """

    name: str
    checkpoint: str | None = None
    pretrained: bool = False

    @property
    def is_factory(self) -> bool:
        return ":" in self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(name=d["name"], checkpoint=d.get("checkpoint"), pretrained=bool(d.get("pretrained", False)))


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing as timm does it: resize the short side to floor(size / crop_pct), centre-crop, normalise."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or self.input_size[0] not in (1, 3) or min(self.input_size[1:]) < 1:
            raise UsageError(f"input size {self.input_size} is not (channels, height, width) with 1 or 3 channels")
        if not 0 < self.crop_pct <= 1:
            raise UsageError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise UsageError(
                f"unknown interpolation {self.interpolation!r}: use one of {', '.join(_INTERPOLATIONS)}"
            )
        if len(self.mean) != self.input_size[0] and len(self.mean) != 3:
            raise UsageError(f"mean {self.mean} does not match {self.input_size[0]} input channels")
        if any(s <= 0 for s in self.std):
            raise UsageError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
        )

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return int(self.input_size[1]), int(self.input_size[2])

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image after the resize step (before the centre crop), as timm computes it."""
        th, tw = self.size
        if th == tw:
            scale_size = math.floor(th / self.crop_pct)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = scale_size, int(scale_size * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return math.floor(tw / self.crop_pct), math.floor(th / self.crop_pct)

    def crop_offset(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop in the resized image; negative where the crop pads a too-small image.

        The one place that says where the model input sits: `input_image` crops there and the heatmaps of
        `c2mf_cli.render.geometry` are placed from it.
        """
        rw, rh = self.resized_size(width, height)
        th, tw = self.size
        return int(round((rw - tw) / 2.0)), int(round((rh - th) / 2.0))

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box (left, top, right, bottom) of the ORIGINAL image that the model input shows.

        Mapping a heatmap on the model input back onto the original image is a resize into this box.
        """
        rw, rh = self.resized_size(width, height)
        th, tw = self.size
        left, top = self.crop_offset(width, height)
        sx, sy = width / rw, height / rh
        return left * sx, top * sy, (left + tw) * sx, (top + th) * sy

    def input_image(self, img: Image.Image) -> Image.Image:
        """The model-input-sized PIL image (resize + centre crop), before normalisation."""
        img = img.convert("RGB" if self.input_size[0] == 3 else "L")
        left, top = self.crop_offset(*img.size)
        rw, rh = self.resized_size(*img.size)
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), _INTERPOLATIONS[self.interpolation])
        th, tw = self.size
        if left < 0 or top < 0:  # the short side is smaller than the input (crop_pct > 1 is refused, but rounding)
            canvas = Image.new(img.mode, (max(rw, tw), max(rh, th)))
            canvas.paste(img, (max(-left, 0), max(-top, 0)))
            img, left, top = canvas, max(left, 0), max(top, 0)
        return img.crop((left, top, left + tw, top + th))

    def normalize(self, img: Image.Image) -> "torch.Tensor":
        """A model-input-sized PIL image -> normalised float tensor (C, H, W)."""
        import torch  # here, so that reading a store's records does not import torch

        arr = np.asarray(img, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        mean = torch.tensor(self.mean[: t.shape[0]], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std[: t.shape[0]], dtype=torch.float32).view(-1, 1, 1)
        return (t - mean) / std

    def __call__(self, img: Image.Image) -> "torch.Tensor":
        return self.normalize(self.input_image(img))



def preprocess_from_model(model: Any, **overrides: Any) -> tuple[Preprocess, bool]:
    """Preprocessing from the model's `pretrained_cfg` (timm, or a user model's own attribute), then overrides.

    Returns the config and whether the model declared one (False means the ImageNet defaults were used).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    declared = bool(cfg)
    base = Preprocess()
    values: dict[str, Any] = {
        "input_size": tuple(cfg.get("input_size") or base.input_size),
        "mean": tuple(cfg.get("mean") or base.mean),
        "std": tuple(cfg.get("std") or base.std),
        "crop_pct": float(cfg.get("crop_pct") or base.crop_pct),
        "interpolation": str(cfg.get("interpolation") or base.interpolation),
    }
    if values["interpolation"] not in _INTERPOLATIONS:
        values["interpolation"] = "bilinear"
    for key, value in overrides.items():
        if key not in values:
            raise UsageError(f"unknown preprocessing option {key!r}")
        if value is not None:
            values[key] = tuple(value) if isinstance(value, list) else value
    if len(values["mean"]) == 1:
        values["mean"] = tuple(values["mean"]) * 3
    if len(values["std"]) == 1:
        values["std"] = tuple(values["std"]) * 3
    return Preprocess(**values), declared

