"""Models: what they are (`spec`), loading (`load`), checkpoints (`checkpoints`), the split f = h o g (`split`),
listing layers (`layers`), and reopening a recorded model with its weights checked (`recorded.reopen`).

The plain dataclasses of `spec` are imported at once; the rest, which imports torch and torch.fx, only when one
of its names is first used, so that `from c2mf_cli.inputs.models import ModelSpec` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .spec import IMAGENET_MEAN, IMAGENET_STD, Layout, ModelSpec, Preprocess, preprocess_from_model

_LAZY = {
    "LoadReport": "checkpoints", "load_checkpoint": "checkpoints", "file_sha256": "checkpoints",
    "state_dict_sha256": "checkpoints",
    "LoadedModel": "load", "load_model": "load",
    "Split": "split", "split_model": "split", "unknown_layer_error": "split",
    "LayerInfo": "layers", "list_layers": "layers",
    "CannotSplit": "recorded", "Reopened": "recorded", "WeightsMismatch": "recorded", "reopen": "recorded",
    "recorded_spec": "recorded", "reopen_recorded": "recorded",
}

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Layout", "ModelSpec", "Preprocess", "preprocess_from_model", *_LAZY]

if TYPE_CHECKING:
    from .checkpoints import LoadReport, file_sha256, load_checkpoint, state_dict_sha256
    from .layers import LayerInfo, list_layers
    from .load import LoadedModel, load_model
    from .recorded import CannotSplit, Reopened, WeightsMismatch, recorded_spec, reopen, reopen_recorded
    from .split import Split, split_model, unknown_layer_error


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
