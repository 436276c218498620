"""Model loading, checkpoints, preprocessing and the exact split f = h o g."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2mf_cli.errors import C2MFError
from c2mf_cli.inputs.models import ModelSpec, Preprocess, list_layers, load_checkpoint, load_model, split_model

from .conftest import SHARED_DATA, needs_shared_data

CIFAR = f"{SHARED_DATA}/models.py:cifar_resnet20"
BIRDS = f"{SHARED_DATA}/models.py:mobilenet_v2_inat_birds"


def _check_all_useful_layers(lm, input_size=None, n=2):
    input_size = input_size or lm.preprocess.input_size
    layers = [info for info in list_layers(lm.model, input_size, check_splits=False) if info.role]
    assert layers, "no useful layer found"
    x = torch.randn(n, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lm.model(x)
        for info in layers:
            split = split_model(lm.model, info.name, input_size, verify=False)
            out = split.h(split.g(x))
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=f"layer {info.name}")
    return [i.name for i in layers]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("test_resnet", {"layer1", "layer2", "layer3", "layer4"}),
        ("test_nfnet", {"stages.0", "stages.1", "stages.2", "final_conv", "final_act"}),
        ("test_vit", {f"blocks.{i}" for i in range(6)} | {"norm"}),
    ],
)
def test_split_is_exact_for_timm_models(name, expected):
    lm = load_model(ModelSpec(name))
    names = _check_all_useful_layers(lm, (3, 64, 64) if name != "test_vit" else None)
    assert expected <= set(names)


@needs_shared_data
def test_split_is_exact_for_user_models():
    cifar = load_model(ModelSpec(CIFAR, checkpoint=str(SHARED_DATA / "cifar10/resnet20-12fca82f.th")))
    assert {"layer1", "layer2", "layer3"} <= set(_check_all_useful_layers(cifar))
    birds = load_model(ModelSpec(BIRDS, checkpoint=str(SHARED_DATA / "cub/mobilenet_v2_inat_birds.pt")))
    names = _check_all_useful_layers(birds, n=1)
    assert {"blocks.16", "head_conv"} <= set(names)


def test_vit_split_keeps_all_tokens_and_the_grid():
    lm = load_model(ModelSpec("test_vit"))
    split = split_model(lm.model, "blocks.3")
    assert split.layout == "tokens"
    assert split.num_prefix_tokens == 1
    assert split.grid == (10, 10)
    assert split.store_shape == (101, 64)


def test_cnn_split_store_layout_roundtrip():
    lm = load_model(ModelSpec("test_resnet"))
    split = split_model(lm.model, "layer2", (3, 64, 64))
    a = torch.randn(2, 48, 8, 8)
    assert split.to_store(a).shape == (2, 8, 8, 48)
    torch.testing.assert_close(split.from_store(split.to_store(a)), a)


def test_nhwc_model_maps_are_stored_with_channels_last():
    # timm's MambaOut (like Swin) keeps its maps (n, h, w, c); read as (n, c, h, w) they were scrambled.
    lm = load_model(ModelSpec("test_mambaout"), preprocess_overrides={"input_size": (3, 64, 64)})
    split = split_model(lm.model, "stages.1", (3, 64, 64))
    assert split.nhwc and split.layout == "nchw"
    assert split.grid == (8, 8) and split.channels == 32 and split.store_shape == (8, 8, 32)
    assert split.describe()["model_format"] == "NHWC"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = split.g(x)
        torch.testing.assert_close(split.to_store(a), a)
        torch.testing.assert_close(split.h(split.from_store(split.to_store(a))), lm.model(x))
        torch.testing.assert_close(split.pool(a), a.mean(dim=(1, 2)))
    cnn = split_model(load_model(ModelSpec("test_resnet")).model, "layer2", (3, 64, 64))
    assert not cnn.nhwc and "model_format" not in cnn.describe()  # NCHW stores keep their fingerprints


def test_layer_inside_a_residual_branch_is_refused():
    lm = load_model(ModelSpec("test_resnet"))
    with pytest.raises(C2MFError, match="skip connection"):
        split_model(lm.model, "layer2.0.conv1", (3, 64, 64))


def test_unknown_layer_lists_close_matches():
    lm = load_model(ModelSpec("test_resnet"))
    with pytest.raises(C2MFError, match=r"unknown layer 'layr3'.*layer3"):
        split_model(lm.model, "layr3")


def test_unknown_model_lists_close_matches():
    with pytest.raises(C2MFError, match=r"unknown model 'resnet181'.*resnet18"):
        load_model(ModelSpec("resnet181"))


def test_pretrained_without_network_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(C2MFError, match="--checkpoint"):
        load_model(ModelSpec("test_resnet.r160_in1k", pretrained=True))
    assert time.perf_counter() - t0 < 30


def test_factory_errors(tmp_path):
    with pytest.raises(C2MFError, match="does not exist"):
        load_model(ModelSpec(f"{tmp_path}/nope.py:f"))
    f = tmp_path / "m.py"
    f.write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(C2MFError, match="has no callable 'mkae'.*make"):
        load_model(ModelSpec(f"{f}:mkae"))


def _user_model_file(tmp_path: Path) -> str:
    f = tmp_path / "net.py"
    f.write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())\n"
        "        self.pool = nn.AdaptiveAvgPool2d(1)\n"
        "        self.fc = nn.Linear(16, 5)\n"
        "        self.pretrained_cfg = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.pool(self.features(x)).flatten(1))\n"
        "def net():\n"
        "    return Net()\n"
    )
    return f"{f}:net"


def test_checkpoint_variants_load(tmp_path):
    name = _user_model_file(tmp_path)
    src = load_model(ModelSpec(name), seed=3).model
    state = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    ckpt = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "best_prec1": 0.5, "state_dict": state}, ckpt)
    lm = load_model(ModelSpec(name, checkpoint=str(ckpt)), seed=7)
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(lm.model.state_dict()[k], v)
    assert lm.report.stripped_prefix == "module."
    assert lm.report.nested_key == "state_dict"
    assert lm.report.filled_buffers == ["features.1.num_batches_tracked"]


def test_checkpoint_mismatch_is_reported(tmp_path):
    name = _user_model_file(tmp_path)
    state = load_model(ModelSpec(name)).model.state_dict()
    state["fc.weight"] = torch.zeros(7, 16)
    state["extra.bias"] = torch.zeros(3)
    ckpt = tmp_path / "bad.pth"
    torch.save(state, ckpt)
    with pytest.raises(C2MFError, match=r"1 unexpected.*extra.bias.*another shape.*fc.weight"):
        load_model(ModelSpec(name, checkpoint=str(ckpt)))


class _Evil:  # any class that is not a tensor: weights_only unpickling refuses to build it
    pass


def test_pickled_objects_are_refused(tmp_path):
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "obj": _Evil()}, ckpt)
    model = load_model(ModelSpec(_user_model_file(tmp_path))).model
    with pytest.raises(C2MFError, match="weights_only"):
        load_checkpoint(model, ckpt)


def test_preprocess_matches_timm_eval_transform():
    from timm.data import create_transform, resolve_data_config

    lm = load_model(ModelSpec("test_resnet"))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (203, 317, 3), dtype=np.uint8))
    ours = lm.preprocess(img)
    theirs = create_transform(**resolve_data_config(model=lm.model), is_training=False)(img)
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < 0.05  # PIL vs torchvision resize rounding only


def test_crop_box_maps_input_back_to_original():
    p = Preprocess(input_size=(3, 224, 224), crop_pct=0.875)
    left, top, right, bottom = p.crop_box(400, 300)  # landscape: short side 300 -> 256
    assert right - left == pytest.approx(224 * 300 / 256, rel=1e-3)
    assert bottom - top == pytest.approx(224 * 300 / 256, rel=1e-3)
    assert (left + right) / 2 == pytest.approx(200, abs=1)
    assert (top + bottom) / 2 == pytest.approx(150, abs=1)


@needs_shared_data
def test_user_model_preprocessing_comes_from_its_pretrained_cfg():
    lm = load_model(ModelSpec(BIRDS))
    assert lm.preprocess.size == (224, 224)
    assert lm.preprocess.crop_pct == 0.875
    assert lm.preprocess.mean == (0.5, 0.5, 0.5)
    sys.modules.pop("models", None)


def test_reopen_checks_the_weights_and_splits(tmp_path):
    from c2mf_cli.inputs.models import WeightsMismatch, reopen

    name = _user_model_file(tmp_path)
    ckpt = tmp_path / "w.pth"
    torch.save(load_model(ModelSpec(name), seed=3).model.state_dict(), ckpt)
    spec = ModelSpec(name, checkpoint=str(ckpt))
    recorded = load_model(spec).weights_sha256
    opened = reopen(spec, "features", recorded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(opened.split.h(opened.split.g(x)), opened.loaded.model(x))
    assert opened.warnings == []
    with pytest.raises(WeightsMismatch, match=r"not those the store was made with \(0000000000"):
        reopen(spec, "features", "0" * 64)
    chosen = reopen(spec, "features", "0" * 64, allow_other_weights=True)
    assert chosen.warnings and "not those the store was made with" in chosen.warnings[0]
