"""The streaming alternating engine behind c2mf, craft, nmf and semi-nmf.

Notation: for class i of a group, A_i (n_i, c) its rows, D_i (k, c) its dictionary (W, or diag(g_i) W for
c2mf), U (n_i, k) >= 0 its codes.

One pass over the data = one iteration:
  1. code step: for every batch of every class, U = NNLS(A_batch, D_i) (+ ridge), computed in the Gram form;
  2. accumulate the sufficient statistics S_i = sum U^T U (k, k), R_i = sum U^T A (k, c), ||A_i||^2, n_i;
  3. dictionary step: the method updates W (and the gates) from the statistics alone, with exact block
     updates that lower the objective; several sweeps cost only O(k^2 c) each, no data pass.
Memory is one batch plus the (k, c) statistics per class, flat in the number of rows. Under torch.distributed
each process streams its share of the rows and the statistics are all-reduced after step 2 (the dictionary
step then sees every row); the initial dictionary comes from the same seeded sample on every rank and is
broadcast from rank 0, as is each update, so every rank holds the same dictionary. Codes are solved from a
start that depends only on the dictionary (not on earlier passes) and rows are independent, so streaming
and full batch (batch_size=None) give the same answer, and a resumed fit continues exactly where it stopped.

The objective is evaluated exactly from the statistics (never forming U W):
  ||A_i - U D_i||^2 = ||A_i||^2 - 2 <R_i, D_i> + <S_i, D_i D_i^T>.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from safetensors.torch import load_file, safe_open, save_file

from .._io import atomic_path, dumps
from ..distributed import all_reduce_min, all_reduce_sum, broadcast, is_writer, share
from ..errors import C2MFError
from ..progress import ProgressFn
from ..artifacts.sources import ArraySource, RowSource
from .base import check_batch, to_device
from .solvers.kmeans import kmeans_pp as solvers_kmeans_pp
from .solvers.nnls import gram, nnls_gram

State = dict[str, torch.Tensor]  # "W" (k, c) and, for gated models, "g" (m, k) gate values in (0, 1)
CHECKPOINT_TYPE = "c2mf-checkpoint"
SUBSAMPLE_TOL = 1e-3  # stopping tolerance of the subsample fit (a starting point, refined on all rows)


@dataclass
class Stats:
    """Sufficient statistics of one pass for the m classes of a group."""

    S: torch.Tensor  # (m, k, k)
    R: torch.Tensor  # (m, k, c)
    a2: torch.Tensor  # (m,) float64
    n: torch.Tensor  # (m,) float64


@dataclass
class EngineSettings:
    k: int
    iterations: int
    tol: float
    batch_size: int | None
    seed: int
    code_iters: int
    code_solver: str
    ridge: float
    alpha: float
    weighting: Literal["class", "pooled"]  # per-class mean (c2mf) or pooled rows (NMF)
    nonnegative: bool  # refuse negative inputs (NMF without --shift)
    nonneg_hint: str
    checkpoint_every: int
    config: dict[str, Any]  # the method's resolved config, recorded in checkpoints
    warmup: int = 0  # passes over which alpha ramps up linearly from 0 (no early stop before the end)
    subsample_rows: int = 0  # fit first on this many sampled rows, then refine on all rows (0: off)

    def alpha_at(self, p: int) -> float:
        return self.alpha if p >= self.warmup else self.alpha * (p + 1) / (self.warmup + 1)


@dataclass
class GroupResult:
    classes: list[int]
    state: State
    alpha: float = 0.0  # the alpha the fit used (resolved from the data when "auto")
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = False
    subsample: dict[str, Any] | None = None  # summary of the subsample fit that started this one


def basis(state: State, i: int) -> torch.Tensor:
    W = state["W"]
    return state["g"][i][:, None] * W if "g" in state else W


def _batches(source: RowSource, y: int, batch_size: int | None):
    if batch_size is None:
        yield source.load(y)
    else:
        yield from source.batches(y, batch_size)


def global_min(source: RowSource, classes: list[int], batch_size: int | None, device: torch.device) -> float:
    """min(A) over the given classes, all processes' rows (a data pass; also checks every batch for NaN / inf)."""
    lo = math.inf
    mine = share(source)
    for y in classes:
        for b in _batches(mine, y, batch_size):
            a = to_device(b, device)
            check_batch(a, source.classes[y])
            if a.numel():
                lo = min(lo, float(a.min()))
    return all_reduce_min(lo, device)


