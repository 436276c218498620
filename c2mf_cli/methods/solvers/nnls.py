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


def nnls_gram_batched(G: torch.Tensor, B: torch.Tensor, *, iters: int = 20, solver: Solver = "hals") -> torch.Tensor:
    """Solve b independent problems min_{U_e>=0} <U_e^T U_e, G_e> - 2 <U_e, B_e> at once (one kernel per step for
    all of them, not one per problem: many small classes cost a few launches, not thousands).

    Args:
        G: (b, k, k) Gram matrices W_e W_e^T (+ ridge I), symmetric positive semi-definite.
        B: (b, n, k) right-hand sides A_e W_e^T; rows of zeros (padding) get zero codes exactly.
        iters: HALS sweeps or FISTA steps.
        solver: "hals" (coordinate descent, fast per sweep in k) or "fista".
    Returns:
        U (b, n, k) >= 0.
    """
    if solver not in SOLVERS:
        raise C2MFError(f"unknown NNLS solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    U = _start(G, B)
    if solver == "hals":
        diag = torch.diagonal(G, dim1=1, dim2=2)
        # a concept with a zero row in G (a zero dictionary row, no ridge) keeps code 0: its step is multiplied by 0
        used = diag > 0
        inv = torch.where(used, 1.0 / torch.where(used, diag, torch.ones_like(diag)), torch.zeros_like(diag))
        # codes stored transposed (b, k, n): each column update reads and writes contiguous memory
        Ut = U.mT.contiguous().mul_(used[:, :, None])
        Bt = B.mT.contiguous()
        for _ in range(iters):
            for j in range(G.shape[1]):
                # exact minimisation over column j with the others fixed, for every problem at once
                if len(G) == 1:  # one problem (a large class): a matrix-vector product beats a batch of one
                    r = Bt[0, j] - G[0, j] @ Ut[0]
                else:
                    r = Bt[:, j] - torch.bmm(G[:, j : j + 1], Ut)[:, 0]
                Ut[:, j].addcmul_(r, inv[:, j : j + 1]).clamp_(min=0.0)
        return Ut.mT
    # FISTA with step 1/L, L = largest eigenvalue of each G
    L = torch.linalg.eigvalsh(G)[:, -1].clamp_min(1e-12)[:, None, None]
    Y, t = U.clone(), 1.0
    for _ in range(iters):
        U_next = (Y - (torch.bmm(Y, G) - B) / L).clamp_min_(0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        Y = U_next + ((t - 1.0) / t_next) * (U_next - U)
        U, t = U_next, t_next
    return U


def nnls_gram(G: torch.Tensor, B: torch.Tensor, *, iters: int = 20, solver: Solver = "hals") -> torch.Tensor:
    """Solve min_{U>=0} <U^T U, G> - 2 <U, B> for every row of B (n, k) with one G (k, k), in blocks of rows
    that stay in cache for all sweeps."""
    rows = max(512, code_block_elements(B.device) // max(1, G.shape[0]))
    out = torch.empty_like(B)
    for s in range(0, B.shape[0], rows):
        out[s : s + rows] = nnls_gram_batched(G[None], B[None, s : s + rows], iters=iters, solver=solver)[0]
    return out


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
