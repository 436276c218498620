"""Split a model exactly at a layer: f = h o g.

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
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...errors import C2MFError
from .spec import Layout


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


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def unknown_layer_error(model: nn.Module, layer: str) -> C2MFError:
    names = module_names(model)
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

