"""Concept recovery on planted ground truth (docs/metrics.md, "Planted recovery"; used by the demo).

Three questions about a dictionary learned on data built from known concepts ("planted primitives"):
1. Does it find the planted directions? Match learned rows to planted rows one to one (Hungarian algorithm on
   cosine, `scipy.optimize.linear_sum_assignment`) and report the matched cosines.
2. Does each concept light up where its primitive is? Threshold each concept heatmap and take its IoU with the
   part mask of each primitive; report, per primitive, the best-matching concept and its IoU.
3. Do the per-class gates (C2MF) select the primitives each class was built from?

Heatmap threshold: by default a pixel is "on" when it reaches 50 % of the heatmap's own maximum
(`relative`, level 0.5), the convention of CAM localisation. It is scale-free (codes have arbitrary scale), uses
no ground truth (thresholding at the mask's own area would leak it), and gives an empty map, hence IoU 0, for a
concept that is silent on the image. `top_fraction` (the q most active fraction of pixels) is offered for
comparison with work that uses it.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch

from ..errors import C2MFError
from ._common import as_numpy

Threshold = Literal["relative", "top_fraction"]


def cosine_matrix(W_learned: np.ndarray | torch.Tensor, W_planted: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine between every learned row (k1, c) and every planted row (k2, c): (k1, k2)."""
    a, b = as_numpy(W_learned, np.float64), as_numpy(W_planted, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise C2MFError(f"dictionaries of shapes {a.shape} and {b.shape} cannot be compared: need (k, c) with one c")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def matched_cosine(
    W_learned: np.ndarray | torch.Tensor, W_planted: np.ndarray | torch.Tensor, *, absolute: bool = False
) -> dict:
    """Hungarian matching of learned to planted concepts maximising total cosine.

    With `absolute`, |cosine| is matched (for signed codes, e.g. PCA, whose sign is arbitrary). Returns mean,
    min, per_planted (cosine of each planted row's match, NaN if unmatched when k_learned < k_planted) and
    assignment: planted index -> learned index (-1 if unmatched).
    """
    C = cosine_matrix(W_learned, W_planted)
    score = np.abs(C) if absolute else C
    from scipy.optimize import linear_sum_assignment  # scipy's import is slow: only where it is used

    rows, cols = linear_sum_assignment(-score)
    per = np.full(C.shape[1], math.nan)
    assign = np.full(C.shape[1], -1, dtype=np.int64)
    per[cols] = score[rows, cols]
    assign[cols] = rows
    matched = score[rows, cols]
    return {
        "mean": float(matched.mean()) if matched.size else math.nan,
        "min": float(matched.min()) if matched.size else math.nan,
        "per_planted": per.tolist(),
        "assignment": assign.tolist(),
    }


def binarize(heatmap: np.ndarray | torch.Tensor, method: Threshold = "relative", level: float = 0.5) -> np.ndarray:
    """Boolean map of the "on" pixels of heatmap(s) (..., H, W), thresholded per map over its last two axes.

    relative: pixels >= level * max (an all-zero or negative map is empty). top_fraction: the ceil(level * H * W)
    highest pixels (ties at the threshold are included).
    """
    h = as_numpy(heatmap, np.float64)
    if h.ndim < 2:
        raise C2MFError(f"a heatmap needs two spatial axes, got shape {h.shape}")
    flat = h.reshape(*h.shape[:-2], -1)
    if method == "relative":
        if not 0 < level <= 1:
            raise C2MFError(f"relative threshold level must be in (0, 1], got {level}")
        mx = flat.max(axis=-1, keepdims=True)
        on = (flat >= level * mx) & (mx > 0)
    elif method == "top_fraction":
        if not 0 < level <= 1:
            raise C2MFError(f"top fraction must be in (0, 1], got {level}")
        n_on = max(1, math.ceil(level * flat.shape[-1]))
        thr = np.sort(flat, axis=-1)[..., -n_on][..., None]
        on = flat >= thr
    else:
        raise C2MFError(f"unknown threshold method {method!r}: use relative or top_fraction")
    return on.reshape(h.shape)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boolean maps over the last two axes (NaN where both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    inter = (a & b).sum(axis=(-2, -1))
    union = (a | b).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def heatmap_mask_iou(
    heatmaps: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    *,
    method: Threshold = "relative",
    level: float = 0.5,
) -> dict:
    """IoU between concept heatmaps (n, k, H, W) and primitive masks (n, m, H, W), with the best concept per primitive.

    Heatmaps must already be at the mask resolution. For each (concept, primitive) the IoU is averaged over the
    images where the primitive is present (non-empty mask). Returns iou (k, m) as nested lists, best_concept (m,),
    best_iou (m,), mean_best_iou, and the threshold used.
    """
    hm, mk = as_numpy(heatmaps), as_numpy(masks).astype(bool)
    if hm.ndim != 4 or mk.ndim != 4 or hm.shape[0] != mk.shape[0] or hm.shape[2:] != mk.shape[2:]:
        raise C2MFError(f"heatmaps {hm.shape} and masks {mk.shape} must be (n, k, H, W) and (n, m, H, W) alike")
    on = binarize(hm, method, level)
    ious = iou(on[:, :, None], mk[:, None, :])  # (n, k, m)
    present = mk.any(axis=(-2, -1))  # (n, m)
    ious = np.where(present[:, None, :], np.nan_to_num(ious, nan=0.0), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: primitive absent everywhere
        mean_iou = np.nanmean(ious, axis=0)  # (k, m)
    filled = np.nan_to_num(mean_iou, nan=-1.0)
    best = filled.argmax(axis=0)
    best_iou = np.where(present.any(axis=0), filled[best, np.arange(mk.shape[1])], np.nan)
    return {
        "iou": mean_iou.tolist(),
        "best_concept": best.tolist(),
        "best_iou": best_iou.tolist(),
        "mean_best_iou": float(np.nanmean(best_iou)) if np.isfinite(best_iou).any() else math.nan,
        "threshold": {"method": method, "level": level},
    }


def gate_selection_accuracy(
    gates: np.ndarray | torch.Tensor,
    planted_sets: np.ndarray | torch.Tensor,
    assignment: list[int] | np.ndarray,
    *,
    threshold: float = 0.5,
) -> dict:
    """How well per-class gates (n_classes, k_learned) in [0, 1] select each class's planted primitives.

    planted_sets (n_classes, m) booleans: which primitives built each class. assignment (m,): the learned
    concept matched to each planted primitive (from `matched_cosine`, -1 if none). A primitive counts as selected
    when its matched concept's gate exceeds `threshold`. Returns accuracy over (class, primitive) entries,
    exact (fraction of classes whose selected set equals the planted set), precision, recall, and
    extra_selected: the mean number per class of open gates on concepts matched to no primitive.
    """
    g, P = as_numpy(gates, np.float64), as_numpy(planted_sets).astype(bool)
    assign = np.asarray(assignment, dtype=np.int64)
    if g.ndim != 2 or P.ndim != 2 or g.shape[0] != P.shape[0] or assign.shape[0] != P.shape[1]:
        raise C2MFError(f"gates {g.shape}, planted sets {P.shape} and assignment {assign.shape} do not fit together")
    open_ = g > threshold
    selected = np.where(assign[None, :] >= 0, open_[:, np.clip(assign, 0, None)], False)
    unmatched = np.setdiff1d(np.arange(g.shape[1]), assign[assign >= 0])
    tp = float((selected & P).sum())
    return {
        "accuracy": float((selected == P).mean()),
        "exact": float((selected == P).all(axis=1).mean()),
        "precision": tp / selected.sum() if selected.sum() else math.nan,
        "recall": tp / P.sum() if P.sum() else math.nan,
        "extra_selected": float(open_[:, unmatched].sum(axis=1).mean()) if unmatched.size else 0.0,
        "threshold": threshold,
    }
