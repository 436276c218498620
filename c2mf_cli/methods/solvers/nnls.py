"""Batched non-negative least squares on the device: the code step of every NNLS-based method.

Notation: A (n, c) activations, W (k, c) dictionary, U (n, k) codes. We solve, row by row,

    U = argmin_{U >= 0} ||A - U W||^2 + ridge * ||U||^2

in the Gram form: with G = W W^T + ridge * I (k, k) and B = A W^T (n, k) the objective is
`const - 2 <U, B> + <U^T U, G>`, so the (n, c) product U W is never formed. Rows are independent, so the
answer does not depend on how rows are batched (streaming and full batch agree exactly).

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


def _start(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Clamped least-squares start max(0, B G^-1); a tiny jitter keeps a rank-deficient G solvable."""
    k = G.shape[0]
    jitter = 1e-6 * (torch.trace(G) / k).clamp_min(1e-12)
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    U = torch.linalg.solve(G + jitter * eye, B.T).T
    return U.clamp_min_(0.0)


def nnls_gram(
    G: torch.Tensor,
    B: torch.Tensor,
    *,
    iters: int = 20,
    solver: Solver = "hals",
    U0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve min_{U>=0} <U^T U, G> - 2 <U, B> for every row of B at once.

    Args:
        G: (k, k) Gram matrix W W^T (+ ridge I), symmetric positive semi-definite.
        B: (n, k) right-hand sides A W^T.
        iters: HALS sweeps or FISTA steps.
        solver: "hals" (coordinate descent, fast per sweep in k) or "fista".
        U0: optional warm start (n, k); default the clamped least-squares solution.
    """
    if solver not in SOLVERS:
        raise C2MFError(f"unknown NNLS solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    U = _start(G, B) if U0 is None else U0.clamp_min(0.0).clone()
    if solver == "hals":
        diag = torch.diagonal(G).tolist()
        active = [j for j in range(G.shape[0]) if diag[j] > 0]
        rows = max(512, 262144 // max(1, G.shape[0]))  # a block of codes (~1 MB) stays in cache for all sweeps
        out = torch.empty_like(U)
        for s in range(0, U.shape[0], rows):
            # codes stored transposed (k, rows): each column update reads and writes contiguous memory
            Ut, Bt = U[s : s + rows].T.contiguous(), B[s : s + rows].T.contiguous()
            for j in range(G.shape[0]):
                if j not in active:
                    Ut[j] = 0.0
            for _ in range(iters):
                for j in active:
                    # exact minimisation over column j with the others fixed
                    r = Bt[j] - G[j] @ Ut
                    Ut[j].add_(r, alpha=1.0 / diag[j]).clamp_(min=0.0)
            out[s : s + rows] = Ut.T
        return out
    # FISTA with step 1/L, L = largest eigenvalue of G
    L = float(torch.linalg.eigvalsh(G)[-1].clamp_min(1e-12))
    Y, t = U.clone(), 1.0
    for _ in range(iters):
        U_next = (Y - (Y @ G - B) / L).clamp_min_(0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        Y = U_next + ((t - 1.0) / t_next) * (U_next - U)
        U, t = U_next, t_next
    return U


def nnls(
    A: torch.Tensor,
    W: torch.Tensor,
    *,
    ridge: float = 0.0,
    iters: int = 50,
    solver: Solver = "hals",
    batch_size: int = 65536,
) -> torch.Tensor:
    """Codes U >= 0 minimising ||A - U W||^2 + ridge ||U||^2, computed in row batches on W's device.

    Args:
        A: (n, c) activations.
        W: (k, c) dictionary.
        ridge: ridge weight on the codes (0 for plain NNLS).
        iters: solver iterations per batch.
        solver: "hals" or "fista".
        batch_size: rows per batch (bounds memory; the answer does not depend on it).
    """
    G = gram(W, ridge)
    out = []
    for s in range(0, A.shape[0], batch_size):
        a = A[s : s + batch_size].to(device=W.device, dtype=W.dtype)
        out.append(nnls_gram(G, a @ W.T, iters=iters, solver=solver))
    if not out:
        return torch.zeros((0, W.shape[0]), dtype=W.dtype, device=W.device)
    return torch.cat(out)
