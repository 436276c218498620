"""Split a model exactly at a layer: f = h o g.

Notation: `f(x) = h(g(x))`. `g` maps preprocessed images (n, 3, H, W) to the layer's output in the model's own
layout; `h` maps that output to the logits. Stores keep activations channels-last: (n, h, w, c) for a CNN
feature map, (n, T, c) for ViT tokens (prefix tokens such as CLS first). Layout "nchw" names any spatial map,
including those a model keeps channels-last itself (timm's NHWC models: `Split.nhwc`, stored the same way).

Three ways to build the split, tried in order (`Split.method` and the store record which one was used):

- "fx": torch.fx traces the model with every module a leaf except the ancestors of the layer, so user code
  inside leaf modules may do anything, and only the forward of the containers on the path to the layer must be
  traceable. `g` is the part of the graph the layer's output depends on; `h` is the rest, with the layer's
  output as its only input. A graph in which anything after the layer still needs a value computed before it
  (a residual that jumps over the layer) cannot be split, and says so.
- "export": when symbolic tracing fails (`len(x)`, `if x.shape[-1] > ...`, asserts), torch.export captures the
  forward with a dynamic batch size, and its graph is cut at the layer's output the same way.
- "hooks": when neither can read the forward, forward hooks (c2mf_cli.inputs.models.hooks): exact by
  construction, slower (h reruns the model's prefix).

Whatever the way, the split is verified on random images before use: h(g(x)) must equal the model's output.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
import torch.fx as fx
from torch import nn

from ...errors import C2MFError
from .grid import patch_grid, token_grid
from .hooks import HookPrefix, HookTail, count_calls
from .spec import Layout

SplitMethod = Literal["fx", "export", "hooks"]
SPLIT_METHODS: dict[str, str] = {
    "fx": "torch.fx",
    "export": "torch.export",
    "hooks": "forward hooks (slower: h reruns the layers before the split on every call)",
}


def _timm_autowrap() -> tuple[Any, ...]:
    # only a model built with timm can call timm's functions: another model does not pay timm's import (seconds,
    # it imports torchvision and torch._dynamo)
    if "timm" not in sys.modules:
        return ()
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
    except Exception as e:  # user code fails symbolic tracing in many ways; the next way to split is tried
        parent = layer.rpartition(".")[0] or "the model"
        raise _TraceFailed(f"tracing the forward of {parent!r} failed ({_first_line(e)})") from None
    finally:
        model.train(was_training)
    _inline_optional_inputs(graph)
    return fx.GraphModule(model, graph)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
    """The graph shows the split cannot be exact (a skip connection over the layer...): no other way can help."""


class _TraceFailed(Exception):
    """This way of reading the forward failed; the next one is tried."""


def _fx_split(model: nn.Module, layer: str, x: torch.Tensor, cache: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    gm = _trace(model, layer)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if not calls:
        raise _SplitError(f"{layer!r} is never called in the model's forward")
    if len(calls) > 1:
        raise _SplitError(f"{layer!r} is called {len(calls)} times in the forward, so its output is ambiguous")
    return _cut(gm, calls[0], layer)


def _module_path(path: str) -> str:
    """A module path as torch.export may spell it (`L['self'].blocks[0]`) in named_modules' spelling."""
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("..", ".")


def _export(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    from torch.export import Dim, export

    try:
        # strict: TorchDynamo keeps `len(x)` symbolic, where the non-strict mode fixes the batch size
        ep = export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=1 << 20)},), strict=True)
    except Exception as e:  # torch.export raises many types for code it cannot capture
        raise _TraceFailed(f"torch.export failed ({_first_line(e)})") from None
    return ep.module()


