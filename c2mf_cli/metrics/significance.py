"""Paired significance of two methods on the same test images: the exact McNemar test (issue 14).

Notation: a, b (n,) say per image whether method A and method B got it right (against the labels, or against the
model's own prediction for agreement). Only the discordant images carry information: n_ab images A gets right and
B wrong, n_ba the reverse. Under "A and B are equally good" each discordant image falls on either side with
probability 1/2, so the two-sided exact p-value is the binomial one, min(1, 2 P[X <= min(n_ab, n_ba)]) with
X ~ Binomial(n_ab + n_ba, 1/2) (scipy.stats.binomtest gives the same). No discordant image: p = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import C2MFError
from ._common import as_numpy

ALPHA = 0.05
"""Significance level under which a difference is marked (and may be bolded) in evaluate's tables."""


def _binom_two_sided(k: int, n: int) -> float:
    """2 P[X <= k], X ~ Binomial(n, 1/2), capped at 1 (k <= n / 2), summed in log space so large n is exact."""
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def mcnemar_exact(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> dict:
    """Exact McNemar test of two paired correctness vectors (booleans, one per image, same images in order).

    Returns n (images), a_only (A right, B wrong), b_only (B right, A wrong), p (two-sided), and `better`: "a",
    "b" or None (p >= ALPHA, or a tie), the side that is significantly better.
    """
    a, b = as_numpy(a).astype(bool).reshape(-1), as_numpy(b).astype(bool).reshape(-1)
    if a.shape != b.shape:
        raise C2MFError(f"paired test needs the same images: {a.shape[0]} results against {b.shape[0]}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    p = _binom_two_sided(min(a_only, b_only), a_only + b_only)
    better = None if p >= ALPHA or a_only == b_only else ("a" if a_only > b_only else "b")
    return {"n": int(a.shape[0]), "a_only": a_only, "b_only": b_only, "p": p, "better": better}


def pairwise_mcnemar(correct: dict[str, np.ndarray]) -> list[dict]:
    """mcnemar_exact for every pair of named correctness vectors, in the order given (A before B)."""
    names = list(correct)
    out = []
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            out.append({"a": x, "b": y, **mcnemar_exact(correct[x], correct[y])})
    return out
