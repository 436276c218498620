"""Batched non-negative least squares on the device: the code step of every NNLS-based method.

Notation: A (n, c) activations, W (k, c) dictionary, U (n, k) codes. We solve, row by row,

    U = argmin_{U >= 0} ||A - U W||^2 + ridge * ||U||^2

in the Gram form: with G = W W^T + ridge * I (k, k) and B = A W^T (n, k) the objective is
`const - 2 <U, B> + <U^T U, G>`, so the (n, c) product U W is never formed. Rows are independent, so the
answer does not depend on how rows are batched (streaming and full batch agree exactly), except where `tol`
stops a batch early (`nnls`, the codes of a fitted dictionary): then within tol.

Two solvers share one start (the unconstrained least-squares solution clamped at 0, usually close):
HALS (exact coordinate descent over the k columns; few sweeps) and FISTA (accelerated projected gradient;
one (n, k) x (k, k) product per step).
"""

from __future__ import annotations

from typing import Literal

import torch

from ...errors import C2MFError

Solver = Literal["hals", "fista"]
SOLVERS: tuple[str, ...] = ("hals", "fista")


def gram(W: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """G = W W^T + ridge * I, the (k, k) matrix every NNLS step uses."""
    G = W @ W.T
    if ridge:
        G = G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return G


CODE_BLOCK_ELEMENTS = 1 << 18  # codes (rows x k) per HALS block on the CPU (~1 MB): stays in cache for all sweeps
CODE_BLOCK_ELEMENTS_GPU = 1 << 22  # on a GPU the cost is kernel launches, not cache: larger blocks


def code_block_elements(device: torch.device) -> int:
    """How many codes (rows x k, over every problem of a batch) one call of `nnls_gram_batched` should hold."""
    return CODE_BLOCK_ELEMENTS if device.type == "cpu" else CODE_BLOCK_ELEMENTS_GPU


def _start(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Clamped least-squares start max(0, B G^-1) per problem; a tiny jitter keeps a rank-deficient G solvable."""
    k = G.shape[-1]
    jitter = 1e-6 * (torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / k).clamp_min(1e-12)
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    U = torch.linalg.solve(G + jitter[:, None, None] * eye, B.mT).mT
    return U.clamp_min_(0.0)


def hals_scaled(G: torch.Tensor, Bt: torch.Tensor, *, keep_unused: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The form a HALS step reads: row j of G (b, k, k) and of Bt (b, k, n) divided by G_jj, G negated off the
    diagonal. Then the exact minimiser over row j of X, the others fixed, is max(0, Bt'_j + G'_j X): one fused
    product, the diagonal term (0 in G') dropping out. A row with G_jj = 0 (a concept nothing uses) has nothing to
    minimise: Bt'_j = 0, and G'_jj = 0 sets it to 0 (codes) or, with keep_unused, G'_jj = 1 keeps it (a
    dictionary row). Returns (G', Bt', used rows (b, k))."""
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    used = diag > 0
    inv = torch.where(used, 1.0 / torch.where(used, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    G_off = G * -inv[..., None]
    torch.diagonal(G_off, dim1=-2, dim2=-1).copy_(~used if keep_unused else torch.zeros_like(used))
    return G_off, (Bt * inv[..., None]).contiguous(), used


def hals_sweeps(X: torch.Tensor, G_off: torch.Tensor, Bt: torch.Tensor, sweeps: int) -> None:
    """HALS in place on X (b, k, n), row after row: X_j = max(0, Bt_j + G_off_j X), with the scaled G_off and
    Bt of `hals_scaled`. Two kernels per row for all b problems (no per-problem or per-element Python)."""
    rows = [(G_off[:, j : j + 1], Bt[:, j : j + 1], X[:, j : j + 1]) for j in range(X.shape[1])]
    tmp = torch.empty_like(X[:, :1])
    for _ in range(sweeps):
        for g, bt, x in rows:
            torch.baddbmm(bt, g, X, out=tmp)
            torch.clamp(tmp, min=0.0, out=x)


def _settled(U: torch.Tensor, before: torch.Tensor, tol: float) -> bool:
    """Whether a step moved no code by more than tol times the largest code (one host sync)."""
    moved, top = torch.stack([(U - before).abs().amax(), U.amax()]).tolist() if U.numel() else (0.0, 0.0)
    return moved <= tol * top


def nnls_gram_batched(G: torch.Tensor, B: torch.Tensor, *, iters: int = 20, solver: Solver = "hals",
                      tol: float = 0.0) -> torch.Tensor:
    """Solve b independent problems min_{U_e>=0} <U_e^T U_e, G_e> - 2 <U_e, B_e> at once (one kernel per step for
    all of them, not one per problem: many small classes cost a few launches, not thousands).

    Args:
        G: (b, k, k) Gram matrices W_e W_e^T (+ ridge I), symmetric positive semi-definite.
        B: (b, n, k) right-hand sides A_e W_e^T; rows of zeros (padding) get zero codes exactly.
        iters: HALS sweeps or FISTA steps (at most, with `tol`).
        solver: "hals" (coordinate descent, fast per sweep in k) or "fista".
        tol: stop early once a sweep (step) moves no code by more than tol times the largest code; 0 runs all
            `iters` (the fit's code step: a fixed amount of work per pass).
    Returns:
        U (b, n, k) >= 0.
    """
    if solver not in SOLVERS:
        raise C2MFError(f"unknown NNLS solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    U = _start(G, B)
    if solver == "hals":
        G_off, Bt, used = hals_scaled(G, B.mT)
        # codes stored transposed (b, k, n): each column update reads and writes contiguous memory
        Ut = U.mT.contiguous().mul_(used[:, :, None])
        if tol > 0:  # a sweep at a time, stopping once settled
            for _ in range(iters):
                before = Ut.clone()
                hals_sweeps(Ut, G_off, Bt, 1)
                if _settled(Ut, before, tol):
                    break
        else:
            hals_sweeps(Ut, G_off, Bt, iters)
        return Ut.mT
    # FISTA with step 1/L, L = largest eigenvalue of each G
    L = torch.linalg.eigvalsh(G)[:, -1].clamp_min(1e-12)[:, None, None]
    Y, t = U.clone(), 1.0
    for _ in range(iters):
        U_next = (Y - (torch.bmm(Y, G) - B) / L).clamp_min_(0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        Y = U_next + ((t - 1.0) / t_next) * (U_next - U)
        U, t, before = U_next, t_next, U
        if tol > 0 and _settled(U, before, tol):
            break
    return U


def nnls_gram(G: torch.Tensor, B: torch.Tensor, *, iters: int = 20, solver: Solver = "hals",
              tol: float = 0.0) -> torch.Tensor:
    """Solve min_{U>=0} <U^T U, G> - 2 <U, B> for every row of B (n, k) with one G (k, k), in blocks of rows
    that stay in cache for all sweeps."""
    rows = max(512, code_block_elements(B.device) // max(1, G.shape[0]))
    out = torch.empty_like(B)
    for s in range(0, B.shape[0], rows):
        out[s : s + rows] = nnls_gram_batched(G[None], B[None, s : s + rows], iters=iters, solver=solver,
                                                   tol=tol)[0]
    return out


CODE_TOL = 1e-7
"""Where `nnls` (the codes of a fitted dictionary) stops: no code moved by more than this fraction of the largest
in a sweep. From the clamped least-squares start HALS gets there in a few sweeps (1-4 on the CUB bird model's
head_conv, codes within 1e-7 of 1,000 sweeps), not the 50-100 of `iters`, which now only bounds the work."""


def nnls(
    A: torch.Tensor,
    W: torch.Tensor,
    *,
    ridge: float = 0.0,
    iters: int = 50,
    solver: Solver = "hals",
    batch_size: int = 65536,
    tol: float = CODE_TOL,
) -> torch.Tensor:
    """Codes U >= 0 minimising ||A - U W||^2 + ridge ||U||^2, computed in row batches on W's device.

    Args:
        A: (n, c) activations.
        W: (k, c) dictionary.
        ridge: ridge weight on the codes (0 for plain NNLS).
        iters: solver iterations per batch, at most.
        solver: "hals" or "fista".
        batch_size: rows per batch (bounds memory; the answer depends on it only within `tol`).
        tol: stop a batch once a sweep moves no code by more than tol times the largest (0: all `iters`).
    """
    G = gram(W, ridge)
    out = []
    for s in range(0, A.shape[0], batch_size):
        a = A[s : s + batch_size].to(device=W.device, dtype=W.dtype)
        out.append(nnls_gram(G, a @ W.T, iters=iters, solver=solver, tol=tol))
    if not out:
        return torch.zeros((0, W.shape[0]), dtype=W.dtype, device=W.device)
    return torch.cat(out)
