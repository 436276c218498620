"""Grad-CAM, Integrated Gradients and insertion/deletion on heads whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from c2mf_cli.errors import C2MFError
from c2mf_cli.metrics import gradcam, insertion_deletion, integrated_gradients, ranking
from c2mf_cli.metrics.insertion import step_masks


def linear_head(M: torch.Tensor, b: torch.Tensor):
    """logits = mean_p U[p] @ M + b."""
    return lambda U: U.mean(dim=1) @ M + b


def test_gradcam_linear_head_by_hand():
    # P = 2 positions, k = 2 concepts, 2 classes; logit_0 = mean_p (2 U0 - U1)
    M = torch.tensor([[2.0, 0.0], [-1.0, 1.0]])
    U = torch.tensor([[[1.0, 4.0], [3.0, 0.0]]])  # mean_p U = [2, 2]
    imp = gradcam(U, linear_head(M, torch.zeros(2)), torch.tensor([0]))
    # d logit_0 / d U[p, j] = M[j, 0] / P -> weights [1, -0.5]; importance = weight * mean_p U
    torch.testing.assert_close(imp, torch.tensor([[2.0, -1.0]]))


def test_integrated_gradients_linear_is_exact():
    torch.manual_seed(0)
    M, b = torch.randn(5, 3), torch.randn(3)
    U = torch.rand(4, 6, 5)
    t = torch.tensor([0, 1, 2, 1])
    res = integrated_gradients(U, linear_head(M, b), t, steps=32)
    expected = U.mean(1) * M[:, t].T  # IG_j = M[j, c] * mean_p U[p, j] for a linear head
    torch.testing.assert_close(res.attributions, expected, atol=1e-5, rtol=1e-5)
    assert res.completeness_error.abs().max() < 1e-5


@pytest.mark.parametrize("rule", ["gausslegendre", "trapezoid"])
def test_integrated_gradients_quadratic_by_hand(rule):
    # logit = (a . sum_p U[p])^2: IG_j = x_j a_j (a . x) exactly, with x = sum_p U[p] (the gradient is linear in alpha)
    a = torch.tensor([1.0, -2.0, 0.5])
    head = lambda U: torch.stack([(U.sum(1) @ a) ** 2, torch.zeros(U.shape[0])], dim=1)  # noqa: E731
    U = torch.tensor([[[1.0, 0.5, 2.0], [0.0, 0.25, 2.0]]])
    x = U.sum(1)[0]
    res = integrated_gradients(U, head, torch.tensor([0]), steps=32, rule=rule)
    torch.testing.assert_close(res.attributions[0], x * a * (a @ x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.logit, torch.tensor([float((a @ x) ** 2)]))
    torch.testing.assert_close(res.baseline_logit, torch.tensor([0.0]))


def test_integrated_gradients_completeness_on_a_nonlinear_head():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Softplus(), torch.nn.Linear(16, 4))
    head = lambda U: net(U.mean(1))  # noqa: E731
    U = torch.rand(10, 9, 8) * 3
    t = torch.randint(0, 4, (10,))
    res = integrated_gradients(U, head, t, steps=32)
    assert res.relative_completeness_error().max() < 1e-3
    # batching over the path does not change the answer
    small = integrated_gradients(U, head, t, steps=32, batch_size=7)
    torch.testing.assert_close(small.attributions, res.attributions, atol=1e-5, rtol=1e-5)


def test_integrated_gradients_needs_steps_and_matching_targets():
    U = torch.rand(2, 3, 4)
    head = linear_head(torch.randn(4, 2), torch.zeros(2))
    with pytest.raises(C2MFError, match="at least 2 steps"):
        integrated_gradients(U, head, torch.tensor([0, 1]), steps=1)
    with pytest.raises(C2MFError, match="target classes for 2 images"):
        gradcam(U, head, torch.tensor([0, 1, 1]))


def test_ranking_orders_most_important_first():
    imp = torch.tensor([[0.1, 3.0, -1.0, 2.0]])
    assert ranking(imp).tolist() == [[1, 3, 0, 2]]


def test_step_masks():
    ins, dele = step_masks(torch.tensor([[2, 0, 1]]))
    assert ins[0].int().tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]]
    assert (dele == ~ins).all()


def test_insertion_deletion_by_hand():
    # one image, P = 1, k = 3 codes all 1; logit_0 = 3 u0 + 2 u1 + u2, logit_1 = 0; ranking 0, 1, 2
    M = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    head = lambda U: U.sum(1) @ M  # noqa: E731
    U = torch.ones(1, 1, 3)
    res = insertion_deletion(U, head, torch.tensor([0]), torch.tensor([[0, 1, 2]]))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    dele = [sig(6), sig(3), sig(1), 0.5]
    ins = [0.5, sig(3), sig(5), sig(6)]
    np.testing.assert_allclose(res.deletion.prob, dele, rtol=1e-6)
    np.testing.assert_allclose(res.insertion.prob, ins, rtol=1e-6)
    np.testing.assert_allclose(res.deletion.x, [0, 1 / 3, 2 / 3, 1])
    trap = lambda y: sum((y[i] + y[i + 1]) / 2 for i in range(3)) / 3  # noqa: E731
    assert res.deletion.prob_auc == pytest.approx(trap(dele))
    assert res.insertion.prob_auc == pytest.approx(trap(ins))
    # logit_0 >= logit_1 at every step (a tie at the empty set goes to the first class, 0)
    np.testing.assert_allclose(res.deletion.accuracy, [1, 1, 1, 1])


def test_deleting_all_gives_zero_codes_and_inserting_all_gives_the_reconstruction():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    head = lambda U: net(U.mean(1))  # noqa: E731
    U = torch.rand(7, 4, 6)
    labels = torch.randint(0, 5, (7,))
    with torch.no_grad():
        p_full = torch.softmax(head(U), 1)
        p_zero = torch.softmax(head(torch.zeros_like(U)), 1)
        t = p_full.argmax(1)
    order = ranking(gradcam(U, head, t))
    res = insertion_deletion(U, head, t, order, labels=labels, batch_size=5)
    idx = torch.arange(7)
    full, zero = p_full[idx, t].mean().item(), p_zero[idx, t].mean().item()
    assert res.deletion.prob[0] == pytest.approx(full, rel=1e-5)
    assert res.deletion.prob[-1] == pytest.approx(zero, rel=1e-5)
    assert res.insertion.prob[0] == pytest.approx(zero, rel=1e-5)
    assert res.insertion.prob[-1] == pytest.approx(full, rel=1e-5)
    assert res.insertion.accuracy[-1] == pytest.approx((t == labels).float().mean().item())
    assert res.insertion.image_prob_auc.shape == (7,)
    assert res.insertion.prob_auc == pytest.approx(res.insertion.image_prob_auc.mean())
    d = res.to_dict()
    assert set(d) == {"insertion", "deletion"} and len(d["deletion"]["prob"]) == 7


def test_insertion_deletion_rejects_bad_ranking():
    U = torch.rand(2, 3, 4)
    head = linear_head(torch.randn(4, 2), torch.zeros(2))
    with pytest.raises(C2MFError, match="ranking has shape"):
        insertion_deletion(U, head, torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.long))


def test_side_input_reaches_the_head_with_the_right_image():
    # a ViT-like head needs each image's own prefix (CLS) token next to its codes
    torch.manual_seed(3)
    M = torch.randn(4, 3)
    side = torch.randn(5, 1, 3) * 10
    head = lambda U, cls: U.mean(1) @ M + cls[:, 0] + (U.mean(1) @ M) * cls[:, 0]  # noqa: E731
    U = torch.rand(5, 2, 4)
    t = torch.tensor([0, 1, 2, 0, 1])
    ig = integrated_gradients(U, head, t, side=side, batch_size=40)
    gc = gradcam(U, head, t, side=side, batch_size=2)
    ins = insertion_deletion(U, head, t, ranking(gc), side=side, batch_size=7)
    for i in range(5):
        one = lambda X, i=i: head(X, side[i : i + 1].expand(X.shape[0], 1, 3))  # noqa: E731
        torch.testing.assert_close(integrated_gradients(U[i : i + 1], one, t[i : i + 1]).attributions, ig.attributions[i : i + 1])
        torch.testing.assert_close(gradcam(U[i : i + 1], one, t[i : i + 1]), gc[i : i + 1])
    assert ig.completeness_error.abs().max() < 1e-3
    with torch.no_grad():
        full = torch.softmax(head(U, side), 1)[torch.arange(5), t].mean().item()
    assert ins.insertion.prob[-1] == pytest.approx(full, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- Sobol


def _jansen_reference(masks: np.ndarray, outputs: np.ndarray, designs: int) -> np.ndarray:
    """CRAFT's JansenEstimator as published (deel-ai/Craft, craft/sobol/estimators.py), written out in loops."""
    k = masks.shape[1]
    a = outputs[:designs]
    c = [outputs[2 * designs + designs * i: 2 * designs + designs * (i + 1)] for i in range(k)]
    var = sum((v - a.mean()) ** 2 for v in a) / (len(a) - 1)
    return np.array([np.sum((a - c[i]) ** 2) / (2 * designs * var) for i in range(k)])


