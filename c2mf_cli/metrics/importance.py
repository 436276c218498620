"""Concept importance on the code map: Grad-CAM, Integrated Gradients and total Sobol indices (docs/metrics.md,
"Grad-CAM", "Integrated Gradients" and "Sobol").

Notation: U (n, P, k) are the non-negative (or, for PCA, signed) codes of n images at P positions on k
concepts; `head(U) -> logits (n, n_outputs)` is the rest of the network applied to the reconstruction
`U @ W` (built by the caller); c is the target class of each image (default: the model's prediction).

Both scores are per concept and per image, shape (n, k): the spatial positions are aggregated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..errors import C2MFError
from ._common import Batch, Head, Settings, State, batch_ends, call_head, check_codes, chunk_size, head_ends

IGRule = Literal["gausslegendre", "trapezoid"]
RANKINGS = ("gradcam", "ig", "sobol")  # every importance evaluate can rank concepts by, in table order
RANKING_LABELS = {"gradcam": "Grad-CAM", "ig": "IG", "sobol": "Sobol"}
DEFAULT_RANKINGS = ("gradcam", "ig")  # Sobol costs designs x (k + 2) head calls per image: asked for by name


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
    ends: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> IGResult:
    """Integrated Gradients from U = 0 to U, batched over the steps of the path.

    The baseline "no concept present" is U = 0, the natural zero of the codes. `rule` picks the quadrature
    (Gauss-Legendre, as captum does by default, converges faster on smooth heads; the trapezoid rule includes
    both ends). `batch_size` bounds the rows (image x step) fed to the head at once. `side`: optional per-image
    input the head also needs (see `_common.Head`). `ends`: the logits head(U) and head(0) (`_common.head_ends`)
    when the caller has them, for the completeness check.
    """
    if steps < 2:
        raise C2MFError(f"Integrated Gradients needs at least 2 steps, got {steps}: use 32 or more")
    U, targets = check_codes(U, targets)
    alphas_np, weights_np = _quadrature(steps, rule)
    n_pts = alphas_np.shape[0]
    alphas = torch.as_tensor(alphas_np, dtype=U.dtype, device=U.device)
    weights = torch.as_tensor(weights_np, dtype=U.dtype, device=U.device)
    attributions = []
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
    if not attributions:
        empty = U.new_zeros((0,))
        return IGResult(U.new_zeros((0, U.shape[2])), empty, empty, empty)
    attr = torch.cat(attributions)
    full, none = head_ends(U, head, side, batch_size) if ends is None else ends
    logit, base = (e.gather(1, targets[:, None]).squeeze(1).to(attr.dtype) for e in (full, none))
    return IGResult(attr, logit, base, attr.sum(dim=1) - (logit - base))


def sobol_masks(k: int, designs: int) -> torch.Tensor:
    """CRAFT's design for total Sobol indices of k concepts: (designs * (k + 2), k) masks in [0, 1).

    An unscrambled Halton sequence in 2k dimensions gives the sampling matrices A and B (designs x k each);
    C_i is A with column i taken from B. Rows are A, then B, then C_1 ... C_k (the order the estimator reads).
    """
    from scipy.stats import qmc

    if designs < 2:
        raise C2MFError(f"Sobol indices need at least 2 designs, got {designs}: use 32 (CRAFT's default) or more")
    ab = qmc.Halton(2 * k, scramble=False).random(designs).astype(np.float32)
    a, b = ab[:, :k], ab[:, k:]
    c = np.repeat(a[None], k, axis=0)
    for i in range(k):
        c[i, :, i] = b[:, i]
    return torch.from_numpy(np.concatenate([a, b, c.reshape(-1, k)]))


def jansen_total(outputs: torch.Tensor, designs: int, k: int) -> torch.Tensor:
    """Jansen's estimator of the total Sobol indices from the outputs (m, designs * (k + 2)) on `sobol_masks`.

    ST_i = sum_d (f(A)_d - f(C_i)_d)^2 / (2 designs Var f(A)), Var the unbiased sample variance over A; an output
    that does not vary (Var = 0: no concept changes it) gives 0 for every concept, not a division by zero.
    """
    a = outputs[:, :designs]
    c = outputs[:, 2 * designs:].reshape(outputs.shape[0], k, designs)
    var = a.var(dim=1, unbiased=True)
    num = (a[:, None, :] - c).pow(2).sum(dim=2)
    st = num / (2 * designs * var.clamp_min(torch.finfo(outputs.dtype).tiny))[:, None]
    return torch.where(var[:, None] > 0, st, torch.zeros_like(st))


def sobol(
    U: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    *,
    designs: int = 32,
    side: torch.Tensor | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Total Sobol index of each concept, shape (n, k), as CRAFT estimates it.

    For each image, the codes of concept j are scaled by a mask value at every position (the
    re-parameterisation CRAFT uses for code maps), over the `sobol_masks` design; the target logit of each
    perturbed map is fed to Jansen's estimator. The index is the share of the logit's variance that concept j
    takes part in (alone or with others): unsigned, so it says how much, not in which direction.
    `designs` * (k + 2) head calls per image (32 designs: CRAFT's default).
    """
    U, targets = check_codes(U, targets)
    n, _, k = U.shape
    masks = sobol_masks(k, designs).to(device=U.device, dtype=U.dtype)
    per = masks.shape[0]
    out = []
    step = chunk_size(per, batch_size)
    with torch.no_grad():
        for s in range(0, n, step):
            u = U[s : s + step].detach()
            m = u.shape[0]
            X = u[:, None] * masks[None, :, None, :]  # (m, N, P, k)
            rows = torch.arange(m, device=U.device).repeat_interleave(per)
            logits = call_head(head, X.reshape(m * per, *u.shape[1:]), side[s : s + step] if side is not None
                               else None, rows)
            y = logits.gather(1, targets[s : s + step][rows][:, None]).squeeze(1).reshape(m, per)
            out.append(jansen_total(y.double(), designs, k).to(U.dtype))
    return torch.cat(out) if out else U.new_zeros((0, k))


