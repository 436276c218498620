"""The demo model: timm architecture, pretrained_cfg, trains, saves as factory file + safetensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    assert 0.0 <= result.test_accuracy <= 1.0 and result.epochs == 1 and result.n_parameters > 0
    config = ModelConfig(num_classes=3)
    factory, ckpt = save_model(model, config, tmp_path / "model")
    x = normalize(load_images(world.paths("test")))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(load_trained(ckpt)(x), expected)
    spec = importlib.util.spec_from_file_location("demo_model_file", factory)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.create()
    fresh.load_state_dict(load_file(str(ckpt)))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
    assert fresh.pretrained_cfg["num_classes"] == 3
    with pytest.raises(C2MFError, match="no checkpoint"):
        load_trained(tmp_path / "missing.safetensors")