def sample_rows(source: RowSource, classes: list[int], n_total: int, seed: int, device: torch.device,
                shift: float = 0.0) -> list[torch.Tensor]:
    """Up to n_total rows drawn evenly from the classes, one tensor per class (initialisation, subsample fit)."""
    per = max(1, n_total // len(classes))
    parts = []
    for y in classes:
        for b in source.batches(y, per, shuffle=True, seed=seed):
            a = to_device(b, device)
            check_batch(a, source.classes[y])
            parts.append(a + shift)
            break
    return parts


def kmeans_pp(X: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k rows of X chosen by seeded k-means++ (D^2 sampling): spread-out data points as a first dictionary."""
    if X.shape[0] < k:
        raise C2MFError(f"only {X.shape[0]} rows to learn {k} concepts from: use fewer --concepts or more images")
    return solvers_kmeans_pp(X, k, torch.Generator().manual_seed(seed))


def pass_stats(source: RowSource, classes: list[int], state: State, st: EngineSettings, device: torch.device,
               shift: float) -> Stats:
    """Step 1-2: codes per batch given the current dictionary, accumulated into the statistics."""
    k, c, m = st.k, source.n_features, len(classes)
    S = torch.zeros((m, k, k), device=device)
    R = torch.zeros((m, k, c), device=device)
    a2 = torch.zeros(m, dtype=torch.float64, device=device)
    n = torch.zeros(m, dtype=torch.float64, device=device)
    for i, y in enumerate(classes):
        D = basis(state, i)
        G = gram(D, st.ridge)
        for b in _batches(source, y, st.batch_size):
            a = to_device(b, device)
            check_batch(a, source.classes[y], nonnegative=st.nonnegative, hint=st.nonneg_hint)
            if shift:
                a = a + shift
            U = nnls_gram(G, a @ D.T, iters=st.code_iters, solver=st.code_solver)  # type: ignore[arg-type]
            S[i] += U.T @ U
            R[i] += U.T @ a
            a2[i] += sq_norm(a)
            n[i] += a.shape[0]
    return Stats(S, R, a2, n)


def sq_norm(a: torch.Tensor) -> torch.Tensor:
    """||a||^2 in float64 from float32 row norms: a float32 sum over 10^8 entries loses about 1e-3, which the
    objective's cancellation (||A||^2 - 2<R, D> + <S, D D^T>) would amplify; a row sums only c entries."""
    return torch.linalg.vector_norm(a, dim=1).double().pow(2).sum()


def class_weights(stats: Stats, weighting: str) -> torch.Tensor:
    """w_i: per-class mean relative to the mean squared row norm (c2mf), or 1/||A||^2 pooled (NMF)."""
    total = stats.a2.sum().clamp_min(1e-30)
    if weighting == "class":
        m = total / stats.n.sum()
        return (1.0 / (stats.n * m)).float()
    return (torch.ones_like(stats.a2) / total).float()


def objective(state: State, stats: Stats, st: EngineSettings, alpha: float) -> dict[str, float]:
    """The method's objective and the relative reconstruction error ||A - U D||_F / ||A||_F, exactly."""
    w = class_weights(stats, st.weighting)
    recon = []
    for i in range(stats.S.shape[0]):
        D = basis(state, i)
        r = stats.a2[i] - 2 * (stats.R[i] * D).sum().double() + (stats.S[i] * (D @ D.T)).sum().double()
        recon.append(r.clamp_min(0.0))
    recon_t = torch.stack(recon)
    ridge = st.ridge * torch.diagonal(stats.S, dim1=1, dim2=2).sum(1).double()
    obj = float((w.double() * (recon_t + ridge)).sum())
    if "g" in state:
        obj += alpha * float(state["g"].sum())
    rel = float(torch.sqrt(recon_t.sum() / stats.a2.sum().clamp_min(1e-30)))
    return {"objective": obj, "relative_error": rel}


# ----- checkpoints -----
def _save_checkpoint(path: Path, done: list[GroupResult], current: GroupResult, passes: int,
                     st: EngineSettings, fingerprint: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for gi, res in enumerate(done + [current]):
        for name, t in res.state.items():
            tensors[f"{gi}.{name}"] = t.detach().cpu().contiguous()
        groups.append({"classes": res.classes, "history": res.history, "converged": res.converged,
                       "subsample": res.subsample})
    meta = {"encoding-type": CHECKPOINT_TYPE, "config": st.config, "source": fingerprint,
            "groups": groups, "passes": passes, "alpha": st.alpha}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"c2mf": dumps(meta)})


def _load_checkpoint(path: Path, st: EngineSettings, fingerprint: dict[str, Any],
                     device: torch.device) -> tuple[list[GroupResult], int, float | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("c2mf", "{}"))
        # copies: the loaded tensors sit at unaligned offsets of the file's buffer, where SIMD kernels take
        # other paths and change the last bits; a resumed fit must follow the uninterrupted one exactly
        tensors = {k: t.clone() for k, t in load_file(str(path), device=str(device)).items()}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise C2MFError(f"cannot read checkpoint {path} ({e}): delete it and fit again without --resume") from None
    if meta.get("encoding-type") != CHECKPOINT_TYPE:
        raise C2MFError(f"{path} is not a c2mf checkpoint: delete it or give another --checkpoint path")
    if meta.get("config") != st.config or meta.get("source") != fingerprint:
        raise C2MFError(
            f"checkpoint {path} was written by a fit with other settings or data: rerun with the same options "
            "and store, or drop --resume to start afresh"
        )
    results = []
    for gi, g in enumerate(meta["groups"]):
        state = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.split(".", 1)[0] == str(gi)}
        results.append(GroupResult(g["classes"], state, history=g["history"], converged=g["converged"],
                                   subsample=g.get("subsample")))
    return results, int(meta["passes"]), meta.get("alpha")


