"""Small helpers shared by the metric families (batching a head over rows, array conversion)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import C2MFError

Head = Callable[..., torch.Tensor]
"""`head(U) -> logits`: codes (m, P, k) to logits (m, n_outputs), differentiable in U.

The caller builds it as `h(from_store(U @ W))`; it must treat rows independently (eval mode). When a metric is
given a per-image `side` input (for a ViT, the stored CLS/prefix tokens that h also needs), the head is called
as `head(U, side_rows)` with side_rows[i] belonging to the image of U[i]."""


def call_head(head: Head, X: torch.Tensor, side: torch.Tensor | None, image_index: torch.Tensor) -> torch.Tensor:
    """head(X), or head(X, side[image_index]) when a per-image side input is given."""
    if side is None:
        return head(X)
    return head(X, side[image_index])


def as_numpy(x: np.ndarray | torch.Tensor | list | tuple, dtype: type | None = None) -> np.ndarray:
    """A numpy view of an array-like (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)


def check_codes(U: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate codes (n, P, k) and targets (n,), returning targets as int64 on U's device."""
    if not isinstance(U, torch.Tensor) or U.ndim != 3:
        shape = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
        raise C2MFError(f"codes must be a tensor of shape (images, positions, concepts), got {shape}")
    targets = torch.as_tensor(targets, device=U.device).long().reshape(-1)
    if targets.shape[0] != U.shape[0]:
        raise C2MFError(f"{targets.shape[0]} target classes for {U.shape[0]} images: give one class per image")
    return U, targets


def chunk_size(rows_per_item: int, batch_size: int) -> int:
    """How many items fit in one head call of at most `batch_size` rows (at least one)."""
    return max(1, batch_size // max(1, rows_per_item))


def trapezoid_auc(y: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced points of the unit interval (trapezoid rule)."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] < 2:
        return math.nan
    return float(np.trapezoid(y, dx=1.0 / (y.shape[0] - 1)))
