"""The streaming alternating engine behind c2mf, craft, nmf and semi-nmf.

Notation: for class i of a group, A_i (n_i, c) its rows, D_i (k, c) its dictionary (W, or diag(g_i) W for
c2mf), U (n_i, k) >= 0 its codes.

One pass over the data = one iteration:
  1. code step: for every batch of every class, U = NNLS(A_batch, D_i) (+ ridge), computed in the Gram form;
  2. accumulate the sufficient statistics S_i = sum U^T U (k, k), R_i = sum U^T A (k, c), ||A_i||^2, n_i;
  3. dictionary step: the method updates W (and the gates) from the statistics alone, with exact block
     updates that lower the objective; several sweeps cost only O(k^2 c) each, no data pass.
The code step solves pieces of many classes at once (padded with zero rows, whose codes are exactly 0), so a pass
costs a few batched kernels, not some per class. Rows up to `cache_bytes` are read once and held on the device
(the same pieces a streamed pass makes, so the same answer bit for bit); above it each pass streams them and
memory is one batch plus one solve's pieces plus the (k, c) statistics per class, flat in the number of rows.
One-class groups (per-class dictionaries) whose rows fit the budget together are fitted together: stacked
dictionaries (G, k, c), batched steps, each group its own history and stopping test. Under torch.distributed
each process streams its share of the rows and the statistics are all-reduced after step 2 (the dictionary
step then sees every row); the initial dictionary comes from the same seeded sample on every rank and is
broadcast from rank 0, as is each update, so every rank holds the same dictionary. Codes are solved from a
start that depends only on the dictionary (not on earlier passes) and rows are independent, so streaming
and full batch (batch_size=None) give the same answer, and a resumed fit continues exactly where it stopped.

The objective is evaluated exactly from the statistics (never forming U W):
  ||A_i - U D_i||^2 = ||A_i||^2 - 2 <R_i, D_i> + <S_i, D_i D_i^T>.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from safetensors.torch import load_file, safe_open
from torch.nn.utils.rnn import pad_sequence

from .._io import dumps, write_safetensors
from ..distributed import all_reduce_min, all_reduce_sum, broadcast, is_writer, share
from ..errors import C2MFError
from ..progress import ProgressFn
from ..artifacts.sources import RowSource
from .base import check_batch, to_device
from .solvers.kmeans import kmeans_pp as solvers_kmeans_pp
from .solvers.nnls import code_block_elements, nnls_gram_batched

State = dict[str, torch.Tensor]  # "W" (k, c) and, for gated models, "g" (m, k) gate values in (0, 1)
CHECKPOINT_TYPE = "c2mf-checkpoint"
PAD_SLACK = 1.2  # a solve pads its classes to one length when that adds at most this share of rows
PADDED_ELEMENTS = 1 << 26  # rows x channels of one solve's padded copy (256 MB in float32)
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
    cache_bytes: int = 0  # rows of a fit up to this size are held on the device across passes
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


def _take(t: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """t[pos] along the first axis: a view when the positions run consecutively (no copy of stacked
    dictionaries, the usual case: a solve's classes follow each other)."""
    if pos == list(range(pos[0], pos[0] + len(pos))):
        return t[pos[0] : pos[0] + len(pos)]
    return t[torch.tensor(pos, device=t.device)]


def bases(state: State, pos: list[int]) -> torch.Tensor:
    """The (b, k, c) dictionaries D_i of the classes at positions pos: W, diag(g_i) W, or W[i] when the state
    stacks one dictionary per class (several per-class fits at once)."""
    W = state["W"]
    if W.ndim == 3:
        return _take(W, pos)
    if "g" in state:
        return _take(state["g"], pos)[:, :, None] * W
    return W.expand(len(pos), *W.shape)


def grams(state: State, pos: list[int]) -> torch.Tensor:
    """D_i D_i^T (b, k, k) for the classes at positions pos, from one k x k product where W is shared."""
    W = state["W"]
    if W.ndim == 3:
        Wi = _take(W, pos)
        return torch.bmm(Wi, Wi.mT)
    M = W @ W.T
    if "g" in state:
        g = _take(state["g"], pos)
        return g[:, :, None] * M * g[:, None, :]
    return M.expand(len(pos), *M.shape)


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


Piece = tuple[int, int]  # (class, index of the piece among the class's pieces)


def _padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """(b, n, c): the parts, the shorter ones padded with zero rows (a plain stack, no zero fill, when all are
    as long)."""
    if all(p.shape[0] == parts[0].shape[0] for p in parts):
        return torch.stack(parts)
    return pad_sequence(parts, batch_first=True)


class Rows:
    """The rows a pass reads, class by class, in pieces of at most `block` rows: streamed from the source in
    batches (checked for NaN / inf / sign as they come) on every pass, or, when `keep`, held on the device after
    the first read. Kept pieces are the streamed ones, so both give the same statistics bit for bit."""

    def __init__(self, source: RowSource | None, n_features: int, st: EngineSettings, device: torch.device,
                 shift: float, keep: bool) -> None:
        self.source, self.n_features, self.st, self.device, self.shift = source, n_features, st, device, shift
        self.block = max(512, code_block_elements(device) // st.k)
        self.kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = {} if keep else None
        # held rows: the stacks of solves (see `stack`) made or used by this pass and by the last one
        self._used: dict[tuple[Piece, ...], torch.Tensor] = {}
        self._last: dict[tuple[Piece, ...], torch.Tensor] = {}

    @classmethod
    def of_tensors(cls, parts: list[torch.Tensor], st: EngineSettings, device: torch.device) -> "Rows":
        """Rows already on the device (the subsample), class y = parts[y]."""
        rows = cls(None, int(parts[0].shape[1]), st, device, 0.0, keep=True)
        rows.kept = {y: [(a, sq_norm(a)) for a in torch.split(p, rows.block)] for y, p in enumerate(parts)}
        return rows

    def pieces(self, classes: list[int]) -> Iterator[tuple[int, Piece, torch.Tensor, torch.Tensor]]:
        """(position e in `classes`, which piece, rows of class classes[e], their ||.||^2) for every piece, class
        after class."""
        self._last, self._used = self._used, {}
        for e, y in enumerate(classes):
            if self.kept is not None and y in self.kept:
                for i, (a, sq) in enumerate(self.kept[y]):
                    yield e, (y, i), a, sq
                continue
            if self.source is None:
                raise ValueError(f"class {y} is not among the rows held")
            got = []
            for b in _batches(self.source, y, self.st.batch_size):
                a = to_device(b, self.device)
                check_batch(a, self.source.classes[y], nonnegative=self.st.nonnegative, hint=self.st.nonneg_hint)
                if self.shift:
                    a = a + self.shift
                for piece in torch.split(a, self.block):
                    got.append((piece, sq_norm(piece)))
                    yield e, (y, len(got) - 1), *got[-1]
            if self.kept is not None:
                self.kept[y] = got

    def stack(self, keys: list[Piece], parts: list[torch.Tensor]) -> torch.Tensor:
        """The pieces of one solve as a (b, n, c) tensor, the shorter ones padded with zero rows. Held rows keep
        the stacks of the last pass and are re-pointed into them (no second copy): a pass over the same classes
        as the last one copies nothing."""
        if len(parts) == 1:
            return parts[0][None]
        if self.kept is None:
            return _padded(parts)
        key = tuple(keys)
        A = self._last.pop(key, None)
        if A is None:
            self._last.clear()  # another set of classes: the old stacks' other chunks will not come back
            A = _padded(parts)
            for j, ((y, i), a) in enumerate(zip(keys, parts)):
                if y in self.kept:  # (a class still being read keeps its piece until the next pass)
                    self.kept[y][i] = (A[j, : a.shape[0]], self.kept[y][i][1])
        self._used[key] = A
        return A

    def forget(self, y: int) -> None:
        """Drop the held rows of class y (its fit has ended; a later pass would read them again)."""
        if self.kept is not None:
            self.kept.pop(y, None)


def pass_stats(rows: Rows, classes: list[int], state: State, st: EngineSettings, device: torch.device) -> Stats:
    """Steps 1-2: codes of every row given the current dictionaries, accumulated into the statistics.

    Class e of the statistics is `classes[e]` of `rows`, coded on the dictionary at position e of `state`.
    Pieces of many classes are solved together (padded with zero rows, whose codes are exactly 0 and add
    nothing), up to `code_block_elements` codes and PADDED_ELEMENTS padded rows x channels per solve: a few
    kernel launches per pass, not some per class. Pieces about as long (padding adds at most PAD_SLACK) are
    stacked into one tensor for the products A D^T and U^T A; others are multiplied piece by piece."""
    k, c, m = st.k, rows.n_features, len(classes)
    solved: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # (positions, S, R) of each solve
    norms: list[torch.Tensor] = []
    owners: list[int] = []
    counts = [0] * m
    budget = code_block_elements(device)
    eye = torch.eye(k, device=device)

    def solve(chunk: list[tuple[int, Piece, torch.Tensor]]) -> None:
        pos = [e for e, _, _ in chunk]
        parts = [a for _, _, a in chunk]
        G = grams(state, pos) + st.ridge * eye if st.ridge else grams(state, pos)
        W = state["W"]
        n = max(a.shape[0] for a in parts)
        A = None
        if len(parts) * n <= PAD_SLACK * sum(a.shape[0] for a in parts):
            # the rows as one (b, n, c) tensor, shorter classes padded with zero rows: one product each way
            A = rows.stack([key for _, key, _ in chunk], parts)
            if W.ndim == 3:
                B = torch.bmm(bases(state, pos), A.mT).mT  # made as (b, k, n), the layout the solver reads
            else:  # a shared W: one product, then each class's gates
                B = A @ W.T
                if "g" in state:
                    B.mul_(_take(state["g"], pos)[:, None, :])
        else:  # classes of unequal sizes: a product per class (padding would cost more than the calls)
            D = bases(state, pos)
            B = torch.zeros((len(parts), n, k), device=device)
            for j, a in enumerate(parts):
                B[j, : a.shape[0]] = a @ D[j].T
        U = nnls_gram_batched(G, B, iters=st.code_iters, solver=st.code_solver)  # type: ignore[arg-type]
        R = (torch.bmm(U.mT, A) if A is not None
             else torch.stack([U[j, : a.shape[0]].T @ a for j, a in enumerate(parts)]))
        solved.append((pos, torch.bmm(U.mT, U), R))

    chunk: list[tuple[int, Piece, torch.Tensor]] = []
    widest = 0
    for e, key, a, sq in rows.pieces(classes):
        counts[e] += a.shape[0]
        norms.append(sq)
        owners.append(e)
        if not a.shape[0]:
            continue
        wide = max(widest, a.shape[0])
        if chunk and ((len(chunk) + 1) * wide * k > budget or (len(chunk) + 1) * wide * c > PADDED_ELEMENTS
                      or chunk[-1][0] == e):
            solve(chunk)
            chunk, wide = [], a.shape[0]
        chunk.append((e, key, a))
        widest = wide
    if chunk:
        solve(chunk)
    if [e for pos, _, _ in solved for e in pos] == list(range(m)):  # each class in one solve, in order
        S = torch.cat([s for _, s, _ in solved]) if len(solved) > 1 else solved[0][1]
        R = torch.cat([r for _, _, r in solved]) if len(solved) > 1 else solved[0][2]
    else:  # classes split over solves, or without rows
        S = torch.zeros((m, k, k), device=device)
        R = torch.zeros((m, k, c), device=device)
        for pos, s, r in solved:
            idx = torch.tensor(pos, device=device)
            S.index_add_(0, idx, s)
            R.index_add_(0, idx, r)
    a2 = torch.zeros(m, dtype=torch.float64, device=device)
    if norms:
        a2.index_add_(0, torch.tensor(owners, device=device), torch.stack(norms))
    return Stats(S, R, a2, torch.tensor(counts, dtype=torch.float64, device=device))


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


def class_terms(state: State, stats: Stats, st: EngineSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, ||A_i - U_i D_i||^2 = ||A_i||^2 - 2 <R_i, D_i> + <S_i, D_i D_i^T> and the ridge term
    ridge * tr(S_i), exactly, in float64 (m,), for all classes at once."""
    W = state["W"]
    if W.ndim == 3:
        cross = (stats.R * W).sum((1, 2))  # (einsum's kernel is several times slower here)
    else:
        rw = torch.einsum("mkc,kc->mk", stats.R, W)
        cross = (rw * state["g"]).sum(1) if "g" in state else rw.sum(1)
    quad = (stats.S * grams(state, list(range(stats.S.shape[0])))).sum((1, 2))
    recon = (stats.a2 - 2 * cross.double() + quad.double()).clamp_min(0.0)
    return recon, st.ridge * torch.diagonal(stats.S, dim1=1, dim2=2).sum(1).double()


def objective(state: State, stats: Stats, st: EngineSettings, alpha: float) -> dict[str, float]:
    """The method's objective and the relative reconstruction error ||A - U D||_F / ||A||_F, exactly."""
    w = class_weights(stats, st.weighting)
    recon, ridge = class_terms(state, stats, st)
    obj = (w.double() * (recon + ridge)).sum()
    if "g" in state:
        obj = obj + alpha * state["g"].sum().double()
    rel = torch.sqrt(recon.sum() / stats.a2.sum().clamp_min(1e-30))
    out = torch.stack([obj, rel]).tolist()  # one device sync per pass
    return {"objective": out[0], "relative_error": out[1]}


# ----- checkpoints -----
def _save_checkpoint(path: Path, results: list[GroupResult], wave_start: int, passes: int,
                     st: EngineSettings, fingerprint: dict[str, Any]) -> None:
    """Every group started so far: those before `wave_start` are done, the others are being fitted together
    and have made `passes` passes (fewer where one converged)."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for gi, res in enumerate(results):
        for name, t in res.state.items():
            tensors[f"{gi}.{name}"] = t.detach().cpu().contiguous()
        groups.append({"classes": res.classes, "history": res.history, "converged": res.converged,
                       "subsample": res.subsample})
    meta = {"encoding-type": CHECKPOINT_TYPE, "config": st.config, "source": fingerprint,
            "groups": groups, "wave_start": wave_start, "passes": passes, "alpha": st.alpha}
    write_safetensors(path, tensors, metadata={"c2mf": dumps(meta)})


def _load_checkpoint(path: Path, st: EngineSettings, fingerprint: dict[str, Any],
                     device: torch.device) -> tuple[list[GroupResult], int, int, float | None]:
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
    # a checkpoint of a fit that made its groups one at a time: the last one is the one in progress
    wave_start = int(meta.get("wave_start", len(results) - 1))
    return results, wave_start, int(meta["passes"]), meta.get("alpha")


def _stack(results: list[GroupResult]) -> State:
    """The state passes work on: the group's own, or the per-class groups' dictionaries stacked (G, k, c)."""
    if len(results) == 1:
        return results[0].state
    return {name: torch.stack([r.state[name] for r in results]) for name in results[0].state}


def _unstack(state: State, results: list[GroupResult]) -> None:
    if len(results) > 1:
        for gi, r in enumerate(results):
            r.state = {name: t[gi] for name, t in state.items()}


def _finished(res: GroupResult, st: EngineSettings) -> bool:
    return res.converged or len(res.history) >= st.iterations


def _run_passes(rows: Rows, results: list[GroupResult], members: list[list[int]], state: State,
                st: EngineSettings, update: Callable[[State, Stats, torch.Tensor, float], None],
                device: torch.device, start_pass: int, on_pass: Callable[[int, list[int]], None],
                local: bool = False) -> None:
    """Alternate code and dictionary steps from `start_pass` until every group meets `tol` or has made
    `st.iterations` passes.

    `results` are fitted together: one group over the classes `members[0]` of `rows` (state: its own), or
    several one-class groups (state: their dictionaries stacked, group gi coded on `members[gi][0]`), each
    with its own history and stopping test. `rows` holds this process's share of the rows, and the statistics
    are reduced over the processes after each pass, unless `local` (rows every process holds alike, e.g. the
    subsample). `on_pass(p, groups that made pass p)` follows each pass.
    """
    several = len(results) > 1
    for p in range(start_pass, st.iterations):
        t0 = time.perf_counter()
        active = [gi for gi, r in enumerate(results) if not _finished(r, st)]
        if not active:
            return
        idx = None  # the groups' places in the stacked state when only some of them are still fitting
        sub, classes = state, members[0]
        if several:
            classes = [members[gi][0] for gi in active]
            if len(active) < len(results):
                idx = torch.tensor(active, device=device)
                sub = {name: t[idx] for name, t in state.items()}
        stats = pass_stats(rows, classes, sub, st, device)
        if not local:
            all_reduce_sum(stats.S, stats.R, stats.a2, stats.n)
        alpha = st.alpha_at(p)
        # several groups: each class is its own group, weighted by its own ||A||^2
        w = (1.0 / stats.a2.clamp_min(1e-30)).float() if several else class_weights(stats, st.weighting)
        update(sub, stats, w, alpha)
        # the layout a checkpoint restores (a solver may return column-major W, whose products round differently)
        sub.update({name: t.contiguous() for name, t in sub.items()})
        if idx is not None:
            for name, t in sub.items():
                state[name][idx] = t
        if not local:
            broadcast(state)  # ranks agree bit for bit, whatever their float rounding
        seconds = time.perf_counter() - t0
        if several:
            recon, ridge = class_terms(sub, stats, st)
            obj = (w.double() * (recon + ridge)).tolist()
            rel = torch.sqrt(recon / stats.a2.clamp_min(1e-30)).tolist()
            recs = [{"objective": o, "relative_error": r} for o, r in zip(obj, rel)]
        else:
            recs = [objective(sub, stats, st, alpha)]
        for gi, rec in zip(active, recs):
            res = results[gi]
            rec["seconds"] = seconds
            res.history.append(rec)
            prev = res.history[-2]["objective"] if len(res.history) > 1 else None
            if prev is not None and p > st.warmup and prev - rec["objective"] <= st.tol * abs(rec["objective"]):
                res.converged = True
            if several and _finished(res, st):
                rows.forget(members[gi][0])
        on_pass(p, active)


def _pass_note(results: list[GroupResult], first: int, p: int, n_groups: int, tol: float) -> str:
    """What a progress line shows after a pass: where the fit is and how far from converged."""
    if len(results) > 1:
        fitting = sum(not r.converged for r in results)
        last = [r.history[-1]["relative_error"] for r in results if r.history]
        return (f"groups {first + 1}-{first + len(results)} of {n_groups} together, pass {p + 1}, "
                f"{fitting} still fitting, mean rel. error {sum(last) / max(1, len(last)):.4f}")
    res = results[0]
    h = res.history
    group = f"group {first + 1}/{n_groups}, " if n_groups > 1 else ""
    note = f"{group}pass {p + 1}, rel. error {h[-1]['relative_error']:.4f}"
    if len(h) > 1 and h[-1]["objective"]:
        change = (h[-2]["objective"] - h[-1]["objective"]) / abs(h[-1]["objective"])
        note += f", objective change {change:.1e} (stops below {tol:.0e})"
    return note + (": converged" if res.converged else "")


def _subsample_fit(parts: list[list[torch.Tensor]], results: list[GroupResult], state: State,
                   st: EngineSettings, update: Callable[[State, Stats, torch.Tensor, float], None],
                   device: torch.device) -> None:
    """Fit on the (in-memory) samples of these groups first: passes over them are cheap, and the dictionary they
    give is close to the full-data one, so the full passes only refine it (most of the speed on large stores).
    `state` is updated in place; each group records a summary in `subsample`."""
    flat = [p for ps in parts for p in ps]
    sub_results = [GroupResult(r.classes, r.state) for r in results]
    members, start = [], 0
    for ps in parts:
        members.append(list(range(start, start + len(ps))))
        start += len(ps)
    t0 = time.perf_counter()
    # a looser tolerance: the sample's optimum differs from the full data's by more than 1e-3 anyway
    sub_st = replace(st, batch_size=None, nonnegative=False, tol=max(st.tol, SUBSAMPLE_TOL))
    _run_passes(Rows.of_tensors(flat, sub_st, device), sub_results, members, state, sub_st, update, device, 0,
                lambda p, active: None, local=True)
    seconds = time.perf_counter() - t0
    for r, s, ps in zip(results, sub_results, parts):
        last = s.history[-1] if s.history else {}
        r.subsample = {"rows": int(sum(p.shape[0] for p in ps)), "passes": len(s.history),
                       "converged": s.converged, "relative_error": last.get("relative_error"), "seconds": seconds}


def _waves(source: RowSource, groups: list[list[int]], start: int, budget: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) of groups fitted together: consecutive one-class groups whose rows fit the cache budget
    together (held on the device across their passes); a shared group, or one too large, alone."""
    a = start
    while a < len(groups):
        b, size = a + 1, _bytes(source, groups[a])
        if len(groups[a]) == 1 and size <= budget:
            while b < len(groups) and len(groups[b]) == 1 and size + _bytes(source, groups[b]) <= budget:
                size += _bytes(source, groups[b])
                b += 1
        yield a, b
        a = b


def _bytes(source: RowSource, classes: list[int]) -> int:
    return sum(source.n_rows(y) for y in classes) * source.n_features * 4


def checkpoint_config(method: str, config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint must match to be resumed: all of them but the cache budget, which changes
    where the rows are held, not the answer."""
    return {"method": method, **{k: v for k, v in config.items() if k != "cache_gb"}}


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

    One-class groups (per-class dictionaries) whose rows fit the cache budget together are fitted together:
    every pass codes all their classes in the same batched solves and updates their dictionaries in one
    batched step, each group keeping its own history and stopping test (the answer is each group's own fit).

    Args:
        init: (sample rows, group index) -> initial state.
        update: (state, stats, class weights, alpha of this pass) -> None; lowers the objective in place. For
            groups fitted together the state holds their dictionaries stacked (G, k, c) and the statistics one
            class per group.
        shift: offset added to every batch (NMF on A - min(A)).
        resolve_alpha: (sample rows of the first group) -> alpha, when alpha depends on the data ("auto"); the
            resolved value is kept in the checkpoint, so a resumed fit uses the same one. Read it back from
            `resolved_alpha` of the returned results.
    """
    fingerprint = {"classes": list(source.classes), "n_rows": [int(source.n_rows(y)) for y in range(len(source.classes))],
                   "n_features": int(source.n_features), "info": str(source.info.get("fingerprint", ""))}
    mine = share(source)  # the rows this process streams; decisions below use the counts of all rows
    results: list[GroupResult] = []
    wave_start, start_pass = 0, 0
    resumed: list[GroupResult] = []
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise C2MFError(f"--resume given but there is no checkpoint at {checkpoint_path}: drop --resume")
        loaded, wave_start, start_pass, alpha = _load_checkpoint(checkpoint_path, st, fingerprint, device)
        if resolve_alpha is not None and alpha is not None:
            st = replace(st, alpha=alpha)
            resolve_alpha = None
        results, resumed = loaded[:wave_start], loaded[wave_start:]
        if all(_finished(r, st) for r in resumed):
            results, resumed, start_pass = loaded, [], 0
    # passes still possible; lowered when a group converges early
    planned = [st.iterations * len(groups) - sum(st.iterations - len(r.history) for r in results + resumed
                                                 if r.converged)]
    advance = progress(label, planned[0])
    advance(sum(len(r.history) for r in results + resumed))
    waves: Iterator[tuple[int, int]] = iter([(wave_start, wave_start + len(resumed))] if resumed else [])
    first_new = len(results) + len(resumed)
    # waves from the counts of all rows: every process must make the same ones
    for a, b in itertools.chain(waves, _waves(source, groups, first_new, st.cache_bytes)):
        wave = resumed if resumed else []
        if not wave:
            parts: list[list[torch.Tensor]] = []
            for gi in range(a, b):
                n_sample = st.subsample_rows if st.subsample_rows > 0 else 20000
                parts.append(sample_rows(source, groups[gi], n_sample, st.seed + gi, device, shift))
                if resolve_alpha is not None:
                    st = replace(st, alpha=float(resolve_alpha(torch.cat(parts[-1]))))
                    resolve_alpha = None
                wave.append(GroupResult(groups[gi], init(torch.cat(parts[-1]), gi)))
            start_pass = 0
            state = _stack(wave)
            big = [i for i, gi in enumerate(range(a, b)) if st.subsample_rows > 0
                   and sum(source.n_rows(y) for y in groups[gi]) > 2 * sum(p.shape[0] for p in parts[i])]
            if big:
                advance(0, note=f"group {a + 1}/{len(groups)}: first a fit on "
                                f"{sum(p.shape[0] for i in big for p in parts[i]):,} sampled rows" if b - a == 1
                        else f"groups {a + 1}-{b} of {len(groups)}: first fits on samples of {len(big)} of them")
                sel = torch.tensor(big, device=device)
                sub = state if b - a == 1 else {name: t[sel] for name, t in state.items()}
                _subsample_fit([parts[i] for i in big], [wave[i] for i in big], sub, st, update, device)
                if b - a > 1:
                    for name, t in sub.items():
                        state[name][sel] = t
            del parts
            broadcast(state)
        else:
            state = _stack(wave)
        resumed = []
        _unstack(state, wave)
        # alpha ramped on the sample
        group_st = replace(st, warmup=0) if any(r.subsample is not None for r in wave) else st
        # rows held on the device across passes when they fit the budget; otherwise streamed (flat memory)
        rows = Rows(mine, int(source.n_features), group_st, device, shift,
                    keep=sum(_bytes(mine, groups[gi]) for gi in range(a, b)) <= st.cache_bytes)

        def on_pass(p: int, active: list[int], wave: list[GroupResult] = wave, a: int = a,
                    state: State = state) -> None:
            done = all(_finished(r, st) for r in wave)
            # saved before the progress call, which may be where an interruption lands
            if checkpoint_path is not None and is_writer() and (done or (p + 1) % st.checkpoint_every == 0):
                _unstack(state, wave)
                _save_checkpoint(checkpoint_path, results + wave, a, p + 1, st, fingerprint)
            for gi in active:  # the passes a converged group will not make leave the total: no leap at the end
                if wave[gi].converged:
                    planned[0] -= st.iterations - p - 1
            advance(len(active), total=planned[0], note=_pass_note(wave, a, p, len(groups), st.tol))

        _run_passes(rows, wave, [groups[gi] for gi in range(a, b)], state, group_st, update, device,
                    start_pass, on_pass)
        _unstack(state, wave)
        for r in wave:
            r.alpha = st.alpha
        results.extend(wave)
        start_pass = 0
    return results


def history_of(results: list[GroupResult], source: RowSource) -> list[dict[str, Any]]:
    return [{"classes": [source.classes[y] for y in r.classes], "passes": len(r.history),
             "converged": r.converged, "subsample": r.subsample, "loss": r.history} for r in results]
