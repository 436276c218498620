"""Concept importance on the code map: Grad-CAM and Integrated Gradients (docs/metrics.md, "Grad-CAM" and "Integrated Gradients").

Notation: U (n, P, k) are the non-negative (or, for PCA, signed) codes of n images at P positions on k
concepts; `head(U) -> logits (n, n_outputs)` is the rest of the network applied to the reconstruction
`U @ W` (built by the caller); c is the target class of each image (default: the model's prediction).

Both scores are per concept and per image, shape (n, k): the spatial positions are aggregated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..errors import C2MFError
from ._common import Batch, Head, Settings, call_head, check_codes, chunk_size

IGRule = Literal["gausslegendre", "trapezoid"]


def _target_logit_grad(
    head: Head, X: torch.Tensor, targets: torch.Tensor, side: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits of X (m,) and their gradient with respect to X (rows are independent, so one backward).

    `side`, when given, is already one row per row of X."""
    X = X.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = head(X) if side is None else head(X, side)
        sel = logits.gather(1, targets[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(sel.sum(), X)
    return sel.detach(), grad


def gradcam(
    U: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    *,
    side: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Grad-CAM importance of each concept, shape (n, k).

    weight_j = mean_p d logit_c / d U[p, j] and importance_j = weight_j * mean_p U[p, j]: the first-order
    effect on the class logit of the concept's average activation, as Grad-CAM does with channels.
    `side`: optional per-image input the head also needs (see `_common.Head`).
    """
    U, targets = check_codes(U, targets)
    out = []
    step = chunk_size(1, batch_size)
    for s in range(0, U.shape[0], step):
        u = U[s : s + step]
        sd = None if side is None else side[s : s + step]
        _, grad = _target_logit_grad(head, u, targets[s : s + step], sd)
        out.append(grad.mean(dim=1) * u.detach().mean(dim=1))
    return torch.cat(out) if out else U.new_zeros((0, U.shape[2]))


@dataclass(frozen=True)
class IGResult:
    """Integrated Gradients of each concept and the check of their completeness.

    attributions: (n, k), IG summed over positions. logit: logit_c(U), (n,). baseline_logit: logit_c(0), (n,).
    completeness_error: sum_j IG_j - (logit_c(U) - logit_c(0)), (n,): zero up to the quadrature error.
    """

    attributions: torch.Tensor
    logit: torch.Tensor
    baseline_logit: torch.Tensor
    completeness_error: torch.Tensor

    def relative_completeness_error(self) -> torch.Tensor:
        """|completeness error| / max(|logit_c(U) - logit_c(0)|, 1e-6), per image."""
        gap = (self.logit - self.baseline_logit).abs().clamp_min(1e-6)
        return self.completeness_error.abs() / gap


def _quadrature(steps: int, rule: IGRule) -> tuple[np.ndarray, np.ndarray]:
    """Points in [0, 1] and weights summing to 1 for the path integral."""
    if rule == "trapezoid":
        alphas = np.linspace(0.0, 1.0, steps + 1)
        weights = np.full(steps + 1, 1.0 / steps)
        weights[[0, -1]] *= 0.5
        return alphas, weights
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1.0) / 2.0, w / 2.0
    raise C2MFError(f"unknown integration rule {rule!r}: use gausslegendre or trapezoid")


def integrated_gradients(
    U: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    *,
    steps: int = 32,
    rule: IGRule = "gausslegendre",
    side: torch.Tensor | None = None,
    batch_size: int = 1024,
) -> IGResult:
    """Integrated Gradients from U = 0 to U, batched over the steps of the path.

    The baseline "no concept present" is U = 0, the natural zero of the codes. `rule` picks the quadrature
    (Gauss-Legendre, as captum does by default, converges faster on smooth heads; the trapezoid rule includes
    both ends). `batch_size` bounds the rows (image x step) fed to the head at once. `side`: optional per-image
    input the head also needs (see `_common.Head`).
    """
    if steps < 2:
        raise C2MFError(f"Integrated Gradients needs at least 2 steps, got {steps}: use 32 or more")
    U, targets = check_codes(U, targets)
    alphas_np, weights_np = _quadrature(steps, rule)
    n_pts = alphas_np.shape[0]
    alphas = torch.as_tensor(alphas_np, dtype=U.dtype, device=U.device)
    weights = torch.as_tensor(weights_np, dtype=U.dtype, device=U.device)
    attributions, logits, base_logits = [], [], []
    step = chunk_size(n_pts, batch_size)
    for s in range(0, U.shape[0], step):
        u = U[s : s + step].detach()
        t = targets[s : s + step]
        m = u.shape[0]
        path = alphas[None, :, None, None] * u[:, None]  # (m, S, P, k)
        sd = None if side is None else side[s : s + step]
        rows = torch.arange(m, device=U.device).repeat_interleave(n_pts)
        _, grad = _target_logit_grad(
            head, path.reshape(m * n_pts, *u.shape[1:]), t[rows], None if sd is None else sd[rows]
        )
        avg_grad = (grad.reshape(m, n_pts, *u.shape[1:]) * weights[None, :, None, None]).sum(dim=1)
        attributions.append((u * avg_grad).sum(dim=1))
        with torch.no_grad():
            ends = call_head(head, torch.cat([u, torch.zeros_like(u)]), sd, torch.arange(m, device=U.device).repeat(2))
            sel = ends.gather(1, torch.cat([t, t])[:, None]).squeeze(1)
        logits.append(sel[:m])
        base_logits.append(sel[m:])
    if not attributions:
        empty = U.new_zeros((0,))
        return IGResult(U.new_zeros((0, U.shape[2])), empty, empty, empty)
    attr = torch.cat(attributions)
    logit, base = torch.cat(logits), torch.cat(base_logits)
    return IGResult(attr, logit, base, attr.sum(dim=1) - (logit - base))


def ranking(importance: torch.Tensor) -> torch.Tensor:
    """Concepts in decreasing order of importance, per image: (n, k) int64 (stable for ties)."""
    return torch.argsort(importance, dim=1, descending=True, stable=True)


class ImportanceMetric:
    """Evaluate's concept importance (Grad-CAM and IG, target: the model's prediction) and IG's completeness.

    Runs on test batches marked `attribute`; hands its per-image importances to later metrics as
    `batch.shared["importance"]` ({ranking name: (n, k)}).
    """

    def __init__(self, W: torch.Tensor, meta: dict[str, Any], settings: Settings) -> None:
        self._settings = settings
        self._mean: dict[str, list[torch.Tensor]] = {"gradcam": [], "ig": []}
        self._err: list[torch.Tensor] = []
        self._rel: list[torch.Tensor] = []
        self._gap: list[torch.Tensor] = []

    def update(self, batch: Batch) -> None:
        if batch.split != "test" or not batch.attribute:
            return
        s = self._settings
        targets = batch.model_logits.argmax(1)
        gc = gradcam(batch.U, batch.head, targets, side=batch.side, batch_size=s.batch_size)
        ig = integrated_gradients(batch.U, batch.head, targets, steps=s.ig_steps, rule=s.ig_rule,  # type: ignore[arg-type]
                                  side=batch.side, batch_size=s.batch_size)
        self._err.append(ig.completeness_error.abs().cpu())
        self._rel.append(ig.relative_completeness_error().cpu())
        self._gap.append((ig.logit - ig.baseline_logit).abs().cpu())
        batch.shared["importance"] = {"gradcam": gc, "ig": ig.attributions}
        for name, imp in batch.shared["importance"].items():
            self._mean[name].append(imp.detach().cpu())

    def result(self, classes: Sequence[str]) -> dict[str, Any]:
        if not self._err:
            return {}
        err, rel, gap = torch.cat(self._err), torch.cat(self._rel), torch.cat(self._gap)
        return {"importance": {
            "target": "model prediction",
            "gradcam_mean": torch.cat(self._mean["gradcam"]).mean(0).tolist(),
            "ig_mean": torch.cat(self._mean["ig"]).mean(0).tolist(),
            "ig_completeness": {
                "mean_abs_error": float(err.mean()),
                "max_abs_error": float(err.max()),
                "mean_relative_error": float(rel.mean()),
                "max_relative_error": float(rel.max()),
                "mean_abs_logit_gap": float(gap.mean()),
            },
        }}
