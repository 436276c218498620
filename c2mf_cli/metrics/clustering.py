"""The multi-class clustering ablation (docs/metrics.md, "Clustering ablation").

CRAFT learns k concepts per class. To compare it with one dictionary shared by all classes, pool every class's
concepts, cluster them into K groups with k-means, and keep, for each cluster, the concept nearest its centroid:
a shared dictionary of K real CRAFT concepts. Its per-class reconstruction accuracy is then set against C2MF
with K shared concepts and PCA with K components, as K grows.

Concepts are clustered by direction (rows scaled to unit norm) because NMF rows carry an arbitrary scale that
the codes absorb; the kept rows are the original, unscaled ones. k-means is seeded (k-means++ start, several
restarts, Lloyd iterations, empty clusters re-seeded at the farthest point), in torch, float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import C2MFError
from ..methods.solvers.kmeans import kmeans_pp


@dataclass(frozen=True)
class KMeansResult:
    centroids: torch.Tensor  # (K, c)
    labels: torch.Tensor  # (n,) int64
    inertia: float  # sum of squared distances to the assigned centroid


def _sq_dist(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return ((X * X).sum(1, keepdim=True) - 2 * X @ C.T + (C * C).sum(1)[None]).clamp_min(0)


def kmeans(
    X: torch.Tensor, K: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100, tol: float = 1e-6
) -> KMeansResult:
    """Seeded k-means of the rows of X (n, c) into K clusters; the best of `n_init` restarts."""
    X = torch.as_tensor(X).float()
    if X.ndim != 2:
        raise C2MFError(f"k-means needs a 2-D (points, features) array, got shape {tuple(X.shape)}")
    n = X.shape[0]
    if not 1 <= K <= n:
        raise C2MFError(f"cannot make {K} clusters of {n} points: choose K between 1 and {n}")
    gen = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        C = kmeans_pp(X, K, gen)
        for _ in range(max_iter):
            D = _sq_dist(X, C)
            labels = D.argmin(1)
            counts = torch.bincount(labels, minlength=K)
            newC = torch.zeros_like(C).index_add_(0, labels, X) / counts.clamp_min(1)[:, None].to(X.dtype)
            empty = torch.nonzero(counts == 0).flatten().tolist()
            if empty:
                own = D.gather(1, labels[:, None]).squeeze(1)
                for j in empty:
                    far = int(own.argmax())
                    newC[j] = X[far]
                    own[far] = -1.0
            shift = float(((newC - C) ** 2).sum())
            C = newC
            if not empty and shift <= tol * max(float((C * C).sum()), 1e-20):
                break
        D = _sq_dist(X, C)
        labels = D.argmin(1)
        inertia = float(D.gather(1, labels[:, None]).sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(C, labels, inertia)
    if best is None:
        raise C2MFError("k-means ran no restart: use n_init >= 1")
    return best


@dataclass(frozen=True)
class ClusteredDictionary:
    """A shared dictionary made of the pooled concepts nearest the K centroids.

    W: (K, c) the kept rows (original scale). source: for each kept row, (dictionary index, row index).
    labels: (n_pooled,) the cluster of each pooled concept. inertia: k-means objective on unit rows.
    """

    W: torch.Tensor
    source: list[tuple[int, int]]
    labels: torch.Tensor
    inertia: float


def cluster_concepts(
    dictionaries: Sequence[torch.Tensor | np.ndarray],
    K: int,
    *,
    seed: int = 0,
    n_init: int = 4,
    normalize: bool = True,
) -> ClusteredDictionary:
    """Pool the rows of per-class dictionaries, k-means them into K, keep the concept nearest each centroid.

    The kept concept of a cluster is chosen among that cluster's members, so the K rows are distinct.
    """
    mats = [torch.as_tensor(np.asarray(d) if isinstance(d, np.ndarray) else d).float() for d in dictionaries]
    if not mats:
        raise C2MFError("no dictionaries to cluster")
    widths = {m.shape[1] for m in mats}
    if len(widths) != 1:
        raise C2MFError(f"dictionaries to cluster must share one width, got {sorted(widths)}")
    pooled = torch.cat(mats)
    origin = [(d, r) for d, m in enumerate(mats) for r in range(m.shape[0])]
    X = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else pooled
    km = kmeans(X, K, seed=seed, n_init=n_init)
    D = _sq_dist(X, km.centroids)
    keep = []
    for j in range(K):
        members = torch.nonzero(km.labels == j).flatten()
        keep.append(int(members[D[members, j].argmin()]))
    return ClusteredDictionary(pooled[keep].clone(), [origin[i] for i in keep], km.labels, km.inertia)
