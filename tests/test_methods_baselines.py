"""NMF / CRAFT against scikit-learn's NMF objective, PCA against numpy's SVD, shared vs per-class shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import NMF as SkNMF

from c2mf_cli.methods import basis, decode, encode
from c2mf_cli.stages.factorize import factorize
from c2mf_cli.artifacts.sources import ArraySource


pytestmark = pytest.mark.usefixtures("one_thread")


def _nonneg(seed: int, n: int = 400, c: int = 30, k: int = 5, noise: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.exponential(1.0, (n, k)) @ rng.random((k, c)) + noise * rng.random((n, c))).astype(np.float32)


def _frob_error(d, A: np.ndarray, y: int) -> float:
    return float(np.linalg.norm(A - decode(d, encode(d, A, y, iters=300), y)))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("method,mode", [("nmf", "full"), ("craft", "crops")])
@pytest.mark.parametrize("seed", [0, 1])
def test_nmf_matches_sklearn_objective(method, mode, seed):
    A = _nonneg(seed)
    d = factorize(ArraySource([A], mode=mode), method, concepts=5, iterations=200, tol=1e-7, batch_size=None,
                  device="cpu")
    ours = _frob_error(d, A, 0)
    hist = d.meta["history"][0]["loss"][-1]["relative_error"]
    assert hist == pytest.approx(ours / np.linalg.norm(A), rel=1e-2)  # the history measures the same thing
    sk = SkNMF(n_components=5, init="nndsvda", solver="cd", max_iter=1000, tol=1e-6, random_state=0).fit(A)
    assert ours <= 1.03 * sk.reconstruction_err_, (ours, sk.reconstruction_err_)


def test_pca_matches_numpy_svd_per_class_and_global():
    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal((300, 12)) * np.linspace(3, 0.1, 12) + i).astype(np.float32) for i in range(2)]
    src = ArraySource(arrays, classes=["a", "b"])
    per = factorize(src, "pca", concepts=4, batch_size=64, device="cpu")
    glob = factorize(src, "pca", concepts=4, batch_size=64, shared=True, device="cpu")
    assert per.tensors["W"].shape == (2, 4, 12) and glob.tensors["W"].shape == (4, 12)
    for W, mean, A in [(per.tensors["W"][0], per.tensors["mean"][0], arrays[0]),
                       (per.tensors["W"][1], per.tensors["mean"][1], arrays[1]),
                       (glob.tensors["W"], glob.tensors["mean"], np.concatenate(arrays))]:
        A64 = A.astype(np.float64)
        _, s, Vt = np.linalg.svd(A64 - A64.mean(0), full_matrices=False)
        np.testing.assert_allclose(mean.numpy(), A64.mean(0), atol=1e-4)
        cos = np.abs(np.sum(W.numpy() * Vt[:4], axis=1))
        assert cos.min() > 0.999, cos
    # codes are the projections of the centred data
    U = encode(per, arrays[0], 0)
    np.testing.assert_allclose(U, (arrays[0] - per.tensors["mean"][0].numpy()) @ per.tensors["W"][0].numpy().T,
                               atol=1e-4)
    ev = per.meta["history"][0]["loss"][0]["explained_variance_ratio"]
    A64 = arrays[0].astype(np.float64)
    s = np.linalg.svd(A64 - A64.mean(0), compute_uv=False)
    assert ev == pytest.approx((s[:4] ** 2).sum() / (s**2).sum(), rel=1e-4)


@pytest.mark.parametrize("method", ["nmf", "semi-nmf"])
def test_shared_and_per_class_dictionaries(method):
    arrays = [_nonneg(s, n=150) for s in range(3)]
    src = ArraySource(arrays, classes=["a", "b", "c"])
    per = factorize(src, method, concepts=4, iterations=20, device="cpu")
    shared = factorize(src, method, concepts=4, iterations=20, shared=True, device="cpu")
    assert per.per_class and per.tensors["W"].shape == (3, 4, 30)
    assert not shared.per_class and shared.tensors["W"].shape == (4, 30)
    assert basis(shared).shape == (4, 30)  # no class needed for a shared dictionary without gates
    assert len(per.meta["history"]) == 3 and len(shared.meta["history"]) == 1


def test_semi_nmf_fits_signed_data_with_nonneg_codes():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 20))
    A = (rng.exponential(1.0, (300, 4)) @ W + 0.01 * rng.standard_normal((300, 20))).astype(np.float32)
    d = factorize(ArraySource([A]), "semi-nmf", concepts=4, iterations=100, batch_size=None, device="cpu")
    assert (d.tensors["W"] < 0).any()
    assert d.meta["history"][0]["loss"][-1]["relative_error"] < 0.05


def test_pca_top_eigenvectors_of_a_wide_layer_match_numpy():
    """Above 512 channels the leading eigenvectors come from a seeded randomized subspace iteration."""
    from c2mf_cli.methods.solvers.lowrank import EXACT_EIGH_MAX_CHANNELS as _EXACT_EIGH_MAX_CHANNELS
    from c2mf_cli.methods.solvers.lowrank import top_eigenvectors as _top_eigenvectors

    c = _EXACT_EIGH_MAX_CHANNELS + 188
    g = torch.Generator().manual_seed(0)
    X = torch.randn(900, 40, generator=g) @ torch.randn(40, c, generator=g) + 0.3 * torch.randn(900, c, generator=g)
    cov = (X.T @ X).double() / 900
    W, top = _top_eigenvectors(cov, 10)
    evals, evecs = np.linalg.eigh(cov.numpy())
    ref = evecs[:, ::-1][:, :10]
    np.testing.assert_allclose(np.abs(np.diag(W.numpy() @ ref)), 1.0, atol=1e-6)
    np.testing.assert_allclose(top.numpy(), evals[::-1][:10], rtol=1e-6)
    W2, _ = _top_eigenvectors(cov, 10)
    assert torch.equal(W, W2)  # seeded: reproducible
