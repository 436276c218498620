"""C2MF on planted ground truth: recovery of the dictionary and of each class's concepts, alpha's control,
checkpoint and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from c2mf_cli.errors import C2MFError
from c2mf_cli.methods import concepts_used
from c2mf_cli.stages.factorize import factorize
from c2mf_cli.artifacts.sources import ArraySource

SUBSETS = [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 0]]  # overlapping: concepts are shared between classes
ALPHAS = [0.0, 0.01, 0.05, 0.2, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(seed: int = 0, c: int = 64, k: int = 8, n: int = 800, noise: float = 0.05):
    """A(y) = U(y) W[S_y] + noise with a known signed, unit-norm W and known subsets S_y."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((k, c))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    arrays = []
    for s in SUBSETS:
        U = np.zeros((n, k))
        U[:, s] = rng.exponential(1.0, (n, len(s))) * (rng.random((n, len(s))) < 0.6)
        arrays.append((U @ W + noise * rng.standard_normal((n, c))).astype(np.float32))
    return ArraySource(arrays, classes=[f"class{i}" for i in range(len(SUBSETS))]), W


def matched(W_learned: np.ndarray, W_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching on |cosine|: (|cosine| per true concept, learned index of each true concept)."""
    C = np.abs(W_learned @ W_true.T) / np.outer(np.linalg.norm(W_learned, axis=1), np.linalg.norm(W_true, axis=1))
    rows, cols = linear_sum_assignment(-C)
    learned_of_true = np.empty(W_true.shape[0], int)
    learned_of_true[cols] = rows
    return C[rows, cols][np.argsort(cols)], learned_of_true


@pytest.fixture(scope="module")
def sweep():
    torch.set_num_threads(1)
    src, W = planted()
    fits = {a: factorize(src, "c2mf", concepts=8, alpha=a, batch_size=None, iterations=60, tol=1e-4, device="cpu")
            for a in ALPHAS + ["auto"]}
    return src, W, fits


@pytest.mark.parametrize("alpha", [0.05, "auto"])
def test_recovers_dictionary_and_class_subsets(sweep, alpha):
    _, W, fits = sweep
    d = fits[alpha]
    cos, learned_of_true = matched(d.tensors["W"].numpy(), W)
    assert cos.min() > 0.95, cos
    true_of_learned = {int(l): t for t, l in enumerate(learned_of_true)}
    for y, subset in enumerate(SUBSETS):
        used = sorted(true_of_learned[j] for j in concepts_used(d, y))
        assert used == sorted(subset), (y, used)


def test_concepts_used_fall_monotonically_with_alpha(sweep):
    _, _, fits = sweep
    counts = [sum(len(concepts_used(fits[a], y)) for y in range(len(SUBSETS))) for a in ALPHAS]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] == 8 * len(SUBSETS) and counts[-1] < counts[0] and counts[2] == 12


def test_auto_alpha_is_a_fraction_of_an_average_concepts_energy(sweep):
    src, _, fits = sweep
    how = fits["auto"].meta["alpha"]
    X = np.concatenate([src.load(y) for y in range(len(SUBSETS))]).astype(np.float64)
    sv2 = np.linalg.svd(X, compute_uv=False) ** 2
    e_k = sv2[:8].sum() / sv2.sum()  # the planted data is rank 8 plus noise: E_8 is close to 1
    assert how["rule"].startswith("auto") and how["energy_k"] == pytest.approx(e_k, abs=0.01)
    assert how["alpha"] == pytest.approx(how["alpha_scale"] * how["energy_k"] / 8)
    assert fits["auto"].meta["config"]["alpha"] == "auto"
    assert fits[0.05].meta["alpha"] == {"rule": "given", "alpha": 0.05}


def test_rank_k_energy_matches_svd():
    from c2mf_cli.methods.solvers.lowrank import rank_k_energy

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 40, generator=g) @ torch.randn(40, 200, generator=g) + torch.randn(3000, 200, generator=g)
    sv2 = torch.linalg.svdvals(X.double()) ** 2
    for k in (1, 5, 25):
        assert rank_k_energy(X, k, seed=0) == pytest.approx(float(sv2[:k].sum() / sv2.sum()), rel=1e-2)
    assert rank_k_energy(X, 5, seed=3) == rank_k_energy(X, 5, seed=3)  # seeded


def test_loss_history_is_recorded_and_decreases_after_warmup(sweep):
    _, _, fits = sweep
    hist = fits[0.05].meta["history"][0]
    losses = [r["objective"] for r in hist["loss"]]
    warm = fits[0.05].meta["config"]["warmup"]
    tail = losses[warm + 1 :]
    assert all(b <= a + 1e-6 * abs(a) for a, b in zip(tail, tail[1:]))
    assert hist["converged"] and hist["passes"] < 60


def test_scale_is_fixed_unit_rows_and_gates_near_one():
    src, _ = planted(seed=1, n=300)
    d = factorize(src, "c2mf", concepts=8, alpha=0.05, batch_size=None, iterations=40, device="cpu")
    torch.testing.assert_close(d.tensors["W"].norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    g = torch.sigmoid(d.tensors["gates"])
    open_gates = g[g > 0.5]
    assert open_gates.numel() > 0 and float(open_gates.min()) > 0.7  # used concepts are cheap near 1


class _Interrupt(Exception):
    pass


def _stop_after(n_passes: int):
    def progress(description, total):
        seen = [0]

        def advance(k=1, *, total=None, note=None):
            seen[0] += k
            if seen[0] >= n_passes:
                raise _Interrupt

        return advance

    return progress


def test_checkpoint_and_resume_continue_exactly(tmp_path: Path):
    src, _ = planted(seed=2, n=200)
    opts = dict(concepts=8, alpha=0.05, batch_size=128, iterations=14, tol=0.0, checkpoint_every=3, device="cpu")
    ref = factorize(src, "c2mf", **opts)
    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(_Interrupt):
        factorize(src, "c2mf", checkpoint_path=ckpt, progress=_stop_after(8), **opts)
    assert ckpt.exists() and not list(tmp_path.glob("*.tmp"))
    resumed = factorize(src, "c2mf", checkpoint_path=ckpt, resume=True, **opts)
    # the same trajectory, bit for bit
    assert torch.equal(resumed.tensors["W"], ref.tensors["W"])
    assert torch.equal(resumed.tensors["gates"], ref.tensors["gates"])
    assert resumed.meta["history"][0]["passes"] == 14
    with pytest.raises(C2MFError, match="other settings or data"):
        factorize(src, "c2mf", checkpoint_path=ckpt, resume=True, **dict(opts, alpha=0.1))
    with pytest.raises(C2MFError, match="no checkpoint"):
        factorize(src, "c2mf", checkpoint_path=tmp_path / "none.ckpt", resume=True, **opts)


def test_resume_keeps_the_auto_alpha(tmp_path: Path):
    src, _ = planted(seed=2, n=200)
    opts = dict(concepts=8, batch_size=128, iterations=8, tol=0.0, checkpoint_every=2, warmup=2, device="cpu")
    ref = factorize(src, "c2mf", **opts)
    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(_Interrupt):
        factorize(src, "c2mf", checkpoint_path=ckpt, progress=_stop_after(4), **opts)
    resumed = factorize(src, "c2mf", checkpoint_path=ckpt, resume=True, **opts)
    assert resumed.meta["alpha"]["alpha"] == ref.meta["alpha"]["alpha"]
    assert torch.equal(resumed.tensors["W"], ref.tensors["W"])


def test_bad_settings():
    src, _ = planted(n=50)
    with pytest.raises(C2MFError, match="--beta must be > 0"):
        factorize(src, "c2mf", concepts=4, beta=0.0, device="cpu")
    with pytest.raises(C2MFError, match="--alpha must be >= 0"):
        factorize(src, "c2mf", concepts=4, alpha=-1.0, device="cpu")
    with pytest.raises(C2MFError, match="--alpha must be 'auto' or a number"):
        factorize(src, "c2mf", concepts=4, alpha="big", device="cpu")
    with pytest.raises(C2MFError, match="--alpha-scale must be >= 0"):
        factorize(src, "c2mf", concepts=4, alpha_scale=-0.1, device="cpu")


@pytest.mark.parametrize("method", ["c2mf", "semi-nmf"])
def test_resume_over_a_chain_of_interruptions_is_bit_identical(tmp_path: Path, method: str):
    # tol > 0: the pass at which the fit converges must not move either
    src, _ = planted(seed=3, n=240)
    opts = dict(concepts=6, batch_size=96, iterations=16, tol=1e-4, checkpoint_every=1, device="cpu")
    if method == "c2mf":
        opts.update(alpha=0.05, warmup=2)
    ref = factorize(src, method, **opts)
    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(_Interrupt):
        factorize(src, method, checkpoint_path=ckpt, progress=_stop_after(3), **opts)
    for _ in range(3):
        with pytest.raises(_Interrupt):
            factorize(src, method, checkpoint_path=ckpt, resume=True, progress=_stop_after(2), **opts)
    resumed = factorize(src, method, checkpoint_path=ckpt, resume=True, **opts)
    assert resumed.meta["history"][0]["passes"] == ref.meta["history"][0]["passes"]
    assert set(resumed.tensors) == set(ref.tensors)
    for name, t in ref.tensors.items():
        assert torch.equal(resumed.tensors[name], t), name
