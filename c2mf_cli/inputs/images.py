"""The one image reader: every command (extract, explain, atlas) sees the same pixels of the same file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


from ..errors import C2MFError


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images as 8-bit "L".

    PIL's own convert("RGB") clips them at 255, so a 16-bit PNG came out white and a float TIFF in [0, 1] black.
    16-bit data is scaled by 1/257; 32-bit integers likewise when they exceed 255; floats in [0, 1] by 255.
    """
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
        a = a / 257.0
    elif im.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
        a = a * 255.0
    return Image.fromarray(np.clip(np.round(np.nan_to_num(a)), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image as RGB, or fail with one C2MFError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise C2MFError(f"image {str(p)!r} does not exist: check the path")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode.startswith("I") or im.mode == "F":
                return _to_8bit(im).convert("RGB")
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise C2MFError(f"cannot read image {str(p)!r}: {e} (PIL's safety limit): downscale it first") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise C2MFError(f"cannot read image {str(p)!r} ({e}): give a JPEG, PNG or other file PIL can open") from None
