"""Load a classifier (a timm name or a user's factory + checkpoint) and split it exactly at a layer.

Notation: `f(x) = h(g(x))`. `g` maps preprocessed images (n, 3, H, W) to the layer's output in the model's own
layout; `h` maps that output to the logits. Stores keep activations channels-last: (n, h, w, c) for a CNN
feature map, (n, T, c) for ViT tokens (prefix tokens such as CLS first). Layout "nchw" names any spatial map,
including those a model keeps channels-last itself (timm's NHWC models: `Split.nhwc`, stored the same way).

The split is built with torch.fx: the model is traced with every module a leaf except the ancestors of the
layer, so user code inside leaf modules may do anything, and only the forward of the containers on the path
to the layer must be traceable. `g` is the part of the graph the layer's output depends on; `h` is the rest,
with the layer's output as its only input. A graph in which anything after the layer still needs a value
computed before it (a residual that jumps over the layer) cannot be split, and says so.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
from PIL import Image
from torch import nn

from ..errors import C2MFError, UsageError

Layout = Literal["nchw", "tokens", "vector"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# ----------------------------------------------------------------------------------------------------------------
# Specs and preprocessing


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

    def normalize(self, img: Image.Image) -> torch.Tensor:
        """A model-input-sized PIL image -> normalised float tensor (C, H, W)."""
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        mean = torch.tensor(self.mean[: t.shape[0]], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std[: t.shape[0]], dtype=torch.float32).view(-1, 1, 1)
        return (t - mean) / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.input_image(img))


def preprocess_from_model(model: nn.Module, **overrides: Any) -> tuple[Preprocess, bool]:
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


# ----------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadReport:
    """What a checkpoint load did: tensors loaded, and keys that were dropped or filled in."""

    loaded: int = 0
    ignored_unexpected: list[str] = field(default_factory=list)
    filled_buffers: list[str] = field(default_factory=list)
    stripped_prefix: str | None = None
    nested_key: str | None = None


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    preprocess: Preprocess
    weights_sha256: str
    preprocess_declared: bool = True
    report: LoadReport | None = None

    @property
    def num_outputs(self) -> int | None:
        n = getattr(self.model, "num_classes", None)
        return int(n) if isinstance(n, int) else None


def _import_factory(name: str):
    target, _, attr = name.rpartition(":")
    if not target or not attr:
        raise UsageError(f"model {name!r}: a factory is given as path/to/file.py:factory or package.module:factory")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise C2MFError(f"model file {str(path)!r} does not exist: give path/to/file.py:factory")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        mod_name = f"c2mf_user_model_{path.stem}_{digest}"
        if mod_name in sys.modules:
            module = sys.modules[mod_name]
        else:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise C2MFError(f"cannot import {str(path)!r} as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise C2MFError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise C2MFError(f"cannot import module {target!r} for model {name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        available = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, available, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise C2MFError(f"{target!r} has no callable {attr!r}.{hint}")
    return factory


def _unknown_timm_model(name: str) -> C2MFError:
    import timm

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return C2MFError(
        f"unknown model {name!r}: not a timm architecture, and not a factory (path/file.py:factory).{hint}"
    )


def _create_timm(spec: ModelSpec, num_classes: int | None) -> nn.Module:
    import timm

    arch, _tag = timm.models.split_model_name_tag(spec.name)
    if not timm.is_model(arch):
        raise _unknown_timm_model(spec.name)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not spec.pretrained:
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    try:
        return timm.create_model(spec.name, pretrained=True, **kwargs)
    except Exception as e:  # hub errors come in many types (offline, HTTP, missing files)
        raise C2MFError(
            f"could not get the pretrained weights of {spec.name!r} ({type(e).__name__}): no network or no such "
            "weights. Download them where there is a network and pass --checkpoint PATH, or use --no-pretrained"
        ) from None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise C2MFError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:
            raise C2MFError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise C2MFError(
            f"checkpoint {str(path)!r} cannot be read safely (weights_only=True): {msg}. "
            "Save a plain state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
        ) from None
    if not isinstance(obj, dict):
        raise C2MFError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unwrap_state_dict(obj: dict[str, Any], report: LoadReport) -> dict[str, torch.Tensor]:
    """Find the tensors in what real checkpoints look like: nested dicts, `module.`/`_orig_mod.` prefixes."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "model_state", "model_state_dict", "net"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            if not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj, report.nested_key = inner, key
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise C2MFError("the checkpoint holds no tensors (expected a state dict, maybe under 'state_dict')")
    for prefix in ("module.", "_orig_mod.", "model."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
            report.stripped_prefix = (report.stripped_prefix or "") + prefix
    return tensors


def load_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Load weights into `model`, strictly: every parameter must be there with its shape.

    Missing `num_batches_tracked` buffers keep their initial value; extra keys that are not parameters of the
    model are an error too, since they usually mean the wrong architecture.
    """
    path = Path(path).expanduser()
    report = LoadReport()
    state = _unwrap_state_dict(_read_checkpoint(path), report)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    report.filled_buffers = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} with another shape (e.g. {'; '.join(mismatched[:2])})")
    if problems:
        raise C2MFError(
            f"checkpoint {str(path)!r} does not match the model: {'; '.join(problems)}. "
            "Check the architecture (and its num_classes) that goes with these weights"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    report.loaded = len(state)
    return report


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """A hash of the weights themselves (names, shapes, values), for models without a weights file."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_model(
    spec: ModelSpec,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    preprocess_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build the model of `spec`, load its weights, put it in eval mode, and resolve its preprocessing.

    Random initialisation (no checkpoint, not pretrained) is seeded so the same spec gives the same weights.
    """
    torch.manual_seed(seed)
    if spec.is_factory:
        if spec.pretrained:
            raise UsageError("--pretrained applies to timm names; a factory model takes its weights from --checkpoint")
        factory = _import_factory(spec.name)
        try:
            model = factory(num_classes=num_classes) if num_classes is not None else factory()
        except Exception as e:
            raise C2MFError(f"the factory {spec.name!r} failed: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise C2MFError(f"the factory {spec.name!r} returned a {type(model).__name__}, not a torch nn.Module")
    else:
        if spec.pretrained and spec.checkpoint:
            raise UsageError("give either --pretrained or --checkpoint, not both")
        model = _create_timm(spec, num_classes)
    report = None
    if spec.checkpoint:
        report = load_checkpoint(model, spec.checkpoint)
        digest = _file_sha256(Path(spec.checkpoint).expanduser())
    else:
        digest = state_dict_sha256(model)
    model.eval()
    preprocess, declared = preprocess_from_model(model, **(preprocess_overrides or {}))
    return LoadedModel(model, spec, preprocess, digest, declared, report)


# ----------------------------------------------------------------------------------------------------------------
# The split f = h o g


def _timm_autowrap() -> tuple[Any, ...]:
    try:
        from timm.layers import _fx
    except ImportError:  # an older timm keeps them elsewhere; tracing then relies on leaf modules only
        return ()
    return tuple(f for f in _fx.get_notrace_functions() if callable(f))


class _PathTracer(fx.Tracer):
    """Traces only through the containers on the path to the layer; every other module is one call."""

    def __init__(self, ancestors: set[str]) -> None:
        super().__init__(autowrap_functions=_timm_autowrap())
        self.ancestors = ancestors

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.ancestors


def _ancestors(layer: str) -> set[str]:
    parts = layer.split(".")
    return {".".join(parts[:i]) for i in range(len(parts))}


def _trace(model: nn.Module, layer: str) -> fx.GraphModule:
    tracer = _PathTracer(_ancestors(layer))
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        parent = layer.rpartition(".")[0] or "the model"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise C2MFError(
            f"cannot split the model at {layer!r}: tracing the forward of {parent!r} failed ({msg}). "
            "Pick a layer whose parents have a plain forward (stage outputs, top-level blocks), see `c2mf layers`"
        ) from None
    finally:
        model.train(was_training)
    _inline_optional_inputs(graph)
    return fx.GraphModule(model, graph)


def _inline_optional_inputs(graph: fx.Graph) -> None:
    """Replace forward arguments after the image that have defaults (timm's `attn_mask=None`) by those defaults."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        if not node.args:  # no default: a real second input, reported by the split
            continue
        default = node.args[0]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: default if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: default if a is node else a)
        graph.erase_node(node)


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


class _SplitError(Exception):
    pass


def _build_split(gm: fx.GraphModule, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut the traced graph at the call of `layer` into g (input -> layer output) and h (layer output -> out)."""
    graph = gm.graph
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if not calls:
        raise _SplitError(f"{layer!r} is never called in the model's forward")
    if len(calls) > 1:
        raise _SplitError(f"{layer!r} is called {len(calls)} times in the forward, so its output is ambiguous")
    cut = calls[0]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _SplitError(f"the model's forward takes {len(placeholders)} inputs; c2mf supports one image input")

    # g: the nodes the layer's output depends on.
    needed: set[fx.Node] = set()
    stack = [cut]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    g_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n in needed:
            env[n] = g_graph.node_copy(n, lambda a: env[a])
    g_graph.output(env[cut])

    # h: everything after the cut; nodes before it may only be used if they do not depend on the input.
    dependent = _input_dependent(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    h_graph = fx.Graph()
    h_env: dict[fx.Node, fx.Node] = {cut: h_graph.placeholder("activation")}

    def copy_pre(n: fx.Node) -> fx.Node:
        if n in h_env:
            return h_env[n]
        if n in dependent:
            raise _SplitError(
                f"the rest of the network after {layer!r} also uses {n.name!r}, computed before it "
                "(a skip connection over the layer), so its output alone does not determine the logits"
            )
        h_env[n] = h_graph.node_copy(n, copy_pre)
        return h_env[n]

    output = None
    for n in graph.nodes:
        if order[n] <= order[cut]:
            continue
        if n.op == "output":
            output = n
            break
        h_env[n] = h_graph.node_copy(n, copy_pre)
    if output is None:
        raise _SplitError("the traced graph has no output")
    h_graph.output(fx.node.map_arg(output.args[0], copy_pre))
    g_graph.lint()
    h_graph.lint()
    return fx.GraphModule(gm, g_graph), fx.GraphModule(gm, h_graph)


@dataclass
class Split:
    """`g` and `h` of `f = h o g` at `layer`, and how the layer's output maps to a store's rows."""

    layer: str
    g: nn.Module
    h: nn.Module
    layout: Layout
    grid: tuple[int, int]
    num_prefix_tokens: int
    channels: int
    model_shape: tuple[int, ...]  # one image's layer output in the model's layout
    nhwc: bool = False  # a spatial map the model itself keeps as (n, h, w, c) (timm's Swin, MambaOut)

    @property
    def store_shape(self) -> tuple[int, ...]:
        """One image's activation in the store: (h, w, c), (T, c) or (c,)."""
        if self.layout == "nchw":
            return (self.grid[0], self.grid[1], self.channels)
        return tuple(self.model_shape)

    def to_store(self, a: torch.Tensor) -> torch.Tensor:
        return a.permute(0, 2, 3, 1) if self.layout == "nchw" and not self.nhwc else a

    def from_store(self, a: torch.Tensor) -> torch.Tensor:
        return a.permute(0, 3, 1, 2) if self.layout == "nchw" and not self.nhwc else a

    def pool(self, a: torch.Tensor) -> torch.Tensor:
        """Mean over the positions of a model-layout output: (n, c). ViT: over the patch tokens only."""
        if self.layout == "nchw":
            return a.mean(dim=(1, 2) if self.nhwc else (2, 3))
        if self.layout == "tokens":
            return a[:, self.num_prefix_tokens :].mean(dim=1)
        return a

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "layer": self.layer,
            "layout": self.layout,
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "channels": self.channels,
            "store_shape": list(self.store_shape),
        }
        if self.nhwc:  # only then, so the fingerprints of stores of NCHW models stay what they were
            d["model_format"] = "NHWC"
        return d


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def unknown_layer_error(model: nn.Module, layer: str) -> C2MFError:
    names = _module_names(model)
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return C2MFError(f"unknown layer {layer!r}.{hint} List the layers with `c2mf layers MODEL`")


def _token_grid(model: nn.Module, tokens: int, prefix: int) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == tokens - prefix:
        return int(grid[0]), int(grid[1])
    side = int(round(math.sqrt(tokens - prefix)))
    if side * side == tokens - prefix:
        return side, side
    return 1, tokens - prefix


def _is_nhwc(model: nn.Module, layer: str, shape: tuple[int, int, int]) -> bool:
    """Whether a 4-D layer output of one image, `shape`, is (h, w, c) rather than (c, h, w).

    timm's Swin, MambaOut and similar models keep their maps channels-last; reading them as (c, h, w) would
    silently scramble every activation. The channel count that timm's `feature_info` gives for the layer decides;
    otherwise the model's `output_fmt` ("NHWC", timm's convention, which a user model may declare too).
    """
    for info in getattr(model, "feature_info", None) or []:
        if isinstance(info, dict) and info.get("module") == layer and isinstance(info.get("num_chs"), int):
            chs = info["num_chs"]
            if shape[2] == chs and shape[0] != chs:
                return True
            if shape[0] == chs and shape[2] != chs:
                return False
    fmt = getattr(model, "output_fmt", None)
    return str(getattr(fmt, "value", fmt) or "NCHW").upper() == "NHWC"


def split_model(
    model: nn.Module,
    layer: str,
    input_size: tuple[int, int, int] | None = None,
    *,
    verify: bool = True,
    atol: float = 1e-4,
) -> Split:
    """Split `model` (in eval mode) at `layer` so that `split.h(split.g(x)) == model(x)`.

    With `verify`, runs one small random batch through both paths and refuses a split that is not exact.
    """
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise unknown_layer_error(model, layer)
    gm = _trace(model, layer)
    try:
        g, h = _build_split(gm, layer)
    except _SplitError as e:
        raise C2MFError(f"cannot split the model at {layer!r}: {e}. See `c2mf layers` for layers that split") from None
    g.eval()
    h.eval()
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[assignment]
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = g(x)
        if not isinstance(a, torch.Tensor):
            raise C2MFError(f"layer {layer!r} outputs a {type(a).__name__}, not a tensor: pick another layer")
        if verify:
            ref, out = model(x), h(a)
            if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
                raise C2MFError(f"splitting at {layer!r} does not reproduce the model's output shape")
            err = float((out - ref).abs().max())
            scale = float(ref.abs().max()) + 1e-12
            if not math.isfinite(err) or err > atol * max(1.0, scale):
                raise C2MFError(
                    f"splitting at {layer!r} is not exact (max difference {err:.3g}): the forward probably "
                    "depends on more than this layer's output; pick another layer"
                )
    nhwc = False
    if a.ndim == 4:
        layout: Layout = "nchw"
        nhwc = _is_nhwc(model, layer, tuple(int(s) for s in a.shape[1:]))
        if nhwc:
            grid, channels, prefix = (int(a.shape[1]), int(a.shape[2])), int(a.shape[3]), 0
        else:
            grid, channels, prefix = (int(a.shape[2]), int(a.shape[3])), int(a.shape[1]), 0
    elif a.ndim == 3:
        layout = "tokens"
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        grid, channels = _token_grid(model, int(a.shape[1]), prefix), int(a.shape[2])
    elif a.ndim == 2:
        layout, grid, channels, prefix = "vector", (1, 1), int(a.shape[1]), 0
    else:
        raise C2MFError(f"layer {layer!r} outputs shape {tuple(a.shape)}: expected (n,c,h,w), (n,T,c) or (n,c)")
    return Split(layer, g, h, layout, grid, prefix, channels, tuple(int(s) for s in a.shape[1:]), nhwc)


# ----------------------------------------------------------------------------------------------------------------
# Listing layers


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...] | None  # one image's output, model layout
    useful: bool
    role: str  # "stage", "block", "final", or ""
    splits: bool | None  # whether f = h o g holds there (checked for the useful candidates only)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d