def _run_passes(source: RowSource, classes: list[int], res: GroupResult, st: EngineSettings,
                update: Callable[[State, Stats, torch.Tensor, float], None], device: torch.device, shift: float,
                start_pass: int, on_pass: Callable[[int], None], local: bool = False) -> None:
    """Alternate code and dictionary steps from `start_pass` until `tol` or `st.iterations` passes.

    `source` holds this process's share of the rows, reduced over the processes after each pass, unless
    `local` (rows every process holds alike, e.g. the subsample).
    """
    for p in range(start_pass, st.iterations):
        t0 = time.perf_counter()
        stats = pass_stats(source, classes, res.state, st, device, shift)
        if not local:
            all_reduce_sum(stats.S, stats.R, stats.a2, stats.n)
        alpha = st.alpha_at(p)
        update(res.state, stats, class_weights(stats, st.weighting), alpha)
        # the layout a checkpoint restores (a solver may return column-major W, whose products round differently)
        res.state.update({name: t.contiguous() for name, t in res.state.items()})
        if not local:
            broadcast(res.state)  # ranks agree bit for bit, whatever their float rounding
        rec = objective(res.state, stats, st, alpha)
        rec["seconds"] = time.perf_counter() - t0
        res.history.append(rec)
        prev = res.history[-2]["objective"] if len(res.history) > 1 else None
        if prev is not None and p > st.warmup and prev - rec["objective"] <= st.tol * abs(rec["objective"]):
            res.converged = True
        on_pass(p)
        if res.converged:
            return


