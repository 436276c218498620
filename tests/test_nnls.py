"""Batched NNLS (methods/nnls.py) against scipy.optimize.nnls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from c2mf_cli.errors import C2MFError
from c2mf_cli.methods.solvers.nnls import gram, nnls, nnls_gram, nnls_gram_batched


def _problem(seed: int, n: int = 40, k: int = 6, c: int = 20):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((k, c)).astype(np.float32)
    A = (np.maximum(rng.standard_normal((n, k)), 0) @ W + 0.3 * rng.standard_normal((n, c))).astype(np.float32)
    return A, W


@pytest.mark.parametrize("solver,iters", [("hals", 200), ("fista", 2000)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_scipy(solver, iters, seed):
    A, W = _problem(seed)
    U = nnls(torch.from_numpy(A), torch.from_numpy(W), iters=iters, solver=solver).numpy()
    ref = np.stack([scipy_nnls(W.T.astype(np.float64), a.astype(np.float64))[0] for a in A])
    assert (U >= 0).all()
    np.testing.assert_allclose(U, ref, atol=2e-3, rtol=2e-3)


def test_ridge_matches_augmented_scipy():
    A, W = _problem(2)
    beta = 0.5
    U = nnls(torch.from_numpy(A), torch.from_numpy(W), ridge=beta, iters=300).numpy()
    # ||a - u W||^2 + beta ||u||^2 = || [a, 0] - u [W, sqrt(beta) I] ||^2
    Waug = np.concatenate([W, np.sqrt(beta) * np.eye(W.shape[0])], 1).astype(np.float64)
    ref = np.stack([scipy_nnls(Waug.T, np.concatenate([a, np.zeros(W.shape[0])]))[0] for a in A])
    np.testing.assert_allclose(U, ref, atol=2e-3, rtol=2e-3)


def test_rows_are_independent_of_batching():
    A, W = _problem(3, n=100)
    At, Wt = torch.from_numpy(A), torch.from_numpy(W)
    whole = nnls(At, Wt, iters=30, batch_size=1000)
    pieces = nnls(At, Wt, iters=30, batch_size=7)
    torch.testing.assert_close(whole, pieces, atol=1e-5, rtol=1e-5)


def test_rank_deficient_dictionary_and_zero_row():
    A, W = _problem(4)
    W[2] = 0.0  # a dead concept: its codes must be 0, not NaN
    U = nnls(torch.from_numpy(A), torch.from_numpy(W), iters=50)
    assert torch.isfinite(U).all() and (U[:, 2] == 0).all()


def test_unknown_solver_is_an_error():
    A, W = _problem(5)
    G = gram(torch.from_numpy(W))
    with pytest.raises(C2MFError, match="unknown NNLS solver 'cg'"):
        nnls_gram(G, torch.from_numpy(A) @ torch.from_numpy(W).T, solver="cg")  # type: ignore[arg-type]


def test_batched_problems_padded_with_zero_rows_equal_one_at_a_time():
    """Several problems in one solve (each its own G), shorter ones padded with zero rows: each gets its own
    answer, and the padding rows get codes of exactly 0."""
    problems = [_problem(s, n=n) for s, n in ((6, 30), (7, 12), (8, 25))]
    G = torch.stack([gram(torch.from_numpy(W), 0.1) for _, W in problems])
    B = torch.zeros(3, 30, 6)
    for e, (A, W) in enumerate(problems):
        B[e, : A.shape[0]] = torch.from_numpy(A) @ torch.from_numpy(W).T
    for solver in ("hals", "fista"):
        U = nnls_gram_batched(G, B, iters=40, solver=solver)
        for e, (A, W) in enumerate(problems):
            alone = nnls(torch.from_numpy(A), torch.from_numpy(W), ridge=0.1, iters=40, solver=solver)
            torch.testing.assert_close(U[e, : A.shape[0]], alone, atol=1e-5, rtol=1e-5)
            assert (U[e, A.shape[0] :] == 0).all()


def test_dictionary_hals_is_the_exact_row_by_row_minimiser():
    """update_nmf (two fused kernels per row for every dictionary at once) makes the textbook HALS steps
    W_j = max(0, W_j + (R_j - S_j W) / S_jj), row after row, for each dictionary; a row no code uses (S_jj = 0)
    stays as it is, and the objective <S, W W^T> - 2 <R, W> does not rise."""
    from c2mf_cli.methods._alternating import Stats
    from c2mf_cli.methods._factorization import update_nmf

    gen = torch.Generator().manual_seed(0)
    U = torch.rand(3, 30, 5, generator=gen)
    U[1, :, 2] = 0.0  # concept 2 of dictionary 1 is unused
    A = torch.rand(3, 30, 12, generator=gen)
    S, R = torch.bmm(U.mT, U), torch.bmm(U.mT, A)
    W0 = torch.rand(3, 5, 12, generator=gen)
    ref = W0.clone()
    for g in range(3):
        for _ in range(4):
            for j in range(5):
                if S[g, j, j] > 0:
                    ref[g, j] = (ref[g, j] + (R[g, j] - S[g, j] @ ref[g]) / S[g, j, j]).clamp_min(0.0)
    state = {"W": W0.clone()}
    update_nmf(state, Stats(S, R, torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)),
               torch.ones(3), sweeps=4)
    torch.testing.assert_close(state["W"], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(state["W"][1, 2], W0[1, 2])

    def objective(W: torch.Tensor) -> torch.Tensor:
        return (S * torch.bmm(W, W.mT)).sum((1, 2)) - 2 * (R * W).sum((1, 2))

    assert (objective(state["W"]) <= objective(W0) + 1e-4).all()


@pytest.mark.parametrize("solver", ["hals", "fista"])
def test_codes_stop_when_settled(monkeypatch, solver):
    """`nnls` (codes of a fitted dictionary) stops once a sweep moves no code by more than tol of the largest:
    far fewer sweeps than `iters`, the same codes as running them all to float tolerance; tol = 0 runs them all."""
    import c2mf_cli.methods.solvers.nnls as mod

    A, W = _problem(11, n=60)
    At, Wt = torch.from_numpy(A), torch.from_numpy(W)
    checks = []
    settled = mod._settled
    monkeypatch.setattr(mod, "_settled", lambda U, before, tol: checks.append(tol) or settled(U, before, tol))
    iters = 300
    early = nnls(At, Wt, ridge=0.1, iters=iters, solver=solver)
    assert 0 < len(checks) < iters and set(checks) == {mod.CODE_TOL}
    checks.clear()
    full = nnls(At, Wt, ridge=0.1, iters=iters, solver=solver, tol=0.0)
    assert checks == []
    torch.testing.assert_close(early, full, atol=1e-4, rtol=1e-4)
