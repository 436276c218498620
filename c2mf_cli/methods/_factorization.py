"""Shared by nmf, craft and semi-nmf: the NNLS-based factorization through the streaming engine.

Notation: A (n, c) rows, W (k, c) dictionary, U (n, k) >= 0 codes. NMF (W >= 0): W by HALS sweeps on the pass
statistics (S = sum U^T U, R = sum U^T A). Semi-NMF (signed W): W by exact least squares on the statistics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..dictionary import ConceptDictionary
from ..errors import UsageError
from ..progress import ProgressFn
from ..sources import RowSource
from ._alternating import EngineSettings, Stats, State, fit_groups, global_min, history_of, kmeans_pp
from .base import Method, check_batch, check_source, source_summary

SHIFT_HINT = ("Pass --shift to fit on A - min(A) (the shift the C2MF paper analyses), or use --method c2mf or "
              "semi-nmf, which take signed activations.")


def check_common(cfg: Any) -> None:
    """Validate the settings every alternating method shares."""
    if cfg.iterations < 1:
        raise UsageError(f"--iterations must be at least 1, got {cfg.iterations}")
    if cfg.tol < 0:
        raise UsageError(f"--tol must be >= 0, got {cfg.tol}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be at least 1, got {cfg.checkpoint_every}")
    if cfg.subsample_rows < 0:
        raise UsageError(f"subsample_rows must be >= 0, got {cfg.subsample_rows}")
    if cfg.code_solver not in ("hals", "fista"):
        raise UsageError(f"code_solver must be hals or fista, got {cfg.code_solver!r}")


def update_nmf(state: State, stats: Stats, w: torch.Tensor, sweeps: int) -> None:
    """HALS on W >= 0 from the pooled statistics (exact minimisation per row, others fixed)."""
    W = state["W"]
    S = (w[:, None, None] * stats.S).sum(0)
    R = (w[:, None, None] * stats.R).sum(0)
    for _ in range(sweeps):
        for j in range(W.shape[0]):
            if float(S[j, j]) > 0:
                W[j] = (W[j] + (R[j] - S[j] @ W) / S[j, j]).clamp_min_(0.0)


def update_semi(state: State, stats: Stats, w: torch.Tensor) -> None:
    """Signed W: the least-squares solution (S + jitter) W = R given the codes."""
    S = (w[:, None, None] * stats.S).sum(0)
    R = (w[:, None, None] * stats.R).sum(0)
    k = S.shape[0]
    jitter = 1e-7 * (torch.trace(S) / k).clamp_min(1e-30)
    state["W"] = torch.linalg.solve(S + jitter * torch.eye(k, device=S.device), R)


def fit_factorization(method: Method, source: RowSource, config: Any, *, signed: bool, shared: bool,
                      shift_opt: bool, dict_sweeps: int, device: torch.device, progress: ProgressFn,
                      checkpoint_path: Path | None, resume: bool) -> ConceptDictionary:
    """NMF (signed=False) or semi-NMF (signed=True), per class or shared, through the streaming engine."""
    check_source(method, source, config.concepts)
    t0 = time.perf_counter()
    m = len(source.classes)
    groups = [list(range(m))] if shared else [[y] for y in range(m)]
    shift = 0.0
    if shift_opt:
        lo = global_min(source, list(range(m)), config.batch_size, device)
        shift = max(0.0, -lo)
    st = EngineSettings(
        k=config.concepts, iterations=config.iterations, tol=config.tol, batch_size=config.batch_size,
        seed=config.seed, code_iters=config.code_iters, code_solver=config.code_solver, ridge=0.0, alpha=0.0,
        weighting="pooled", nonnegative=not signed and not shift_opt, nonneg_hint=SHIFT_HINT,
        checkpoint_every=config.checkpoint_every, config={"method": method.name, **config.to_dict()},
        subsample_rows=config.subsample_rows,
    )

    def init(sample: torch.Tensor, gi: int) -> State:
        if not signed and not shift_opt and float(sample.min()) < 0:
            check_batch(sample, source.classes[groups[gi][0]], nonnegative=True, hint=SHIFT_HINT)
        return {"W": kmeans_pp(sample, config.concepts, config.seed + gi)}

    def update(state: State, stats: Stats, w: torch.Tensor, alpha: float) -> None:
        if signed:
            update_semi(state, stats, w)
        else:
            update_nmf(state, stats, w, dict_sweeps)

    results = fit_groups(source, groups, st, init=init, update=update, device=device, progress=progress,
                         label=method.name, shift=shift, checkpoint_path=checkpoint_path, resume=resume)
    Ws = [r.state["W"] for r in results]
    # rows to unit norm: the codes absorb the scale (no ridge), so U W is unchanged and concepts compare fairly
    Ws = [W / W.norm(dim=1, keepdim=True).clamp_min(1e-12) for W in Ws]
    tensors: dict[str, torch.Tensor] = {"W": Ws[0] if shared else torch.stack(Ws)}
    if shift_opt:
        tensors["shift"] = torch.tensor(shift, dtype=torch.float32)
    meta = {
        "method": method.name,
        "config": config.to_dict(),
        "ridge": 0.0,
        "codes": "nnls",
        "shared": shared,
        "shift": shift if shift_opt else None,
        "classes": list(source.classes),
        "source": source_summary(source),
        "history": history_of(results, source),
        "fit_seconds": time.perf_counter() - t0,
        "device": str(device),
    }
    return ConceptDictionary(tensors, meta)