def ranking(importance: torch.Tensor) -> torch.Tensor:
    """Concepts in decreasing order of importance, per image: (n, k) int64 (stable for ties)."""
    return torch.argsort(importance, dim=1, descending=True, stable=True)


class ImportanceMetric:
    """Evaluate's concept importance (target: the model's prediction) by every ranking the settings ask for
    (Grad-CAM, IG and its completeness, Sobol).

    Runs on test batches marked `attribute`; hands its per-image importances to later metrics as
    `batch.shared["importance"]` ({ranking name: (n, k)}).
    """

    def __init__(self, W: torch.Tensor, meta: dict[str, Any], settings: Settings) -> None:
        self._settings = settings
        self._names = tuple(getattr(settings, "rankings", DEFAULT_RANKINGS))
        self._k = int(W.shape[-2])
        self._mean: dict[str, list[torch.Tensor]] = {name: [] for name in self._names}
        self._err: list[torch.Tensor] = []
        self._rel: list[torch.Tensor] = []
        self._gap: list[torch.Tensor] = []

    def update(self, batch: Batch) -> None:
        if batch.split != "test" or not batch.attribute:
            return
        s = self._settings
        targets = batch.model_logits.argmax(1)
        found: dict[str, torch.Tensor] = {}
        if "gradcam" in self._names:
            found["gradcam"] = gradcam(batch.U, batch.head, targets, side=batch.side, batch_size=s.batch_size)
        if "ig" in self._names:
            ig = integrated_gradients(batch.U, batch.head, targets, steps=s.ig_steps, rule=s.ig_rule,  # type: ignore[arg-type]
                                      side=batch.side, batch_size=s.batch_size, ends=batch_ends(batch, s.batch_size))
            self._err.append(ig.completeness_error.abs().cpu())
            self._rel.append(ig.relative_completeness_error().cpu())
            self._gap.append((ig.logit - ig.baseline_logit).abs().cpu())
            found["ig"] = ig.attributions
        if "sobol" in self._names:
            found["sobol"] = sobol(batch.U, batch.head, targets, designs=getattr(s, "sobol_designs", 32),
                                   side=batch.side, batch_size=s.batch_size)
        batch.shared["importance"] = found
        for name, imp in found.items():
            self._mean[name].append(imp.detach().cpu())

    def state(self, n_classes: int) -> State:
        """Sums over the images attributed of each importance (k,), of IG's completeness errors and logit gaps,
        the image count, and the largest completeness errors (maxima)."""
        def total(parts: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
            return torch.cat(parts).double().sum(0) if parts else torch.zeros(shape, dtype=torch.float64)

        def largest(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts).double().max().reshape(1) if parts else torch.full((1,), -math.inf,
                                                                                     dtype=torch.float64)

        first = next(iter(self._mean.values()), [])
        sums = {"images": torch.tensor([sum(int(t.shape[0]) for t in first)], dtype=torch.int64)}
        sums.update({f"{name}.sum": total(parts, (self._k,)) for name, parts in self._mean.items()})
        ig = {"ig.abs_error": self._err, "ig.relative_error": self._rel, "ig.logit_gap": self._gap}
        sums.update({f"{key}.sum": total(parts, ()).reshape(1) for key, parts in ig.items()})
        maxima = {f"{key}.max": largest(parts) for key, parts in ig.items() if key != "ig.logit_gap"}
        return State(sums, maxima)

    def result(self, classes: Sequence[str], state: State | None = None) -> dict[str, Any]:
        st = self.state(len(classes)) if state is None else state
        n = int(st.sums["images"])
        if n == 0:
            return {}
        out: dict[str, Any] = {"target": "model prediction", "rankings": list(self._names)}
        for name in self._names:
            out[f"{name}_mean"] = (st.sums[f"{name}.sum"] / n).tolist()
        if "ig" in self._names:
            out["ig_completeness"] = {
                "mean_abs_error": float(st.sums["ig.abs_error.sum"]) / n,
                "max_abs_error": float(st.maxima["ig.abs_error.max"]),
                "mean_relative_error": float(st.sums["ig.relative_error.sum"]) / n,
                "max_relative_error": float(st.maxima["ig.relative_error.max"]),
                "mean_abs_logit_gap": float(st.sums["ig.logit_gap.sum"]) / n,
            }
        if "sobol" in self._names:
            out["sobol_designs"] = int(getattr(self._settings, "sobol_designs", 32))
        return {"importance": out}