def test_sobol_design_is_a_then_b_then_each_column_swapped():
    from c2mf_cli.metrics.importance import sobol_masks

    k, d = 3, 8
    m = sobol_masks(k, d).numpy()
    assert m.shape == (d * (k + 2), k) and (m >= 0).all() and (m < 1).all()
    a, b = m[:d], m[d:2 * d]
    for i in range(k):
        c = m[2 * d + i * d: 2 * d + (i + 1) * d]
        np.testing.assert_array_equal(np.delete(c, i, axis=1), np.delete(a, i, axis=1))
        np.testing.assert_array_equal(c[:, i], b[:, i])
    from scipy.stats import qmc

    np.testing.assert_array_equal(np.concatenate([a, b], 1), qmc.Halton(2 * k, scramble=False).random(d).astype(np.float32))


def test_jansen_matches_crafts_estimator():
    from c2mf_cli.metrics.importance import jansen_total, sobol_masks

    k, d = 4, 16
    masks = sobol_masks(k, d).numpy()
    rng = np.random.default_rng(0)
    w = rng.normal(size=k)
    outputs = np.tanh(masks @ w) + masks[:, 0] * masks[:, 2]
    ours = jansen_total(torch.from_numpy(outputs)[None].double(), d, k)[0].numpy()
    np.testing.assert_allclose(ours, _jansen_reference(masks, outputs, d), rtol=1e-12)


