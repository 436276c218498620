"""A small timm CNN for the synthetic world, trained from scratch in well under a minute on 2 CPU cores.

The model is timm's registered `resnet10t` architecture with narrow widths and output stride 8, so its last
stage keeps an 8x8 grid on 64x64 images (64 channels): fine enough for concept heatmaps to be compared with
the primitives' pixel masks. It carries a timm-style `pretrained_cfg` (input size, mean, std, crop_pct=1.0,
interpolation), so c2mf's model loader preprocesses demo images exactly as training did.

The trained model is saved the way a user would hand over their own model: a python factory file plus a
safetensors checkpoint (`--model DIR/model.py:create --checkpoint DIR/model.safetensors`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .._io import write_safetensors, write_text
from ..errors import C2MFError
from ..inputs.images import read_image
from .synthetic import World

ARCH = "resnet10t"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CONCEPT_LAYER = "layer3"  # third stage: (48, 8, 8) on 64 px images; primitives are local there (see docs/demo.md)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the demo model (timm `resnet10t` with small widths)."""

    num_classes: int = 6
    image_size: int = 64
    stem_width: int = 8
    channels: tuple[int, ...] = (16, 32, 48, 64)
    output_stride: int = 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


@dataclass(frozen=True)
class TrainConfig:
    """How the demo model is trained. Written next to the checkpoint."""

    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    train_accuracy: float
    test_accuracy: float
    seconds: float
    epochs: int
    n_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pretrained_cfg(config: ModelConfig) -> dict[str, Any]:
    """The timm-style preprocessing description the model carries."""
    return {
        "input_size": (3, config.image_size, config.image_size),
        "mean": MEAN,
        "std": STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "num_classes": config.num_classes,
    }


def create_model(config: ModelConfig) -> torch.nn.Module:
    """A randomly initialised demo model (eval mode) with its pretrained_cfg set."""
    model = timm.create_model(
        ARCH,
        pretrained=False,
        num_classes=config.num_classes,
        stem_width=config.stem_width,
        channels=tuple(config.channels),
        output_stride=config.output_stride,
        pretrained_cfg_overlay=pretrained_cfg(config),
    )
    return model.eval()


def load_images(paths: list[Path]) -> torch.Tensor:
    """uint8 (n, 3, H, W) tensor of the images."""
    arrs = []
    for p in paths:
        arrs.append(np.asarray(read_image(p)))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float32 normalised with the model's mean and std."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(x), batch_size):
        correct += int((model(normalize(x[s : s + batch_size])).argmax(1) == y[s : s + batch_size]).sum())
    return correct / max(len(x), 1)


def train_model(
    world: World,
    train_config: TrainConfig = TrainConfig(),
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train the demo model on the world's train split; report train and test accuracy.

    Augmentation is horizontal and vertical flips only: primitives are symmetric enough that a flip keeps
    every class's meaning. Seeded: same world and config give the same weights on the same machine.
    """
    torch.manual_seed(train_config.seed)
    gen = torch.Generator().manual_seed(train_config.seed)
    config = ModelConfig(num_classes=len(world.classes), image_size=world.config.image_size)
    model = create_model(config)
    x_train, y_train = load_images(world.paths("train")), torch.from_numpy(world.labels("train"))
    x_test, y_test = load_images(world.paths("test")), torch.from_numpy(world.labels("test"))
    n = len(x_train)
    steps_per_epoch = (n + train_config.batch_size - 1) // train_config.batch_size
    total_steps = steps_per_epoch * train_config.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train_config.lr, total_steps=total_steps, pct_start=0.2)
    advance = progress("train model", train_config.epochs) if progress is not None else (lambda k=1: None)
    t0 = time.perf_counter()
    for _epoch in range(train_config.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, train_config.batch_size):
            idx = order[s : s + train_config.batch_size]
            xb = x_train[idx]
            flips = torch.rand(2, generator=gen)
            if flips[0] < 0.5:
                xb = xb.flip(3)
            if flips[1] < 0.5:
                xb = xb.flip(2)
            loss = F.cross_entropy(model(normalize(xb)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        advance(1)
    seconds = time.perf_counter() - t0
    model.eval()
    result = TrainResult(
        train_accuracy=accuracy(model, x_train, y_train),
        test_accuracy=accuracy(model, x_test, y_test),
        seconds=seconds,
        epochs=train_config.epochs,
        n_parameters=sum(p.numel() for p in model.parameters()),
    )
    return model, result


_FACTORY_TEMPLATE = '''"""The c2mf demo model: timm resnet10t with small widths (written by `c2mf demo`).

Load it like any user model:  c2mf extract --model {file}:create --checkpoint {ckpt} ...
"""

from c2mf_cli.demo.train import ModelConfig, create_model


def create(num_classes=None):
    config = {config!r}
    if num_classes is not None:
        config["num_classes"] = num_classes
    return create_model(ModelConfig(**config))
'''


def save_model(model: torch.nn.Module, config: ModelConfig, out_dir: str | os.PathLike[str],
               extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write `model.py` (a `create()` factory) and `model.safetensors`; return (factory file, checkpoint).

    The model spec for c2mf is then `f"{factory_file}:create"` with `checkpoint=checkpoint`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model.safetensors"
    factory = out / "model.py"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"c2mf-demo-model": json.dumps(config.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    write_safetensors(ckpt, state, meta)
    cfg = config.to_dict()
    cfg["channels"] = tuple(cfg["channels"])
    text = _FACTORY_TEMPLATE.format(file=factory.name, ckpt=ckpt.name, config=cfg)
    write_text(factory, text)
    return factory, ckpt


def load_trained(checkpoint: str | os.PathLike[str]) -> torch.nn.Module:
    """Rebuild a demo model from its safetensors checkpoint alone (the config is in the file's metadata)."""
    from safetensors import safe_open

    path = Path(checkpoint)
    if not path.is_file():
        raise C2MFError(f"no checkpoint at {path}: run `c2mf demo` to train one")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "c2mf-demo-model" not in meta:
        raise C2MFError(f"{path} is not a c2mf demo checkpoint (no c2mf-demo-model metadata)")
    raw = json.loads(meta["c2mf-demo-model"])
    raw["channels"] = tuple(raw["channels"])
    model = create_model(ModelConfig(**raw))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
