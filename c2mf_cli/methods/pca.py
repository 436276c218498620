"""PCA, per class or global, from a streaming covariance (one pass, memory O(c^2) whatever the rows).

Dictionary: the top-k eigenvectors of the covariance (orthonormal rows); codes are signed projections
U = (A - mean) W^T; decode U W + mean. The sign of each component is fixed (largest-magnitude entry positive)
so that fits are reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts.dictionary import ConceptDictionary
from ..distributed import all_reduce_sum, share, world_size
from ..errors import UsageError
from ..progress import ProgressFn, no_progress
from ..artifacts.sources import RowSource
from ._alternating import _batches
from .solvers.lowrank import top_eigenvectors
from .base import Method, check_batch, check_source, option, register_method, source_summary, to_device


@dataclass(frozen=True)
class PCAConfig:
    """Settings of a PCA fit.

    Attributes:
        concepts: number of components k.
        batch_size: rows per streamed batch; None loads each class whole.
        shared: one global PCA on the rows of every class instead of one per class.
    """

    concepts: int
    batch_size: int | None = option(32768, help="Rows per streamed batch (--full-batch: each class whole).", metavar="N")
    shared: bool = option(False, flag="--shared/--per-class", help="One dictionary for all classes, or one per class.")

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pca(source: RowSource, classes: list[int], k: int, batch_size: int | None,
         device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    c = source.n_features
    total = torch.zeros(c, dtype=torch.float64, device=device)
    xtx = torch.zeros((c, c), dtype=torch.float64, device=device)
    shift: torch.Tensor | None = None  # first batch's mean: moments of (x - shift) avoid E[xx^T] - mu mu^T cancelling
    n = 0
    mine = share(source)
    for y in classes:
        for b in _batches(mine, y, batch_size):
            a = to_device(b, device)
            check_batch(a, source.classes[y])
            if shift is None:
                shift = a.double().mean(0).float() if a.shape[0] else torch.zeros(c, device=device)
            for s in range(0, a.shape[0], 4096):  # float32 products per block, float64 accumulation
                block = a[s : s + 4096] - shift
                total += block.sum(0).double()
                xtx += (block.T @ block).double()
            n += a.shape[0]
    if shift is None:
        shift = torch.zeros(c, device=device)
    total, xtx, n, shift = _pooled(total, xtx, n, shift.double())
    centred_mean = total / n  # mean of (x - shift)
    cov = (xtx - n * torch.outer(centred_mean, centred_mean)) / (n - 1)
    mean = centred_mean + shift
    W, top = top_eigenvectors(cov, k)
    sign = torch.sign(W.gather(1, W.abs().argmax(1, keepdim=True)))
    W = W * sign
    var_total = float(torch.diagonal(cov).clamp_min(0).sum())  # the trace: all the variance
    kept = float(top.clamp_min(0).sum())
    a2 = float(torch.trace(xtx) + 2 * (total @ shift) + n * (shift @ shift))
    residual = max(0.0, var_total - kept) * (n - 1)
    rec = {"explained_variance_ratio": kept / var_total if var_total > 0 else 1.0,
           "relative_error": math.sqrt(residual / a2) if a2 > 0 else 0.0}
    return W.float(), mean.float(), rec


def _pooled(total: torch.Tensor, xtx: torch.Tensor, n: int,
            shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """The moments of every process's rows, about one shift common to all (the row-weighted mean of each
    process's own shift): each process moves its sums to it exactly, then they are all-reduced."""
    if world_size() == 1:
        return total, xtx, n, shift
    counts = torch.tensor([float(n)], dtype=torch.float64, device=shift.device)
    common = shift * n
    all_reduce_sum(counts, common)
    common = common / counts.clamp_min(1)
    d = shift - common  # sum (x - common) = total + n d; sum (x - common)(x - common)^T likewise expands
    total, xtx = total + n * d, xtx + torch.outer(total, d) + torch.outer(d, total) + n * torch.outer(d, d)
    all_reduce_sum(total, xtx)
    return total, xtx, int(counts), common


@register_method
class PCA(Method):
    name = "pca"
    description = "baseline: PCA per class or global (orthonormal W, signed codes), streaming covariance"
    needs = "full"
    signed_dictionary = True
    requires_nonnegative_input = False
    config_class = PCAConfig
    tensor_shapes = {"W": ("k c", "m k c"), "mean": ("c", "m c")}
    signed_codes = True

    def needs_class(self, d: ConceptDictionary) -> bool:
        return d.tensors["W"].ndim == 3 or d.tensors["mean"].ndim == 2

    def _mean(self, d: ConceptDictionary, y: int | None) -> torch.Tensor:
        mean = d.tensors["mean"]
        return mean[y] if mean.ndim == 2 else mean

    def encode(self, d: ConceptDictionary, A: torch.Tensor, y: int | None, *, iters: int) -> torch.Tensor:
        """Signed projections (A - mean) W^T (orthonormal rows: the least-squares codes)."""
        return (A - self._mean(d, y)) @ self.basis(d, y).T

    def decode(self, d: ConceptDictionary, U: torch.Tensor, y: int | None) -> torch.Tensor:
        return torch.addmm(self._mean(d, y), U, self.basis(d, y))  # one pass over the (n, c) output, not two

    def fit(self, source: RowSource, config: PCAConfig, *, device: torch.device,
            progress: ProgressFn = no_progress, checkpoint_path: Path | None = None,
            resume: bool = False) -> ConceptDictionary:
        check_source(self, source, config.concepts)
        t0 = time.perf_counter()
        m = len(source.classes)
        groups = [list(range(m))] if config.shared else [[y] for y in range(m)]
        advance = progress("pca", len(groups))
        Ws, means, history = [], [], []
        for classes in groups:
            W, mean, rec = _pca(source, classes, config.concepts, config.batch_size, device)
            Ws.append(W)
            means.append(mean)
            history.append({"classes": [source.classes[y] for y in classes], "passes": 1, "converged": True,
                            "loss": [rec]})
            advance(1)
        if config.shared:
            tensors = {"W": Ws[0], "mean": means[0]}
        else:
            tensors = {"W": torch.stack(Ws), "mean": torch.stack(means)}
        meta = {
            "method": self.name,
            "config": config.to_dict(),
            "shared": config.shared,
            "classes": list(source.classes),
            "source": source_summary(source),
            "history": history,
            "fit_seconds": time.perf_counter() - t0,
            "device": str(device),
        }
        return ConceptDictionary(tensors, meta)
