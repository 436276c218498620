"""Shared by nmf, craft and semi-nmf: the NNLS-based factorization through the streaming engine.

Notation: A (n, c) rows, W (k, c) dictionary, U (n, k) >= 0 codes. NMF (W >= 0): W by HALS sweeps on the pass
statistics (S = sum U^T U, R = sum U^T A). Semi-NMF (signed W): W by exact least squares on the statistics.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts.dictionary import ConceptDictionary
from ..errors import UsageError
from ..progress import ProgressFn, no_progress
from ..artifacts.sources import RowSource
from ._alternating import (EngineSettings, Stats, State, checkpoint_config, fit_groups, global_min, history_of,
                           kmeans_pp)
from .base import Method, check_batch, check_source, option, source_summary
from .solvers.nnls import hals_scaled, hals_sweeps, nnls as nnls_codes

CACHE_GB = 4.0  # default budget for holding a fit's rows on its device across passes
CACHE_HELP = ("Hold the rows on the device across passes when they take at most this many GB per process (0: "
              "stream every pass from the store); changes the speed, not the answer.")
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
    if not cfg.cache_gb >= 0:  # also refuses NaN
        raise UsageError(f"--cache-gb must be >= 0, got {cfg.cache_gb}")
    if cfg.subsample_rows < 0:
        raise UsageError(f"subsample_rows must be >= 0, got {cfg.subsample_rows}")
    if cfg.code_solver not in ("hals", "fista"):
        raise UsageError(f"code_solver must be hals or fista, got {cfg.code_solver!r}")


@dataclass(frozen=True)
class FactorizationConfig:
    """Settings every NNLS-based factorization (craft, nmf, semi-nmf) shares; each method adds its own.

    Attributes:
        concepts: k per dictionary.
        iterations: passes over the data.
        tol: stop when a pass lowers the relative squared error by less than tol times its value.
        batch_size: rows per streamed batch; None loads each class whole.
        cache_gb: rows up to this many GB (per process) are read once and held on the fitting device for every
            pass (per-class fits that fit together are also fitted together); above it each pass streams them
            in batches (memory flat in the rows). Changes the speed, not the answer.
        seed: seeds the initial dictionary (k-means++ rows of a sample).
        code_iters: HALS sweeps of the NNLS code step per batch.
        code_solver: "hals" or "fista".
        subsample_rows: fit first on this many rows drawn evenly from the classes, then refine on all rows
            (skipped when the data has fewer than twice as many; 0 turns it off).
        checkpoint_every: passes between checkpoints.
    """

    concepts: int
    iterations: int = option(200, help="Passes over the data (at most).", metavar="N")
    tol: float = option(1e-5, help="Stop when a pass lowers the objective by less than this fraction.", metavar="F")
    batch_size: int | None = option(32768, help="Rows per streamed batch (--full-batch: each class whole).", metavar="N")
    seed: int = option(0, help="Seed of the initial dictionary.", metavar="INT")
    cache_gb: float = option(CACHE_GB, metavar="GB", help=CACHE_HELP)
    code_iters: int = 10
    code_solver: str = "hals"
    subsample_rows: int = 20000
    checkpoint_every: int = option(10, help="Checkpoint to OUT.ckpt every N passes (kept until the fit ends; --resume continues from it).", metavar="N")

    def __post_init__(self) -> None:
        check_common(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FactorizationMethod(Method):
    """A method fitted by `fit_factorization`: NMF when its dictionary is W >= 0, semi-NMF when signed.

    Its config may add `shared` (one dictionary for all classes), `shift` (fit on A - min(A)) and `dict_sweeps`
    (HALS sweeps over W per pass); without them: per class, no shift, one sweep.

    Codes are NNLS on the basis (after the fit's shift); decode undoes the shift.
    """

    tensor_shapes = {"W": ("k c", "m k c"), "shift": ("",)}
    optional_tensors = frozenset({"shift"})

    def encode(self, d: ConceptDictionary, A: torch.Tensor, y: int | None, *, iters: int) -> torch.Tensor:
        if "shift" in d.tensors:
            A = A + d.tensors["shift"]
        return nnls_codes(A, self.basis(d, y), ridge=float(d.meta.get("ridge", 0.0)), iters=iters)

    def decode(self, d: ConceptDictionary, U: torch.Tensor, y: int | None) -> torch.Tensor:
        out = U @ self.basis(d, y)
        return out - d.tensors["shift"] if "shift" in d.tensors else out

    def fit(self, source: RowSource, config: Any, *, device: torch.device, progress: ProgressFn = no_progress,
            checkpoint_path: Path | None = None, resume: bool = False) -> ConceptDictionary:
        return fit_factorization(self, source, config, signed=self.signed_dictionary,
                                 shared=getattr(config, "shared", False), shift_opt=getattr(config, "shift", False),
                                 dict_sweeps=getattr(config, "dict_sweeps", 1), device=device, progress=progress,
                                 checkpoint_path=checkpoint_path, resume=resume)


def _per_dictionary(state: State, stats: Stats, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, S, R) stacked per dictionary: the group's one W with its classes' statistics pooled (weights w), or
    the stacked per-class dictionaries (G, k, c) of one-class groups fitted together, each with its own."""
    W = state["W"]
    if W.ndim == 3:
        return W, stats.S, stats.R
    return W[None], (w[:, None, None] * stats.S).sum(0, keepdim=True), (w[:, None, None] * stats.R).sum(0, keepdim=True)


def update_nmf(state: State, stats: Stats, w: torch.Tensor, sweeps: int) -> None:
    """HALS on W >= 0 from the statistics (exact minimisation per row, others fixed), every dictionary at once;
    a row no code uses (S_jj = 0) stays as it is."""
    W, S, R = _per_dictionary(state, stats, w)  # W: a view, updated in place
    S_off, R_scaled, _ = hals_scaled(S, R, keep_unused=True)
    hals_sweeps(W, S_off, R_scaled, sweeps)


def update_semi(state: State, stats: Stats, w: torch.Tensor) -> None:
    """Signed W: the least-squares solution (S + jitter) W = R given the codes, every dictionary at once."""
    W, S, R = _per_dictionary(state, stats, w)
    k = S.shape[-1]
    jitter = 1e-7 * (torch.diagonal(S, dim1=1, dim2=2).sum(1) / k).clamp_min(1e-30)
    new = torch.linalg.solve(S + jitter[:, None, None] * torch.eye(k, device=S.device), R)
    state["W"] = new if state["W"].ndim == 3 else new[0]


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
        checkpoint_every=config.checkpoint_every, config=checkpoint_config(method.name, config.to_dict()),
        subsample_rows=config.subsample_rows, cache_bytes=int(config.cache_gb * 1e9),
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
        "shared": shared,
        "shift": shift if shift_opt else None,
        "classes": list(source.classes),
        "source": source_summary(source),
        "history": history_of(results, source),
        "fit_seconds": time.perf_counter() - t0,
        "device": str(device),
    }
    return ConceptDictionary(tensors, meta)


