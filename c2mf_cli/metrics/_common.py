"""Small helpers shared by the metrics (batching a head over rows, array conversion) and the metric contract."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..errors import C2MFError

Head = Callable[..., torch.Tensor]
"""`head(U) -> logits`: codes (m, P, k) to logits (m, n_outputs), differentiable in U.

The caller builds it as `h(from_store(U @ W))`; it must treat rows independently (eval mode). When a metric is
given a per-image `side` input, the head is called as `head(U, side_rows)` with side_rows[i] belonging to the
image of U[i]; metrics only index it. Evaluate's side input is each image's position in its batch, from which
the head takes the image's dictionary class index and, for a ViT, its stored CLS/prefix tokens."""


def call_head(head: Head, X: torch.Tensor, side: torch.Tensor | None, image_index: torch.Tensor) -> torch.Tensor:
    """head(X), or head(X, side[image_index]) when a per-image side input is given."""
    if side is None:
        return head(X)
    return head(X, side[image_index])


def head_ends(U: torch.Tensor, head: Head, side: torch.Tensor | None, batch_size: int,
              full: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, n_outputs) with every concept, head(U), and with none, head(0): the two ends that IG's path and
    every ranking's insertion and deletion curves share. `full`: head(U) when the caller has it already. Without
    a side input head(0) is one row for all images."""
    n = U.shape[0]
    index = torch.arange(n, device=U.device)
    step = chunk_size(1, batch_size)
    with torch.no_grad():
        if full is None:
            full = torch.cat([call_head(head, U[s : s + step].detach(), side, index[s : s + step])
                              for s in range(0, n, step)])
        if side is None:
            none = head(U.new_zeros((1, *U.shape[1:]))).expand(n, -1)
        else:
            none = torch.cat([call_head(head, U.new_zeros((min(step, n - s), *U.shape[1:])), side,
                                        index[s : s + step]) for s in range(0, n, step)])
    return full.detach(), none


def batch_ends(batch: "Batch", batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_ends` of a batch (head(U) is the reconstruction's logits it carries), computed once and kept in
    `batch.shared` for the metrics after."""
    if "ends" not in batch.shared:
        batch.shared["ends"] = head_ends(batch.U, batch.head, batch.side, batch_size, full=batch.recon_logits)
    return batch.shared["ends"]


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


@dataclass
class Batch:
    """What one dictionary made of a block of images under one encoding, handed to every metric of
    `EVALUATE_METRICS`.

    Evaluate reads a store piece by piece (a contiguous range of one class's images: a whole class on one
    process, part of one when processes share it) and merges consecutive pieces into blocks of at least
    `stages.evaluate.block_images(device)` images (one piece per block on a CPU), of one class or several; each
    block gives one batch per encoding.
    Within it every image is encoded with its own dictionary class index, and `head` decodes each row with its
    image's index before one call of h on all rows (its side input, when not None, is each image's position in
    the batch: see `Head`). Shapes: group (n,) int64 the store class of each image; rows (n, P, c) the activations
    explained; U (n, P, k) their codes; A_hat (n * P, c) the reconstruction; model_logits (n, n_outputs) the
    model's logits on the original activations; labels (n,) true output indices; recon_logits (n, n_outputs) =
    head(U) (test batches only). `attribute` says whether the costly importance metrics run on this batch;
    `shared` lets a metric hand what it computed (e.g. importance rankings) to the metrics after it in the list.
    """

    split: str  # "train" or "test"
    group: torch.Tensor  # (n,) int64: the store class of each image
    rows: torch.Tensor
    U: torch.Tensor
    A_hat: torch.Tensor
    head: Head
    side: torch.Tensor | None
    model_logits: torch.Tensor
    labels: torch.Tensor
    recon_logits: torch.Tensor | None = None
    attribute: bool = False
    shared: dict[str, Any] = field(default_factory=dict)


class Settings(Protocol):
    """The evaluate settings metrics read (stages.evaluate.EvaluateConfig satisfies it)."""

    ig_steps: int
    ig_rule: str
    batch_size: int
    rankings: tuple[str, ...]  # importances computed and ranked by (metrics.importance.RANKINGS)
    sobol_designs: int


@dataclass
class State:
    """What a metric accumulated, as tensors that merge across processes (float64 sums, int64 counts).

    `sums` merge by element-wise addition, `maxima` by element-wise maximum (-inf where nothing was seen). The
    state of two disjoint sets of images is the merge of their states, also when they split one class: processes
    that each see a share of the images and all-reduce their states hold the state of all of them
    (stages/evaluate.py does it, with every process's states in the same order and shapes). So `update` adds
    what each image gives: nothing computed once per class from all of its images (a per-class normalisation,
    draw or maximum taken before the merge) may enter a state.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    maxima: dict[str, torch.Tensor] = field(default_factory=dict)

    def merge(self, other: "State") -> "State":
        """The state of both image sets (what an all-reduce of the two gives)."""
        if set(self.sums) != set(other.sums) or set(self.maxima) != set(other.maxima):
            raise C2MFError("cannot merge the states of two different metrics")
        return State({k: v + other.sums[k] for k, v in self.sums.items()},
                     {k: torch.maximum(v, other.maxima[k]) for k, v in self.maxima.items()})


class Metric(Protocol):
    """One metric of evaluate: built per dictionary, fed every batch, asked once for its JSON entries.

    `state(n_classes)` is everything `result` reads, as a `State` whose keys and shapes depend only on the
    metric's construction and `n_classes` (never on the images seen), so that processes that saw different images
    can all-reduce theirs. `result(classes, state)` returns the entries merged into the method's row of
    evaluation.json (e.g. {"reconstruction": {...}}) for `state` (default: this metric's own); `classes` names the
    store classes so per-class values can be keyed by name. One process and many give the same entries: both
    go through the state.
    """

    def __init__(self, W: torch.Tensor, meta: dict[str, Any], settings: Settings) -> None: ...
    def update(self, batch: Batch) -> None: ...
    def state(self, n_classes: int) -> State: ...
    def result(self, classes: Sequence[str], state: State | None = None) -> dict[str, Any]: ...
