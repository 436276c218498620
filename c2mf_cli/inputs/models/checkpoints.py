"""Reading checkpoints safely (safetensors, or torch.load with weights_only=True) and hashing weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import C2MFError


@dataclass
class LoadReport:
    """What a checkpoint load did: tensors loaded, and keys that were dropped or filled in."""

    loaded: int = 0
    ignored_unexpected: list[str] = field(default_factory=list)
    filled_buffers: list[str] = field(default_factory=list)
    stripped_prefix: str | None = None
    nested_key: str | None = None



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


def file_sha256(path: Path) -> str:
    """sha256 of a weights file's bytes."""
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

