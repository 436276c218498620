"""List a model's layers with their output shapes, mark the useful ones and check that they split."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ...errors import C2MFError
from .split import SPLIT_METHODS, module_names, split_model


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...] | None  # one image's output, model layout
    useful: bool
    role: str  # "stage", "block", "final", or ""
    splits: bool | None  # whether f = h o g holds there (checked for the useful candidates only)
    split_method: str | None = None  # "fx", "export" or "hooks" where it splits
    split_note: str = ""  # why it does not split, or why it was not checked

    @property
    def split_text(self) -> str:
        """The split column of `c2mf layers`: exact (and how), or no / not checked with the reason."""
        if self.splits:
            return "exact" if self.split_method == "fx" else f"exact ({SPLIT_METHODS.get(self.split_method or '', '')})"
        if self.splits is False:
            return f"no: {self.split_note}"
        return f"not checked: {self.split_note}" if self.split_note else ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d


_BLOCK = re.compile(r"^(?:.*\.)?blocks\.\d+$")


def _is_block_list(m: nn.Module) -> bool:
    """A ModuleList / Sequential of at least two composite modules of one type: transformer or residual blocks."""
    kids = list(m.children()) if isinstance(m, (nn.Sequential, nn.ModuleList)) else []
    return len(kids) >= 2 and len({type(k) for k in kids}) == 1 and any(True for _ in kids[0].children())


def _candidate_roles(
    model: nn.Module, names: list[str], shapes: dict[str, tuple[int, ...]], features_shape: tuple[int, ...] | None
) -> dict[str, str]:
    roles: dict[str, str] = {}
    feature_info = getattr(model, "feature_info", None) or []
    for info in feature_info:
        mod = info.get("module") if isinstance(info, dict) else None
        if mod in shapes:
            roles[mod] = "stage"
    for n in names:
        if _BLOCK.match(n) and n.count(".") == 1 and n in shapes:
            roles.setdefault(n, "block")
    if not feature_info:
        # a user model: children of the root and of its top-level Sequentials / ModuleLists, and the blocks of
        # any list of blocks at any depth (`transformer.layers.N`, `encoder.layers.N` of nn.TransformerEncoder)
        for n, m in model.named_children():
            if n in shapes and len(shapes[n]) in (2, 3):
                roles.setdefault(n, "stage")
            if isinstance(m, (nn.Sequential, nn.ModuleList)):
                for cn, _ in m.named_children():
                    full = f"{n}.{cn}"
                    if full in shapes and len(shapes[full]) in (2, 3):
                        roles.setdefault(full, "block")
        for n, m in model.named_modules():
            if n and _is_block_list(m):
                for cn, _ in m.named_children():
                    full = f"{n}.{cn}"
                    if full in shapes and len(shapes[full]) in (2, 3):
                        roles.setdefault(full, "block")
    final = _final_feature_module(shapes, roles, features_shape)
    if final is not None:
        roles[final] = "final"
    return roles


def _final_feature_module(
    shapes: dict[str, tuple[int, ...]], roles: dict[str, str], target: tuple[int, ...] | None
) -> str | None:
    """The module whose output is the final feature map (what the head pools), in order of execution.

    For timm models that is the last module whose output has the shape of `forward_features`; for others,
    the last candidate producing a spatial map larger than 1x1.
    """
    executed = list(shapes)
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
    names = module_names(model)
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
    roles = _candidate_roles(model, names, shapes, features_shape)
    result = []
    modules = dict(model.named_modules())
    cache: dict[str, Any] = {}  # torch.export, when needed, captures the forward once for every layer
    for n in names:
        role = roles.get(n, "")
        splits, method, note = None, None, ""
        if role and check_splits:
            try:
                method = split_model(model, n, input_size, verify=True, cache=cache).method
                splits = True
            except C2MFError as e:
                splits, note = False, _reason(str(e), n)
        elif role:
            note = "not asked (check_splits=False)"
        result.append(LayerInfo(n, type(modules[n]).__name__, shapes.get(n), bool(role) and splits is not False,
                                role, splits, method, note))
    return result


def _reason(message: str, layer: str) -> str:
    """The why of a split error, without the words every such error repeats."""
    for prefix in (f"cannot split the model at {layer!r}: ", f"splitting at {layer!r} is "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return message.split(". See `c2mf layers`")[0].rstrip(".")
