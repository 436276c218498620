"""Concept similarity between dictionary rows (the paper's "sparsity"; docs/metrics.md, "Similarity").

Notation: W (k, c) is a dictionary, one concept per row. For every pair of concepts i < j we take
|Pearson r| (cosine of the rows after removing each row's mean over channels) and |cosine|. Lower means more
distinct concepts. PCA's rows are orthonormal, so its |cosine| is 0 by construction (its |Pearson| is not,
unless the rows are also centred).

A row with zero norm (or, for Pearson, zero variance) has an undefined correlation; we count it as 0 and
say how many pairs that touched (`n_degenerate`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ._common import Batch, Settings, State, as_numpy

_EPS = 1e-12


def _abs_cosine_pairs(W: np.ndarray) -> tuple[np.ndarray, int]:
    norms = np.linalg.norm(W, axis=1)
    ok = norms > _EPS
    Wn = np.where(ok[:, None], W / np.where(ok, norms, 1.0)[:, None], 0.0)
    iu = np.triu_indices(W.shape[0], k=1)
    degenerate = int((~(ok[iu[0]] & ok[iu[1]])).sum())
    return np.abs((Wn @ Wn.T)[iu]), degenerate


def pairwise_similarity(W: np.ndarray | torch.Tensor) -> dict[str, np.ndarray | int]:
    """|Pearson r| and |cosine| of every pair of rows of W (k, c): arrays of length k(k-1)/2."""
    W = as_numpy(W, np.float64)
    pearson, deg_p = _abs_cosine_pairs(W - W.mean(axis=1, keepdims=True))
    cosine, deg_c = _abs_cosine_pairs(W)
    return {"pearson": pearson, "cosine": cosine, "n_degenerate": max(deg_p, deg_c)}


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std())


def concept_similarity(dictionaries: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]) -> dict:
    """Mean and std over concept pairs of |Pearson r| and |cosine|.

    Give one dictionary (k, c), or a list of them (one per class for per-class methods such as CRAFT): pairs are
    taken within each dictionary and pooled. Returns pearson_mean, pearson_std, cosine_mean, cosine_std,
    n_pairs, n_degenerate (NaN means when there is no pair).
    """
    if isinstance(dictionaries, (np.ndarray, torch.Tensor)) and np.ndim(dictionaries) == 2:
        dictionaries = [dictionaries]
    pearson, cosine, degenerate = [], [], 0
    for W in dictionaries:
        s = pairwise_similarity(W)
        pearson.append(s["pearson"])
        cosine.append(s["cosine"])
        degenerate += int(s["n_degenerate"])
    p = np.concatenate(pearson) if pearson else np.zeros(0)
    c = np.concatenate(cosine) if cosine else np.zeros(0)
    pm, ps = _mean_std(p)
    cm, cs = _mean_std(c)
    return {
        "pearson_mean": pm,
        "pearson_std": ps,
        "cosine_mean": cm,
        "cosine_std": cs,
        "n_pairs": int(p.size),
        "n_degenerate": degenerate,
    }


class SimilarityMetric:
    """Evaluate's similarity entry: needs the dictionary only.

    A dictionary encoded by projection (PCA) has orthonormal rows, so its |cosine| is 0 by construction; the
    entry says so (`cosine_by_construction`) and tables do not count it as a win.
    """

    def __init__(self, W: torch.Tensor, meta: dict[str, Any], settings: Settings) -> None:
        self._W = W.detach().cpu()
        self._orthonormal = meta.get("codes") == "projection"

    def update(self, batch: Batch) -> None:
        return None

    def state(self, n_classes: int) -> State:
        """Nothing: the entry comes from the dictionary, which every process holds."""
        return State()

    def result(self, classes: Sequence[str], state: State | None = None) -> dict[str, Any]:
        s = concept_similarity(list(self._W) if self._W.ndim == 3 else self._W)
        s["cosine_by_construction"] = self._orthonormal
        return {"similarity": s}