_BLOCK = re.compile(r"^(?:.*\.)?blocks\.\d+$")


def _candidate_roles(model: nn.Module, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    roles: dict[str, str] = {}
    feature_info = getattr(model, "feature_info", None) or []
    for info in feature_info:
        mod = info.get("module") if isinstance(info, dict) else None
        if mod in shapes:
            roles[mod] = "stage"
    for n in names:
        if _BLOCK.match(n) and n.count(".") == 1 and n in shapes:
            roles.setdefault(n, "block")
    if not feature_info:  # a user model: children of the root and of its top-level Sequentials / ModuleLists
        for n, m in model.named_children():
            if n in shapes and len(shapes[n]) in (2, 3):
                roles.setdefault(n, "stage")
            if isinstance(m, (nn.Sequential, nn.ModuleList)):
                for cn, _ in m.named_children():
                    full = f"{n}.{cn}"
                    if full in shapes and len(shapes[full]) in (2, 3):
                        roles.setdefault(full, "block")
    final = _final_feature_module(model, shapes, roles)
    if final is not None:
        roles[final] = "final"
    return roles


def _final_feature_module(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], roles: dict[str, str]
) -> str | None:
    """The module whose output is the final feature map (what the head pools), in order of execution.

    For timm models that is the last module whose output has the shape of `forward_features`; for others,
    the last candidate producing a spatial map larger than 1x1.
    """
    executed = list(shapes)
    target = getattr(model, "_c2mf_features_shape", None)
    if target is not None:
        hits = [n for n in executed if shapes[n] == target]
        # prefer the outermost module among those that output the final map last
        if hits:
            last = hits[-1]
            outer = [n for n in hits if last.startswith(n + ".") or n == last]
            return min(outer, key=lambda n: n.count(".")) if outer else last
    spatial = [n for n in executed if n in roles and len(shapes[n]) == 3 and shapes[n][1] * shapes[n][2] > 1]
    return spatial[-1] if spatial else None


