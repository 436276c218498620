"""Device selection shared by every command: `auto` picks cuda, then mps, then cpu."""

from __future__ import annotations

import torch

from .errors import C2MFError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a user's `--device` value into a torch.device, failing clearly if it is not available here."""
    if isinstance(name, torch.device):
        return name
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise C2MFError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise C2MFError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise C2MFError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise C2MFError(f"device {name!r} asked for, but MPS is not available here: use --device cpu or auto")
    if device.type not in {"cpu", "cuda", "mps"}:
        raise C2MFError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device
