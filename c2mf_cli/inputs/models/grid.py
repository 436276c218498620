"""The token grid of a transformer layer: which tokens are patches, and on how many rows and columns.

A layer that outputs tokens (n, T, c) holds `p` prefix tokens (CLS, distillation, registers) then the patch
tokens of a gh x gw grid, row by row. Reading the grid wrong stores the CLS token inside the map and turns every
heatmap into stripes, so it is never guessed silently: it is declared by the model (timm's `num_prefix_tokens`
and `patch_embed.grid_size`), read from the patch embedding's output, or inferred from the token count and the
input size; otherwise the split stops and says what to declare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...errors import C2MFError

MAX_PREFIX_TOKENS = 8  # CLS + a distillation token + registers; more would make the token count ambiguous
GridSource = str  # "declared", "patch embedding" or "token count"


@dataclass(frozen=True)
class TokenGrid:
    grid: tuple[int, int]
    num_prefix_tokens: int
    source: GridSource
    note: str  # one sentence for the user: what was found and from what


def _declared_prefix(model: nn.Module) -> int | None:
    p = getattr(model, "num_prefix_tokens", None)
    return int(p) if isinstance(p, int) and not isinstance(p, bool) and p >= 0 else None


def _declared_grid(model: nn.Module) -> tuple[int, int] | None:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    try:
        gh, gw = (int(v) for v in grid)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return (gh, gw) if gh > 0 and gw > 0 else None


def _patch_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The patch embedding: `patch_embed`'s first convolution, or the first convolution with stride = kernel > 1."""
    pe = getattr(model, "patch_embed", None)
    scope = pe.named_modules(prefix="patch_embed") if isinstance(pe, nn.Module) else model.named_modules()
    for name, m in scope:
        if isinstance(m, nn.Conv2d) and (pe is not None or (m.stride == m.kernel_size and max(m.stride) > 1)):
            return name, m
    return None


def patch_grid(model: nn.Module, x: torch.Tensor) -> tuple[str, tuple[int, int], tuple[int, int]] | None:
    """(name, (gh, gw), stride) of the patch embedding's output map on input `x`, or None if there is none."""
    found = _patch_module(model)
    if found is None:
        return None
    name, conv = found
    shapes: list[tuple[int, ...]] = []
    handle = conv.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    if not shapes or len(shapes[0]) != 4:
        return None
    return name, (int(shapes[0][2]), int(shapes[0][3])), (int(conv.stride[0]), int(conv.stride[1]))


def _square_patch_grid(n: int, height: int, width: int) -> tuple[int, int] | None:
    """The gh x gw grid of square patches that tiles a height x width input with n patches, if there is one."""
    if n < 1:
        return None
    side = math.isqrt(height * width // n) if height * width % n == 0 else 0
    if side < 1 or side * side * n != height * width or height % side or width % side:
        return None
    return height // side, width // side


def token_grid(
    model: nn.Module,
    layer: str,
    tokens: int,
    input_size: tuple[int, int, int],
    patch: Callable[[], tuple[str, tuple[int, int], tuple[int, int]] | None],
) -> TokenGrid:
    """The prefix tokens and patch grid of `tokens` tokens at `layer`; C2MFError when they cannot be told.

    `patch` gives the patch embedding's grid (`patch_grid`); it runs the model, so only when the model declares
    no grid that fits.
    """
    height, width = int(input_size[1]), int(input_size[2])
    prefix = _declared_prefix(model)
    grid = _declared_grid(model)
    if grid is not None and (prefix is None or prefix + grid[0] * grid[1] == tokens):
        p = tokens - grid[0] * grid[1]
        if 0 <= p <= max(MAX_PREFIX_TOKENS, prefix or 0):
            return TokenGrid(grid, p, "declared", f"token grid: {grid[0]} x {grid[1]} patches after {p} prefix "
                             "token(s), as the model declares (patch_embed.grid_size)")
    found = patch()
    if found is not None:
        name, (gh, gw), stride = found
        p = tokens - gh * gw
        if 0 <= p <= MAX_PREFIX_TOKENS and (prefix is None or prefix == p):
            return TokenGrid((gh, gw), p, "patch embedding",
                             f"token grid inferred: {gh} x {gw} patches (the output of {name!r}, stride "
                             f"{stride[0]}x{stride[1]} on the {height}x{width} input) after {p} prefix token(s)")
    candidates = []
    for p in [prefix] if prefix is not None else range(0, min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        g = _square_patch_grid(tokens - p, height, width)
        if g is not None:
            candidates.append((p, g))
    if len(candidates) == 1:
        p, (gh, gw) = candidates[0]
        return TokenGrid((gh, gw), p, "token count",
                         f"token grid inferred: {gh} x {gw} patches of {height // gh} px after {p} prefix token(s), "
                         f"the only square-patch grid of {tokens} tokens on the {height}x{width} input")
    found = ("fit no grid of square patches" if not candidates else
             "fit several grids (" + ", ".join(f"{p} prefix + {g[0]}x{g[1]}" for p, g in candidates) + ")")
    raise C2MFError(
        f"cannot tell the token grid of layer {layer!r}: its {tokens} tokens on a {height}x{width} input {found}. "
        "Declare it on the model: `num_prefix_tokens` (tokens before the patches, e.g. 1 for a CLS token) and "
        "`patch_embed.grid_size` (rows, columns of patches)"
    )