def list_layers(model: nn.Module, input_size: tuple[int, int, int], *, check_splits: bool = True) -> list[LayerInfo]:
    """Every named module with its output shape; stage outputs, ViT blocks and the final map marked useful."""
    names = _module_names(model)
    shapes: dict[str, tuple[int, ...]] = {}  # insertion order = order of execution
    hooks = []
    for n in names:
        mod = dict(model.named_modules())[n]

        def hook(_m, _i, out, n=n):
            if isinstance(out, torch.Tensor) and n not in shapes:
                shapes[n] = tuple(int(s) for s in out.shape[1:])

        hooks.append(mod.register_forward_hook(hook))
    features_shape = None
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_size)
            model(x)
            for hk in hooks:
                hk.remove()
            hooks = []
            if callable(getattr(model, "forward_features", None)):
                feats = model.forward_features(x)
                if isinstance(feats, torch.Tensor):
                    features_shape = tuple(int(s) for s in feats.shape[1:])
    finally:
        for hk in hooks:
            hk.remove()
    model._c2mf_features_shape = features_shape  # type: ignore[attr-defined]
    try:
        roles = _candidate_roles(model, names, shapes)
    finally:
        del model._c2mf_features_shape
    result = []
    modules = dict(model.named_modules())
    for n in names:
        role = roles.get(n, "")
        splits = None
        if role and check_splits:
            try:
                split_model(model, n, input_size, verify=True)
                splits = True
            except C2MFError:
                splits = False
        result.append(
            LayerInfo(n, type(modules[n]).__name__, shapes.get(n), bool(role) and splits is not False, role, splits)
        )
    return result
