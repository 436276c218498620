"""Shared fixtures: generated image folders, tiny random timm models, and small stores built from them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the network

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "README.md").is_file(),
    reason=f"real data folder {SHARED_DATA} is absent (it sits beside the checkout on the project's machines)",
)

@pytest.fixture
def one_thread():
    """Tiny problems: intra-op threads only add contention on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_MODEL = "test_resnet"  # timm's tiny ResNet, random weights (seeded)
TINY_LAYER = "layer3"
TINY_INPUT = "64,64"


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 6, size=(48, 40), seed: int = 0) -> Path:
    """Class folders of small PNGs; each class draws a rectangle of its own colour on noise."""
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40), (160, 40, 200)]
    for c in range(n_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size
            img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            img[y0 : y0 + h // 2, x0 : x0 + w // 2] = colours[c % len(colours)]
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def build_store(out: Path, data: Path, mode: str = "full", **kw) -> Path:
    from c2mf_cli.inputs.data import DatasetSpec
    from c2mf_cli.stages.extract import ExtractConfig, extract
    from c2mf_cli.inputs.models import ModelSpec

    cfg = ExtractConfig(
        model=ModelSpec(kw.pop("model", TINY_MODEL)),
        layer=kw.pop("layer", TINY_LAYER),
        data=DatasetSpec(str(data), split=kw.pop("split", "all")),
        out=str(out),
        mode=mode,
        workers=0,
        chunk_images=kw.pop("chunk_images", 4),
        preprocess_overrides={"input_size": (3, 64, 64)},
        **kw,
    )
    extract(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, image_folder) -> Path:
    """A complete whole-image store: 3 classes x 6 images, test_resnet layer3 at 64 px (4x4x192 per image)."""
    return build_store(tmp_path_factory.mktemp("stores") / "full.zarr", image_folder)


@pytest.fixture(scope="session")
def tiny_crop_store(tmp_path_factory, image_folder) -> Path:
    """The crop-mode twin of `tiny_store` (CRAFT grid crops, pooled: rows of 192 channels)."""
    return build_store(tmp_path_factory.mktemp("stores") / "crops.zarr", image_folder, mode="crops")


@pytest.fixture(scope="session")
def tiny_test_store(tmp_path_factory) -> Path:
    """A held-out twin of `tiny_store`: other images (seed 1) of the same classes, same model and layer."""
    root = tmp_path_factory.mktemp("held_out")
    return build_store(root / "test.zarr", make_image_folder(root / "images", seed=1))
