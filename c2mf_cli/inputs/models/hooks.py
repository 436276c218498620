"""The split of last resort, by forward hooks: exact by construction, for any forward, but slower.

g runs the model on the image and captures the layer's output (then stops the forward by raising). h runs the
model on a placeholder image (zeros) with the layer's output replaced by the given activations, so every module
before the layer runs again for nothing: about one extra forward of the prefix per call of h. That h does not
depend on the placeholder (no skip connection over the layer) is what `split_model`'s verification checks, on
random images that differ from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Captured(BaseException):
    """Stops the forward once the layer's output is captured (BaseException: user code's `except Exception`
    blocks must not swallow it)."""


def count_calls(model: nn.Module, layer: str, x: torch.Tensor) -> int:
    """How many times `layer` runs in one forward of `model` on `x`."""
    calls = [0]

    def hook(_m: nn.Module, _i: Any, _o: Any) -> None:
        calls[0] += 1

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return calls[0]


class HookPrefix(nn.Module):
    """g: the image -> the layer's output, read by a forward hook."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor) -> Any:
        captured: list[Any] = []

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            captured.append(out)
            raise _Captured

        handle = self.model.get_submodule(self.layer).register_forward_hook(hook)
        try:
            self.model(x)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} did not run in the model's forward")
        return captured[0]


class HookTail(nn.Module):
    """h: the layer's output -> the logits, by running the model with that output put in place of the layer's."""

    def __init__(self, model: nn.Module, layer: str, input_size: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.layer, self.input_size = model, layer, tuple(input_size)

    def forward(self, a: torch.Tensor) -> Any:
        param = next(self.model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        placeholder = torch.zeros(a.shape[0], *self.input_size, device=a.device, dtype=dtype)
        handle = self.model.get_submodule(self.layer).register_forward_hook(lambda _m, _i, _o: a)
        try:
            return self.model(placeholder)
        finally:
            handle.remove()