def test_sobol_known_answers():
    """Additive head: ST_j = (a_j s_j)^2 / sum_i (a_i s_i)^2. Product of two concepts (masks uniform on [0, 1]):
    ST = E[m^2] Var(m) / Var(m1 m2) = (1/3)(1/12) / (1/9 - 1/16) = 4/7 for both, 0 for an unused third."""
    from c2mf_cli.metrics import sobol

    a = torch.tensor([3.0, -1.0, 0.0, 2.0])
    U = torch.tensor([[[1.0, 2.0, 5.0, 0.5], [1.0, 0.0, 1.0, 0.5]]])  # s = [2, 2, 6, 1]
    additive = lambda V: (V.sum(1) @ a)[:, None]  # noqa: E731
    st = sobol(U, additive, torch.tensor([0]), designs=1024)[0]
    s = U.sum(1)[0]
    expected = (a * s) ** 2 / ((a * s) ** 2).sum()
    torch.testing.assert_close(st, expected, atol=0.02, rtol=0.0)
    product = lambda V: (V[:, :, 0].sum(1) * V[:, :, 1].sum(1))[:, None]  # noqa: E731
    st = sobol(torch.ones(1, 1, 3), product, torch.tensor([0]), designs=1024)[0]
    torch.testing.assert_close(st, torch.tensor([4 / 7, 4 / 7, 0.0]), atol=0.02, rtol=0.0)


def test_sobol_of_a_constant_head_is_zero_and_batches_agree():
    from c2mf_cli.metrics import sobol

    st = sobol(torch.rand(2, 3, 4), lambda V: torch.ones(V.shape[0], 2), torch.tensor([0, 1]), designs=8)
    assert torch.equal(st, torch.zeros(2, 4))
    torch.manual_seed(0)
    M = torch.randn(4, 3)
    head = lambda V: torch.tanh(V.mean(1) @ M)  # noqa: E731
    U, t = torch.rand(5, 3, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(sobol(U, head, t, designs=8, batch_size=40), sobol(U, head, t, designs=8, batch_size=10**6))
    with pytest.raises(C2MFError, match="at least 2 designs"):
        sobol(U, head, t, designs=1)
