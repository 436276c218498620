"""The demo model: timm architecture, pretrained_cfg, trains, saves as factory file + safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from c2mf_cli.demo.synthetic import WorldConfig, generate
from c2mf_cli.demo.train import (
    ModelConfig,
    TrainConfig,
    create_model,
    load_images,
    load_trained,
    normalize,
    save_model,
    train_model,
)
from c2mf_cli.errors import C2MFError
from c2mf_cli.inputs.models import ModelSpec, load_model


def test_model_shape_and_pretrained_cfg() -> None:
    model = create_model(ModelConfig(num_classes=5))
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 64, 64) and cfg["crop_pct"] == 1.0
    assert cfg["interpolation"] == "bilinear" and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    feats = model.forward_features(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, 64, 8, 8)  # the concept layer keeps an 8x8 grid
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_train_save_and_reload_as_a_user_would(tmp_path: Path) -> None:
    world = generate(WorldConfig(n_classes=3, n_primitives=4, images_per_class=8, test_per_class=4), tmp_path / "w")
    model, result = train_model(world, TrainConfig(epochs=1, batch_size=8))
    assert result.epochs == 1 and result.n_parameters > 0
    config = ModelConfig(num_classes=3)
    factory, ckpt = save_model(model, config, tmp_path / "model")
    x = normalize(load_images(world.paths("test")))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(load_trained(ckpt)(x), expected)
    # the reported accuracy is the saved model's, counted by hand on the test images
    hits = int((expected.argmax(1) == torch.as_tensor(world.labels("test"))).sum())
    assert result.test_accuracy == hits / len(world.paths("test"))
    # the way every c2mf command loads a user's model: --model FILE.py:create --checkpoint FILE.safetensors
    lm = load_model(ModelSpec(name=f"{factory}:create", checkpoint=str(ckpt)))
    assert tuple(lm.preprocess.input_size) == (3, 64, 64) and lm.preprocess.crop_pct == 1.0 and lm.preprocess_declared
    with torch.no_grad():
        assert torch.equal(lm.model(x), expected)
    with pytest.raises(C2MFError, match="no checkpoint"):
        load_trained(tmp_path / "missing.safetensors")