def _pass_note(res: GroupResult, p: int, gi: int, n_groups: int, tol: float) -> str:
    """What a progress line shows after a pass: where the fit is and how far from converged."""
    h = res.history
    group = f"group {gi + 1}/{n_groups}, " if n_groups > 1 else ""
    note = f"{group}pass {p + 1}, rel. error {h[-1]['relative_error']:.4f}"
    if len(h) > 1 and h[-1]["objective"]:
        change = (h[-2]["objective"] - h[-1]["objective"]) / abs(h[-1]["objective"])
        note += f", objective change {change:.1e} (stops below {tol:.0e})"
    return note + (": converged" if res.converged else "")


def _subsample_fit(source: RowSource, classes: list[int], parts: list[torch.Tensor], state: State,
                   st: EngineSettings, update: Callable[[State, Stats, torch.Tensor, float], None],
                   device: torch.device) -> dict[str, Any]:
    """Fit on the (in-memory) sample first: passes over it are cheap, and the dictionary it gives is close to
    the full-data one, so the full passes only refine it (most of the speed on large stores)."""
    sub = ArraySource([p.cpu().numpy() for p in parts], classes=[source.classes[y] for y in classes])
    res = GroupResult(list(range(len(parts))), state)
    t0 = time.perf_counter()
    # a looser tolerance: the sample's optimum differs from the full data's by more than 1e-3 anyway
    sub_st = replace(st, batch_size=None, nonnegative=False, tol=max(st.tol, SUBSAMPLE_TOL))
    _run_passes(sub, res.classes, res, sub_st, update, device, 0.0, 0, lambda p: None, local=True)
    last = res.history[-1] if res.history else {}
    return {"rows": int(sum(p.shape[0] for p in parts)), "passes": len(res.history), "converged": res.converged,
            "relative_error": last.get("relative_error"), "seconds": time.perf_counter() - t0}


