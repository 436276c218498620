"""The OOD view of crops (docs/metrics.md, "OOD view of crops"): are crops out of distribution for the model?

Scores are max-softmax confidences; whole images are the in-distribution (positive) set, crops resized to the
input size are the out-of-distribution set. A high AUROC says the model tells crops from whole images by its
confidence alone, i.e. crops are not the distribution the concepts are later applied to.

Definitions (numpy only; they agree with scikit-learn's, which the tests check):
- AUROC: the area under the ROC curve with in as positive, equal to P(s_in > s_out) + P(s_in = s_out) / 2.
- FPR@95%TPR: the false-positive rate at the first ROC point whose TPR reaches 0.95, i.e. the fraction of
  crops scoring at least the threshold that keeps 95 % of whole images.
- AUPR-In: average precision (step-wise, no interpolation) with in as positive and score s.
- AUPR-Out: average precision with out as positive and score -s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import C2MFError
from ._common import as_numpy


def max_softmax(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Max-softmax confidence of each row of logits (n, n_outputs), float64 (n,)."""
    z = as_numpy(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p.max(axis=1) / p.sum(axis=1)).astype(np.float64)


def _roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, from the highest score down."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    tps, fps = _roc_points(y, s)
    if tps[-1] == 0 or fps[-1] == 0:
        return math.nan
    tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Sum over thresholds of (R_n - R_{n-1}) P_n, the step-wise area under precision-recall."""
    tps, fps = _roc_points(y, s)
    if tps[-1] == 0:
        return math.nan
    precision = tps / (tps + fps)
    recall = np.r_[0.0, tps / tps[-1]]
    return float(np.sum(np.diff(recall) * precision))


def fpr_at_tpr(y: np.ndarray, s: np.ndarray, tpr_level: float = 0.95) -> float:
    tps, fps = _roc_points(y, s)
    if tps[-1] == 0 or fps[-1] == 0:
        return math.nan
    tpr, fpr = tps / tps[-1], fps / fps[-1]
    i = int(np.searchsorted(tpr, tpr_level - 1e-12, side="left"))
    return float(fpr[min(i, fpr.size - 1)])


def ood_scores(conf_in: np.ndarray | torch.Tensor, conf_out: np.ndarray | torch.Tensor) -> dict:
    """AUROC, FPR@95%TPR, AUPR-In and AUPR-Out of in-distribution (whole-image) vs OOD (crop) confidences."""
    s_in, s_out = as_numpy(conf_in, np.float64).reshape(-1), as_numpy(conf_out, np.float64).reshape(-1)
    if s_in.size == 0 or s_out.size == 0:
        raise C2MFError("the OOD scores need confidences of both whole images and crops: give a crop store")
    s = np.r_[s_in, s_out]
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    return {
        "auroc": auroc(y, s),
        "fpr_at_95_tpr": fpr_at_tpr(y, s, 0.95),
        "aupr_in": average_precision(y, s),
        "aupr_out": average_precision(1.0 - y, -s),
        "n_in": int(s_in.size),
        "n_out": int(s_out.size),
    }


def confidence_histograms(
    conf_in: np.ndarray | torch.Tensor, conf_out: np.ndarray | torch.Tensor, *, bins: int = 20
) -> dict:
    """Histograms of the two confidences on [0, 1] (as fractions of each set) and their mean gap (in - out)."""
    s_in, s_out = as_numpy(conf_in, np.float64).reshape(-1), as_numpy(conf_out, np.float64).reshape(-1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    h_in = np.histogram(np.clip(s_in, 0, 1), bins=edges)[0] / max(s_in.size, 1)
    h_out = np.histogram(np.clip(s_out, 0, 1), bins=edges)[0] / max(s_out.size, 1)
    mean_in = float(s_in.mean()) if s_in.size else math.nan
    mean_out = float(s_out.mean()) if s_out.size else math.nan
    return {
        "edges": edges.tolist(),
        "in_fraction": h_in.tolist(),
        "out_fraction": h_out.tolist(),
        "mean_in": mean_in,
        "mean_out": mean_out,
        "mean_gap": mean_in - mean_out,
    }
