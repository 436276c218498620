"""The one image reader (c2mf_cli.inputs.images): every mode PIL opens, clear errors, and no second reader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from c2mf_cli.errors import C2MFError
from c2mf_cli.inputs.images import read_image

PACKAGE = Path(__file__).resolve().parents[1] / "c2mf_cli"


def test_read_image_handles_every_pil_mode(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (12, 16)).astype(np.uint16)
    cases = {
        "grey.png": Image.fromarray(rgb).convert("L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "bilevel.png": Image.fromarray(rgb).convert("1"),
        "grey16.png": Image.fromarray(grey16),
        "float.tif": Image.fromarray((grey16 / 65535.0).astype(np.float32)),
        "one_pixel.png": Image.fromarray(rgb[:1, :1]),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = read_image(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == im.size, name
    # 16-bit and float data keep their brightness (PIL alone clips them to white and black)
    expected = grey16 / 257.0
    for name in ("grey16.png", "float.tif"):
        got = np.asarray(read_image(str(tmp_path / name)))[..., 0].astype(float)
        assert np.abs(got - expected).max() <= 1.0, name



def test_read_image_errors(tmp_path):
    with pytest.raises(C2MFError, match="does not exist"):
        read_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(C2MFError, match="cannot read image"):
        read_image(bad)
    Image.new("L", (5, 7)).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").mode == "RGB"


def test_extract_explain_and_atlas_see_the_same_pixels_of_a_16_bit_png(tmp_path):
    """The bug this reader fixed: explain and atlas read a 16-bit PNG as almost white while extract did not."""
    from c2mf_cli.stages import atlas, explain, extract

    grey16 = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    readers = {"extract": extract.read_image, "explain": explain.read_image, "atlas": atlas.read_image}
    pixels = {name: np.asarray(reader(tmp_path / "deep.png")) for name, reader in readers.items()}
    assert abs(float(pixels["extract"].mean()) - float(grey16.mean()) / 257) < 1  # mid-grey, not white
    for name in ("explain", "atlas"):
        np.testing.assert_array_equal(pixels[name], pixels["extract"], err_msg=name)


def test_no_module_but_images_opens_image_files():
    opens = re.compile(r"\bImage\.open\(")
    readers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if opens.search(p.read_text()))
    assert readers == ["inputs/images.py"]
