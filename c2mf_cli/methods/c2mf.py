"""C2MF: one signed dictionary W* shared by all classes, per-class gates sigma(lambda_y), codes U >= 0.

Objective (docs/methods.md, "C2MF and its scale degeneracy", which explains how the scale is fixed):

    min_{U>=0, ||W*_j||=1, g in (0,1)}  sum_y (1 / (n_y m)) (||A_y - U_y diag(g_y) W*||^2 + beta ||U_y||^2)
                                        + alpha sum_y ||g_y||_1

with g_y = sigma(lambda_y), n_y the rows of class y and m the mean squared row norm of the data (so the
reconstruction term of each class is a relative squared error and alpha is dimensionless). Unit-norm rows fix
the scale of W*; the ridge beta fixes the scale of U against the gates: writing V = U diag(g), the ridge is
beta sum_j ||V_j||^2 / g_j^2, so a concept a class uses costs least with its gate near 1, and alpha closes the
gates of concepts it does not use.

Solved by the streaming alternating engine: codes per batch by NNLS (ridge beta) given diag(g_y) W*, then exact
block updates from the pass statistics: each row of W* is the unit vector that minimises the objective with
the others fixed, each gate the clipped minimiser of its quadratic plus alpha.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..artifacts.dictionary import ConceptDictionary
from ..errors import UsageError
from ..progress import ProgressFn, no_progress
from ..artifacts.sources import RowSource
from ._alternating import EngineSettings, Stats, State, checkpoint_config, fit_groups, history_of, kmeans_pp
from ._factorization import CACHE_GB, CACHE_HELP, check_common
from .base import Method, check_source, option, register_method, source_summary
from .solvers.lowrank import rank_k_energy
from .solvers.nnls import nnls

_EPS = 1e-4  # gates live in [eps, 1 - eps] so that lambda = logit(g) stays finite
AUTO_ALPHA_SCALE = 0.3  # rho of alpha = rho * E_k / k (docs/methods.md: measured on CIFAR layer3 and CUB head_conv)


def resolve_alpha(config: "C2MFConfig", sample: torch.Tensor) -> tuple[float, dict]:
    """The alpha a fit uses and how it was obtained (recorded in the dictionary's metadata)."""
    if not isinstance(config.alpha, str):
        return float(config.alpha), {"rule": "given", "alpha": float(config.alpha)}
    e_k = rank_k_energy(sample, config.concepts, config.seed)
    alpha = config.alpha_scale * e_k / config.concepts
    return alpha, {"rule": "auto: alpha_scale * E_k / k", "alpha": alpha, "alpha_scale": config.alpha_scale,
                   "energy_k": e_k, "k": config.concepts, "sample_rows": int(sample.shape[0])}


@dataclass(frozen=True)
class C2MFConfig:
    """Settings of a C2MF fit.

    Attributes:
        concepts: k, the size of the shared dictionary.
        alpha: L1 weight on the gates, in units of relative squared error: a concept stays open for a class
            if it explains about alpha of the class's energy; larger means fewer concepts per class.
            "auto" (the default) resolves it from the data as alpha = alpha_scale * E_k / k, with E_k the
            fraction of the energy the best rank-k approximation of a sample captures: E_k / k is the energy an
            average concept explains, so the rule means the same on any layer and any k.
        alpha_scale: rho of the "auto" rule (ignored for a numeric alpha): a concept stays open for a class if
            it explains about rho times an average concept's share of the energy.
        beta: ridge on the codes that fixes the scale of U against the gates (must be > 0).
        iterations: passes over the data (each pass: codes for every batch, then a dictionary update).
        tol: stop when a pass lowers the objective by less than tol times its value.
        batch_size: rows per batch streamed from the store; None loads each class whole (full batch).
        cache_gb: rows up to this many GB (per process) are read once and held on the fitting device for every
            pass; above it each pass streams them in batches (memory flat in the rows). Changes the speed, not
            the answer.
        seed: seeds the initial dictionary (k-means++ rows of a sample).
        code_iters: HALS sweeps of the NNLS code step per batch.
        code_solver: "hals" or "fista".
        dict_sweeps: block-update sweeps over W* and the gates per pass.
        gate_init: starting value of every gate.
        warmup: passes over which alpha ramps up from 0, so the dictionary forms before gates close (a gate
            at its floor never reopens: its concept's codes are 0, so nothing pulls it back).
        subsample_rows: fit first on this many rows drawn evenly from the classes, then refine on all rows
            (skipped when the data has fewer than twice as many; 0 turns it off).
        checkpoint_every: passes between checkpoints (when a checkpoint path is given).
    """

    concepts: int
    alpha: float | str = option(
        "auto", metavar="auto|F", help="L1 weight on the gates, larger = fewer concepts per class: a number (the "
        "relative squared error a concept must explain) or 'auto' (alpha-scale x the energy an average concept "
        "explains, E_k / k).")
    alpha_scale: float = option(AUTO_ALPHA_SCALE, metavar="F", help="With --alpha auto: the multiple of E_k / k.")
    beta: float = option(0.1, metavar="F", help="Ridge on the codes (fixes their scale against the gates).")
    iterations: int = option(100, help="Passes over the data (at most).", metavar="N")
    tol: float = option(1e-5, help="Stop when a pass lowers the objective by less than this fraction.", metavar="F")
    batch_size: int | None = option(32768, help="Rows per streamed batch (--full-batch: each class whole).", metavar="N")
    seed: int = option(0, help="Seed of the initial dictionary.", metavar="INT")
    cache_gb: float = option(CACHE_GB, metavar="GB", help=CACHE_HELP)
    code_iters: int = 10
    code_solver: str = "hals"
    dict_sweeps: int = 5
    gate_init: float = 0.5
    warmup: int = 10
    subsample_rows: int = 20000
    checkpoint_every: int = option(10, help="Checkpoint to OUT.ckpt every N passes (kept until the fit ends; --resume continues from it).", metavar="N")

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise UsageError(f"--alpha must be 'auto' or a number >= 0, got {self.alpha!r}")
        elif not self.alpha >= 0:  # also refuses NaN
            raise UsageError(f"--alpha must be >= 0, got {self.alpha}")
        if not self.alpha_scale >= 0:
            raise UsageError(f"--alpha-scale must be >= 0, got {self.alpha_scale}")
        if self.beta <= 0:
            raise UsageError(f"--beta must be > 0 (it fixes the scale of the codes against the gates), got {self.beta}")
        check_common(self)
        if self.warmup < 0:
            raise UsageError(f"warmup must be >= 0, got {self.warmup}")
        if not 0 < self.gate_init < 1:
            raise UsageError(f"gate_init must be in (0, 1), got {self.gate_init}")

    def to_dict(self) -> dict:
        return asdict(self)


def update_c2mf(state: State, stats: Stats, w: torch.Tensor, alpha: float, sweeps: int) -> None:
    """Exact block updates of W* (rows on the unit sphere) and the gates, given the pass statistics."""
    W, g = state["W"], state["g"]
    S, R = stats.S, stats.R
    k = W.shape[0]
    wS = w[:, None, None] * S
    for _ in range(sweeps):
        Sbar = (g[:, :, None] * wS * g[:, None, :]).sum(0)
        Rbar = ((w[:, None] * g)[:, :, None] * R).sum(0)
        for j in range(k):
            r = Rbar[j] - Sbar[j] @ W + Sbar[j, j] * W[j]
            nr = r.norm()
            if float(nr) > 0:
                W[j] = r / nr
        M = W @ W.T
        rho = torch.einsum("mkc,kc->mk", R, W)
        for j in range(k):
            cross = (g * S[:, j, :] * M[j][None, :]).sum(1) - g[:, j] * S[:, j, j] * M[j, j]
            num = w * (rho[:, j] - cross) - alpha / 2
            den = w * S[:, j, j] * M[j, j]
            new = torch.where(den > 0, (num / den.clamp_min(1e-30)).clamp(_EPS, 1 - _EPS),
                              torch.full_like(num, _EPS) if alpha > 0 else g[:, j])
            g[:, j] = new


@register_method
class C2MF(Method):
    name = "c2mf"
    description = "signed dictionary shared by all classes, per-class gates, codes U >= 0 (the paper's method)"
    needs = "full"
    signed_dictionary = True
    requires_nonnegative_input = False
    config_class = C2MFConfig
    tensor_shapes = {"W": ("k c",), "gates": ("m k",)}
    gated = True

    def needs_class(self, d: ConceptDictionary) -> bool:
        return True  # the gates of class y scale the shared dictionary

    def gates(self, d: ConceptDictionary, y: int) -> torch.Tensor:
        return torch.sigmoid(d.tensors["gates"][y])

    def basis(self, d: ConceptDictionary, y: int | None) -> torch.Tensor:
        """diag(sigma(lambda_y)) W*: the shared dictionary seen through class y's gates."""
        return self.gates(d, y)[:, None] * d.tensors["W"]  # type: ignore[index]

    def class_free(self, d: ConceptDictionary) -> ConceptDictionary:
        """W* with every gate open: a shared signed dictionary coded by NNLS with the fit's ridge (semi-NMF's
        codes), for encoding without a class."""
        return ConceptDictionary({"W": d.tensors["W"]},
                                 {"method": "semi-nmf", "ungated_from": self.name, "classes": d.classes,
                                  "ridge": float(d.meta.get("ridge", 0.0)), "source": d.meta.get("source", {})})

    def encode(self, d: ConceptDictionary, A: torch.Tensor, y: int | None, *, iters: int) -> torch.Tensor:
        """NNLS codes with the fit's ridge beta: it is what makes the gates act (a concept with gate g costs
        beta / g^2), so codes match the objective the dictionary was fitted on."""
        return nnls(A, self.basis(d, y), ridge=float(d.meta.get("ridge", 0.0)), iters=iters)

    def fit(self, source: RowSource, config: C2MFConfig, *, device: torch.device,
            progress: ProgressFn = no_progress, checkpoint_path: Path | None = None,
            resume: bool = False) -> ConceptDictionary:
        check_source(self, source, config.concepts)
        t0 = time.perf_counter()
        m = len(source.classes)
        st = EngineSettings(
            k=config.concepts, iterations=config.iterations, tol=config.tol, batch_size=config.batch_size,
            seed=config.seed, code_iters=config.code_iters, code_solver=config.code_solver, ridge=config.beta,
            alpha=0.0, weighting="class", nonnegative=False, nonneg_hint="",
            checkpoint_every=config.checkpoint_every, config=checkpoint_config(self.name, config.to_dict()),
            warmup=config.warmup, subsample_rows=config.subsample_rows, cache_bytes=int(config.cache_gb * 1e9),
        )

        def init(sample: torch.Tensor, gi: int) -> State:
            W = kmeans_pp(sample, config.concepts, config.seed + gi)
            W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return {"W": W, "g": torch.full((m, config.concepts), config.gate_init, device=device)}

        def update(state: State, stats: Stats, w: torch.Tensor, alpha: float) -> None:
            update_c2mf(state, stats, w, alpha, config.dict_sweeps)

        how: dict = {}

        def alpha_of(sample: torch.Tensor) -> float:
            alpha, info = resolve_alpha(config, sample)
            how.update(info)
            return alpha

        results = fit_groups(source, [list(range(m))], st, init=init, update=update, device=device,
                             progress=progress, label="c2mf", checkpoint_path=checkpoint_path, resume=resume,
                             resolve_alpha=alpha_of)
        if not how:  # resumed: the checkpoint held the resolved value
            how = {"rule": "given" if not isinstance(config.alpha, str) else "auto (from the checkpoint)",
                   "alpha": results[0].alpha}
        state = results[0].state
        g = state["g"].clamp(_EPS, 1 - _EPS)
        tensors = {"W": state["W"], "gates": torch.log(g) - torch.log1p(-g)}
        meta = {
            "method": self.name,
            "config": config.to_dict(),
            "alpha": how,
            "ridge": config.beta,
            "shared": True,
            "classes": list(source.classes),
            "source": source_summary(source),
            "history": history_of(results, source),
            "fit_seconds": time.perf_counter() - t0,
            "device": str(device),
        }
        return ConceptDictionary(tensors, meta)
