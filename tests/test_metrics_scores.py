"""Similarity, reconstruction, OOD, clustering and recovery metrics on cases known by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from c2mf_cli.render import plots
from c2mf_cli.errors import C2MFError
from c2mf_cli.metrics import (
    FitAccumulator,
    binarize,
    cluster_concepts,
    concept_similarity,
    confidence_histograms,
    consistency,
    fit_quality,
    gate_selection_accuracy,
    heatmap_mask_iou,
    kmeans,
    matched_cosine,
    max_softmax,
    ood_scores,
    pairwise_similarity,
    per_class_accuracy,
)

# ---------------------------------------------------------------- similarity


def test_orthogonal_centred_rows_have_zero_similarity():
    W = np.array([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])
    s = concept_similarity(W)
    assert s["pearson_mean"] == pytest.approx(0.0, abs=1e-12)
    assert s["cosine_mean"] == pytest.approx(0.0, abs=1e-12)
    assert s["n_pairs"] == 3


def test_similarity_by_hand_and_against_numpy():
    W = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    s = pairwise_similarity(W)
    assert s["pearson"][0] == pytest.approx(1.0)  # r = -1
    assert s["cosine"][0] == pytest.approx(10 / 14)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 20))
    s = pairwise_similarity(torch.tensor(W))
    iu = np.triu_indices(6, 1)
    np.testing.assert_allclose(s["pearson"], np.abs(np.corrcoef(W)[iu]))


def test_similarity_pools_pairs_within_each_dictionary():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])  # cosine 1/sqrt(2); centred rows [.5,-.5] and [0,0] -> degenerate
    b = np.array([[1.0, 0.0], [0.0, 1.0]])  # cosine 0
    s = concept_similarity([a, b])
    assert s["n_pairs"] == 2
    assert s["cosine_mean"] == pytest.approx((1 / math.sqrt(2)) / 2)
    assert s["cosine_std"] == pytest.approx((1 / math.sqrt(2)) / 2)
    assert s["n_degenerate"] == 1
    assert math.isnan(concept_similarity(np.ones((1, 3)))["pearson_mean"])


# ---------------------------------------------------------------- reconstruction


def test_per_class_accuracy_by_hand():
    labels = np.array([0, 0, 1, 1])
    recon = np.eye(3)[[0, 1, 1, 1]]
    model = np.eye(3)[[1, 1, 1, 0]]
    r = per_class_accuracy(recon, labels, model)
    assert r["accuracy"]["per_class"] == {"0": 0.5, "1": 1.0}
    assert r["accuracy"]["mean"] == pytest.approx(0.75)
    assert r["accuracy"]["std"] == pytest.approx(0.25)
    assert r["agreement"]["per_class"] == {"0": 0.5, "1": 0.5}


def test_exact_span_gives_full_accuracy_and_perfect_fit():
    # A = U W exactly; projecting A on W by least squares and feeding the classifier reproduces its predictions
    rng = np.random.default_rng(0)
    k, c, P, n = 4, 10, 5, 30
    W = rng.normal(size=(k, c))
    U = rng.random(size=(n * P, k))
    A = U @ W
    clf = rng.normal(size=(c, 3))
    logits = lambda X: X.reshape(n, P, c).mean(1) @ clf  # noqa: E731
    labels = logits(A).argmax(1)
    U_hat = np.linalg.lstsq(W.T, A.T, rcond=None)[0].T
    r = per_class_accuracy(logits(U_hat @ W), labels, logits(A))
    assert r["accuracy"]["mean"] == 1.0 and r["agreement"]["mean"] == 1.0 and r["accuracy"]["std"] == 0.0
    q = fit_quality(A, U_hat @ W)
    assert q["mse"] == pytest.approx(0.0, abs=1e-20)
    assert q["relative_error"] == pytest.approx(0.0, abs=1e-9)
    assert q["r2"] == pytest.approx(1.0)


def test_fit_accumulator_streams_and_matches_sklearn():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(50, 6)) + 3.0
    A_hat = A + rng.normal(scale=0.5, size=A.shape)
    acc = FitAccumulator()
    for s in range(0, 50, 13):
        acc.update(torch.tensor(A[s : s + 13], dtype=torch.float32), torch.tensor(A_hat[s : s + 13], dtype=torch.float32))
    r = acc.result()
    assert r["n_rows"] == 50
    assert r["mse"] == pytest.approx(skm.mean_squared_error(A, A_hat), rel=1e-5)
    assert r["r2"] == pytest.approx(skm.r2_score(A, A_hat, multioutput="variance_weighted"), rel=1e-5)
    assert r["relative_error"] == pytest.approx(np.linalg.norm(A - A_hat) / np.linalg.norm(A), rel=1e-5)
    assert consistency(0.3, 0.5)["difference"] == pytest.approx(-0.2)
    with pytest.raises(C2MFError, match="must be equal 2-D"):
        acc.update(A, A_hat[:3])


# ---------------------------------------------------------------- OOD


def test_ood_separable_scores():
    r = ood_scores([0.9, 0.95, 0.99], [0.1, 0.2, 0.5])
    assert r["auroc"] == 1.0 and r["fpr_at_95_tpr"] == 0.0
    assert r["aupr_in"] == 1.0 and r["aupr_out"] == 1.0


def test_ood_textbook_case():
    # ranked: .9 in, .8 in, .7 out, .4 in, .3 out
    r = ood_scores([0.9, 0.8, 0.4], [0.7, 0.3])
    assert r["auroc"] == pytest.approx(5 / 6)  # 5 of the 6 (in, out) pairs are ordered
    assert r["fpr_at_95_tpr"] == pytest.approx(0.5)  # keeping every image needs threshold .4; crop .7 passes
    assert r["aupr_in"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert r["aupr_out"] == pytest.approx((1 + 2 / 3) / 2)


def test_ood_agrees_with_sklearn_with_ties():
    rng = np.random.default_rng(3)
    s_in = np.round(rng.beta(5, 2, 300), 2)
    s_out = np.round(rng.beta(2, 3, 200), 2)
    r = ood_scores(s_in, s_out)
    y = np.r_[np.ones(300), np.zeros(200)]
    s = np.r_[s_in, s_out]
    assert r["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert r["aupr_in"] == pytest.approx(skm.average_precision_score(y, s))
    assert r["aupr_out"] == pytest.approx(skm.average_precision_score(1 - y, -s))
    fpr, tpr, _ = skm.roc_curve(y, s)
    assert r["fpr_at_95_tpr"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")])
    with pytest.raises(C2MFError, match="crop store"):
        ood_scores(s_in, [])


def test_max_softmax_and_histograms():
    conf = max_softmax(torch.tensor([[0.0, 0.0], [100.0, 0.0]]))
    np.testing.assert_allclose(conf, [0.5, 1.0])
    h = confidence_histograms([0.95, 0.85, 0.96], [0.1, 0.55], bins=10)
    assert sum(h["in_fraction"]) == pytest.approx(1) and sum(h["out_fraction"]) == pytest.approx(1)
    assert h["in_fraction"][9] == pytest.approx(2 / 3) and h["out_fraction"][1] == pytest.approx(0.5)
    assert h["mean_gap"] == pytest.approx(0.92 - 0.325)


# ---------------------------------------------------------------- clustering


def test_kmeans_on_blobs_is_seeded_and_correct():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = torch.cat([c + 0.3 * torch.randn(40, 2, generator=gen) for c in centres])
    a, b = kmeans(X, 3, seed=5), kmeans(X, 3, seed=5)
    assert torch.equal(a.labels, b.labels)
    truth = torch.arange(3).repeat_interleave(40)
    # every found cluster is one true blob
    for j in range(3):
        assert truth[a.labels == j].unique().numel() == 1
    with pytest.raises(C2MFError, match="cannot make 5 clusters"):
        kmeans(X[:4], 5)


def test_clustering_ablation_on_planted_concepts():
    # 3 planted directions; each of 4 classes learns noisy, arbitrarily scaled copies of two of them
    rng = np.random.default_rng(0)
    planted = np.linalg.qr(rng.normal(size=(16, 3)))[0].T  # (3, 16) orthonormal
    uses = [(0, 1), (1, 2), (0, 2), (2, 0)]
    per_class = [
        np.stack([rng.uniform(0.5, 20) * (planted[i] + 0.05 * rng.normal(size=16)) for i in u]) for u in uses
    ]
    res = cluster_concepts(per_class, 3, seed=0)
    assert res.W.shape == (3, 16) and len(set(res.source)) == 3
    m = matched_cosine(res.W, planted)
    assert m["min"] > 0.98
    for d, r in res.source:  # kept rows are the original, unscaled concepts
        np.testing.assert_allclose(res.W[[res.source.index((d, r))]].numpy()[0], per_class[d][r], rtol=1e-6)


# ---------------------------------------------------------------- recovery


def test_matched_cosine_recovers_a_permutation():
    rng = np.random.default_rng(0)
    planted = rng.normal(size=(4, 8))
    learned = 3.0 * planted[[2, 0, 3, 1]]
    m = matched_cosine(learned, planted)
    assert m["mean"] == pytest.approx(1.0)
    assert m["assignment"] == [1, 3, 0, 2]
    flipped = matched_cosine(-learned, planted, absolute=True)
    assert flipped["mean"] == pytest.approx(1.0)
    fewer = matched_cosine(learned[:2], planted)
    assert sum(math.isnan(v) for v in fewer["per_planted"]) == 2 and fewer["assignment"].count(-1) == 2


def test_binarize_by_hand():
    h = np.array([[0.0, 0.2], [0.6, 1.0]])
    assert binarize(h, "relative", 0.5).tolist() == [[False, False], [True, True]]
    assert binarize(h, "top_fraction", 0.25).tolist() == [[False, False], [False, True]]
    assert not binarize(np.zeros((2, 2))).any()


def test_heatmap_mask_iou_and_best_concept():
    masks = np.zeros((2, 2, 4, 4), bool)
    masks[:, 0, :2, :2] = True  # primitive 0 top-left
    masks[0, 1, 2:, 2:] = True  # primitive 1 bottom-right, only in image 0
    heat = np.zeros((2, 3, 4, 4))
    heat[:, 2, :2, :2] = 5.0  # concept 2 is primitive 0
    heat[:, 0, 2:, 2:] = 1.0  # concept 0 is primitive 1
    heat[:, 0, 2:, 3] = 0.4  # below half its max: off
    heat[:, 1] = 1.0  # concept 1 is everywhere
    r = heatmap_mask_iou(heat, masks)
    assert r["best_concept"] == [2, 0]
    assert r["best_iou"] == pytest.approx([1.0, 0.5])  # concept 0: 2 on pixels of a 4-pixel mask
    assert r["iou"][1][0] == pytest.approx(4 / 16)


def test_gate_selection_accuracy_by_hand():
    planted = np.array([[1, 1, 0], [0, 1, 1]], bool)
    assignment = [2, 0, 1]  # primitive i is learned concept assignment[i]; learned concept 3 is unmatched
    gates = np.array([[0.1, 0.2, 0.9, 0.7], [0.9, 0.8, 0.2, 0.1]])
    r = gate_selection_accuracy(gates, planted, assignment)
    # class 0 selects primitives {0 (c2), 1? (c0 0.1 no)} -> [1,0,0]; class 1 -> [0,1,1]
    assert r["accuracy"] == pytest.approx(5 / 6)
    assert r["exact"] == pytest.approx(0.5)
    assert r["precision"] == pytest.approx(1.0) and r["recall"] == pytest.approx(3 / 4)
    assert r["extra_selected"] == pytest.approx(0.5)


# ---------------------------------------------------------------- plots


def _is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    curve = {"x": [0, 0.5, 1], "prob": [0.1, 0.5, 0.9], "prob_auc": 0.5, "accuracy": [0, 1, 1], "accuracy_auc": 0.75}
    p1 = plots.insertion_deletion_curves({"c2mf / IG": {"insertion": curve, "deletion": curve}}, tmp_path / "a.png")
    p2 = plots.accuracy_vs_k({"c2mf": [(10, 0.9, 0.05), (5, 0.8, 0.1)]}, tmp_path / "b.png")
    p3 = plots.confidence_histograms(confidence_histograms([0.9, 0.8], [0.2, 0.6], bins=5), tmp_path / "c.png")
    assert all(_is_png(p) for p in (p1, p2, p3))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]