def _export_split(model: nn.Module, layer: str, x: torch.Tensor, cache: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    if "export" not in cache:
        try:
            cache["export"] = _export(model, x)
        except _TraceFailed as e:
            cache["export"] = e
    if isinstance(cache["export"], _TraceFailed):
        raise cache["export"]
    gm = cache["export"]
    for n in gm.graph.nodes:
        device = n.kwargs.get("device") if n.op == "call_function" else None
        if isinstance(device, torch.device):  # a tensor created in forward, pinned to the export's device
            raise _TraceFailed(f"the exported graph creates tensors on {device.type!r} only")
    inside = {n for n in gm.graph.nodes
              if any(_module_path(str(v[0])) == layer for v in (n.meta.get("nn_module_stack") or {}).values())}
    outputs = [n for n in gm.graph.nodes
               if n in inside and not _symbolic(n) and any(u not in inside for u in n.users)]
    # what the captured graph cannot show is left to the hooks, whose verification has the last word
    if len(outputs) != 1:
        raise _TraceFailed(f"{layer!r} gives {len(outputs)} tensors to the rest of torch.export's graph, not one")
    try:
        return _cut(gm, outputs[0], layer)
    except _SplitError as e:
        raise _TraceFailed(f"torch.export's graph: {e}") from None


def _hook_split(model: nn.Module, layer: str, x: torch.Tensor, cache: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    try:
        calls = count_calls(model, layer, x)
    except Exception as e:  # the user's forward, on a random batch of the input size
        raise _SplitError(f"the model's forward fails on a random input of shape {tuple(x.shape)} "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    if calls == 0:
        raise _SplitError(f"{layer!r} is never called in the model's forward")
    if calls > 1:
        raise _SplitError(f"{layer!r} is called {calls} times in the forward, so its output is ambiguous")
    return HookPrefix(model, layer), HookTail(model, layer, tuple(x.shape[1:]))


_BUILDERS: dict[str, Callable[[nn.Module, str, torch.Tensor, dict[str, Any]], tuple[nn.Module, nn.Module]]] = {
    "fx": _fx_split, "export": _export_split, "hooks": _hook_split,
}


def _batch_size_expr(graph: fx.Graph) -> Any:
    """The symbol torch.export gave the image's batch size (None for fx graphs, which have no shapes)."""
    for n in graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.ndim and isinstance(val.shape[0], torch.SymInt):
            return val.shape[0].node.expr
    return None


def _symbolic(n: fx.Node) -> bool:
    """A node of shape arithmetic (its value is a symbolic int, float or bool), not of tensor data."""
    return isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _closure(start: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """`start` and every node reached from it by repeatedly following `step` (inputs: ancestors; users: descendants)."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _cut(gm: fx.GraphModule, cut: fx.Node, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut the graph at the node `cut` (the layer's output) into g (input -> cut) and h (cut -> output)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _SplitError(f"the model's forward takes {len(placeholders)} inputs; c2mf supports one image input")

    # g: the nodes the layer's output depends on.
    needed = _closure(cut, lambda n: n.all_input_nodes)
    g_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n in needed:
            env[n] = g_graph.node_copy(n, lambda a: env[a])
    g_graph.output(env[cut])

    # h: what the output needs after the cut; nodes before it may only be used if they do not depend on the input.
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if output is None:
        raise _SplitError("the traced graph has no output")
    downstream = _closure(cut, lambda n: n.users)
    # torch.export: shapes after the cut may be computed from the image's batch size, which h reads off the
    # activation instead (same batch); other shape arithmetic on it is recomputed in h.
    batch = _batch_size_expr(graph)

    def is_batch_size(n: fx.Node) -> bool:
        val = n.meta.get("val")
        return batch is not None and isinstance(val, torch.SymInt) and val.node.expr == batch

    h_needed: set[fx.Node] = set()
    stack = list(output.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in h_needed and n is not cut:
            h_needed.add(n)
            if not is_batch_size(n):
                stack.extend(n.all_input_nodes)
    dependent = _input_dependent(graph)
    h_graph = fx.Graph()
    activation = h_graph.placeholder("activation")
    h_env: dict[fx.Node, fx.Node] = {cut: activation}
    for n in graph.nodes:  # graph order is a topological order
        if n not in h_needed:
            continue
        if n in dependent and n not in downstream and is_batch_size(n):
            h_env[n] = h_graph.call_function(torch.ops.aten.sym_size.int, (activation, 0))
        elif n in dependent and n not in downstream and not _symbolic(n):
            raise _SplitError(
                f"the rest of the network after {layer!r} also uses {n.name!r}, computed before it "
                "(a skip connection over the layer), so its output alone does not determine the logits"
            )
        else:
            h_env[n] = h_graph.node_copy(n, lambda a: h_env[a])
    result = output.args[0]
    if isinstance(graph._codegen, fx.graph._PyTreeCodeGen) and isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]  # torch.export's graphs return flat tuples that their own code generator unpacks
    h_graph.output(fx.node.map_arg(result, lambda a: h_env[a]))
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
    method: SplitMethod = "fx"
    grid_source: str | None = None  # tokens: "declared", "patch embedding" or "token count" (grid.py)
    notes: tuple[str, ...] = field(default_factory=tuple)  # what the user should be told (inferred grid, slow split)

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
        """The split's output as a store records it (the layer itself is stored once, beside it)."""
        d: dict[str, Any] = {
            "layout": self.layout,
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "channels": self.channels,
            "store_shape": list(self.store_shape),
        }
        # each only when it says something, so the fingerprints of stores made before these keys stay what they were
        if self.nhwc:
            d["model_format"] = "NHWC"
        if self.method != "fx":
            d["split_method"] = self.method
        if self.grid_source is not None:
            d["grid_source"] = self.grid_source
        return d


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def unknown_layer_error(model: nn.Module, layer: str) -> C2MFError:
    names = module_names(model)
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return C2MFError(f"unknown layer {layer!r}.{hint} List the layers with `c2mf layers MODEL`")


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
    cache: dict[str, Any] | None = None,
) -> Split:
    """Split `model` (in eval mode) at `layer` so that `split.h(split.g(x)) == model(x)`.

    torch.fx is tried first, then torch.export, then forward hooks (see the module's docstring); `split.method`
    says which one worked and `split.notes` what the user should be told. With `verify`, a small random batch
    (and one image) goes through both paths and a split that is not exact is refused; splits by torch.export or
    hooks are always verified. `cache`, a dict shared by the splits of one model at one input size (as
    `list_layers` does), lets torch.export capture the forward once.
    """
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise unknown_layer_error(model, layer)
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[assignment]
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    failed: list[str] = []
    for method, build in _BUILDERS.items():
        try:
            g, h = build(model, layer, x, cache if cache is not None else {})
        except _TraceFailed as e:
            failed.append(f"{SPLIT_METHODS[method]}: {e}")
            continue
        except _SplitError as e:  # the model's structure forbids the split: another way cannot do better
            raise C2MFError(
                f"cannot split the model at {layer!r}: {e}. See `c2mf layers` for layers that split"
            ) from None
        g.eval()
        h.eval()
        with torch.no_grad():
            a = g(x)
        if not isinstance(a, torch.Tensor):
            raise C2MFError(f"layer {layer!r} outputs a {type(a).__name__}, not a tensor: pick another layer")
        # fx's graph proves h needs only the layer's output; the other ways are proven by this check alone
        if not (verify or method != "fx"):
            break
        problem = _inexact(model, g, h, x, atol)
        if problem is None:
            break
        if method != "export":  # a captured graph may differ numerically; the hooks are the last resort
            raise C2MFError(f"splitting at {layer!r} is not exact ({problem}): the forward probably depends on "
                            "more than this layer's output; pick another layer")
        failed.append(f"{SPLIT_METHODS[method]}: not exact ({problem})")
    notes: list[str] = []
    if method != "fx":
        notes.append(f"split at {layer!r} by {SPLIT_METHODS[method]} ({'; '.join(failed)})")
    nhwc, grid_source = False, None
    if a.ndim == 4:
        layout: Layout = "nchw"
        nhwc = _is_nhwc(model, layer, tuple(int(s) for s in a.shape[1:]))
        if nhwc:
            grid, channels, prefix = (int(a.shape[1]), int(a.shape[2])), int(a.shape[3]), 0
        else:
            grid, channels, prefix = (int(a.shape[2]), int(a.shape[3])), int(a.shape[1]), 0
    elif a.ndim == 3:
        layout = "tokens"
        tg = token_grid(model, layer, int(a.shape[1]), tuple(input_size), lambda: patch_grid(model, x[:1]))
        grid, prefix, channels, grid_source = tg.grid, tg.num_prefix_tokens, int(a.shape[2]), tg.source
        if tg.source != "declared":
            notes.append(tg.note)
    elif a.ndim == 2:
        layout, grid, channels, prefix = "vector", (1, 1), int(a.shape[1]), 0
    else:
        raise C2MFError(f"layer {layer!r} outputs shape {tuple(a.shape)}: expected (n,c,h,w), (n,T,c) or (n,c)")
    return Split(layer, g, h, layout, grid, prefix, channels, tuple(int(s) for s in a.shape[1:]), nhwc, method,
                 grid_source, tuple(notes))


def _inexact(model: nn.Module, g: nn.Module, h: nn.Module, x: torch.Tensor, atol: float) -> str | None:
    """Why h(g(x)) is not the model's output on `x` (and on one image of it), or None when it is."""
    with torch.no_grad():
        for batch in (x, x[:1]):
            ref = model(batch)
            try:
                out = h(g(batch))
            except Exception as e:  # a captured graph that does not run on another batch size, for one
                return f"it fails on a batch of {len(batch)}: {_first_line(e)}"
            if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
                return "it does not reproduce the model's output shape"
            err = float((out - ref).abs().max())
            scale = float(ref.abs().max()) + 1e-12
            if not math.isfinite(err) or err > atol * max(1.0, scale):
                return f"max difference {err:.3g}"
    return None