def fit_groups(
    source: RowSource,
    groups: list[list[int]],
    st: EngineSettings,
    *,
    init: Callable[[torch.Tensor, int], State],
    update: Callable[[State, Stats, torch.Tensor, float], None],
    device: torch.device,
    progress: ProgressFn,
    label: str,
    shift: float = 0.0,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    resolve_alpha: Callable[[torch.Tensor], float] | None = None,
) -> list[GroupResult]:
    """Fit each group of classes (one shared dictionary per group) by alternating code and dictionary steps.

    Args:
        init: (sample rows, group index) -> initial state.
        update: (state, stats, class weights, alpha of this pass) -> None; lowers the objective in place.
        shift: offset added to every batch (NMF on A - min(A)).
        resolve_alpha: (sample rows of the first group) -> alpha, when alpha depends on the data ("auto"); the
            resolved value is kept in the checkpoint, so a resumed fit uses the same one. Read it back from
            `resolved_alpha` of the returned results.
    """
    fingerprint = {"classes": list(source.classes), "n_rows": [int(source.n_rows(y)) for y in range(len(source.classes))],
                   "n_features": int(source.n_features), "info": str(source.info.get("fingerprint", ""))}
    mine = share(source)  # the rows this process streams; decisions below use the counts of all rows
    done: list[GroupResult] = []
    start_pass = 0
    current: GroupResult | None = None
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise C2MFError(f"--resume given but there is no checkpoint at {checkpoint_path}: drop --resume")
        results, passes, alpha = _load_checkpoint(checkpoint_path, st, fingerprint, device)
        if resolve_alpha is not None and alpha is not None:
            st = replace(st, alpha=alpha)
            resolve_alpha = None
        done, current = results[:-1], results[-1]
        start_pass = passes
        if current.converged or passes >= st.iterations:
            done, current, start_pass = results, None, 0
    planned = [st.iterations * len(groups)]  # passes still possible; lowered when a group converges early
    advance = progress(label, planned[0])
    advance(len(done) * st.iterations + start_pass)
    for gi in range(len(done), len(groups)):
        classes = groups[gi]
        if current is None:
            n_sample = st.subsample_rows if st.subsample_rows > 0 else 20000
            parts = sample_rows(source, classes, n_sample, st.seed + gi, device, shift)
            if resolve_alpha is not None:
                st = replace(st, alpha=float(resolve_alpha(torch.cat(parts))))
                resolve_alpha = None
            current = GroupResult(classes, init(torch.cat(parts), gi))
            start_pass = 0
            total = sum(source.n_rows(y) for y in classes)
            if st.subsample_rows > 0 and total > 2 * sum(p.shape[0] for p in parts):
                advance(0, note=f"group {gi + 1}/{len(groups)}: first a fit on "
                                f"{sum(p.shape[0] for p in parts):,} sampled rows")
                current.subsample = _subsample_fit(source, classes, parts, current.state, st, update, device)
            broadcast(current.state)
        group_st = replace(st, warmup=0) if current.subsample is not None else st  # alpha ramped on the sample
        rows = mine
        if fits_one_batch(source, classes, st.batch_size):
            # the whole group fits in one batch: read it once and make every pass in memory (many small classes,
            # e.g. CRAFT's crops, would otherwise re-read the store on each of their passes)
            rows = in_memory(mine, classes, st, device, shift)

        def on_pass(p: int, res: GroupResult = current, gi: int = gi) -> None:
            if res.converged:  # the passes it will not make leave the total: the count ends at 100%, no leap
                planned[0] -= st.iterations - p - 1
            advance(1, total=planned[0], note=_pass_note(res, p, gi, len(groups), st.tol))
            if checkpoint_path is not None and is_writer() and (res.converged or (p + 1) % st.checkpoint_every == 0
                                                or p + 1 == st.iterations):
                _save_checkpoint(checkpoint_path, done, res, p + 1, st, fingerprint)

        if rows is mine:
            _run_passes(mine, classes, current, group_st, update, device, shift, start_pass, on_pass)
        else:
            _run_passes(rows, list(range(len(classes))), current, replace(group_st, nonnegative=False, batch_size=None),
                        update, device, 0.0, start_pass, on_pass)
        current.alpha = st.alpha
        done.append(current)
        current = None
        start_pass = 0
    return done


FULL_BATCH_CACHE_BYTES = 1 << 30  # --full-batch keeps a group in memory across passes below this size


def fits_one_batch(source: RowSource, classes: list[int], batch_size: int | None) -> bool:
    """Whether the rows of these classes together fit in one batch (the memory the user allowed for a batch)."""
    total = sum(source.n_rows(y) for y in classes)
    if batch_size is None:
        return total * source.n_features * 4 <= FULL_BATCH_CACHE_BYTES
    return total <= batch_size


class _TensorRows:
    """The rows of a few classes held as tensors on the device (shift applied, checked once)."""

    def __init__(self, parts: list[torch.Tensor], names: list[str], n_features: int) -> None:
        self.parts, self.classes, self.n_features, self.mode, self.info = parts, names, n_features, "", {}

    def n_rows(self, y: int) -> int:
        return int(self.parts[y].shape[0])

    def load(self, y: int) -> torch.Tensor:
        return self.parts[y]


def in_memory(source: RowSource, classes: list[int], st: EngineSettings, device: torch.device,
              shift: float) -> _TensorRows:
    """Read the classes once (checking NaN / inf / sign as a pass would) and keep them on the device."""
    parts = []
    for y in classes:
        a = to_device(source.load(y), device)
        check_batch(a, source.classes[y], nonnegative=st.nonnegative, hint=st.nonneg_hint)
        parts.append(a + shift if shift else a)
    return _TensorRows(parts, [source.classes[y] for y in classes], int(source.n_features))


def history_of(results: list[GroupResult], source: RowSource) -> list[dict[str, Any]]:
    return [{"classes": [source.classes[y] for y in r.classes], "passes": len(r.history),
             "converged": r.converged, "subsample": r.subsample, "loss": r.history} for r in results]
