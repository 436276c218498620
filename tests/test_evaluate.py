"""evaluate() end to end on small in-memory stores whose answers are known (planted activations, a tiny h)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.errors import C2MFError
from c2mf_cli.stages.evaluate import EvaluateConfig, evaluate, write_results

C, K, H, W_, N_CLS = 12, 4, 3, 3, 3


class FakeStore:
    """The subset of the ActivationStore API evaluate reads, over arrays."""

    def __init__(self, acts, logits, labels, *, mode="full", fingerprint="fp", prefix=0, layout="nchw"):
        self._a, self._l, self._y = acts, logits, labels
        self.classes = [f"class{i}" for i in range(len(acts))]
        self.mode, self.fingerprint, self.layer = mode, fingerprint, "layer3"
        self.num_prefix_tokens, self.layout = prefix, layout
        self.info = {"layer": "layer3", "fingerprint": fingerprint}

    def n_images(self, y):
        return self._a[y].shape[0]

    def activations(self, y):
        return self._a[y]

    def logits(self, y):
        return self._l[y]

    def labels(self, y):
        return self._y[y]

    def paths(self, y):
        return [f"{self.fingerprint}/class{y}/{i:03d}.png" for i in range(self.n_images(y))]


def _world(seed=0):
    """Planted dictionary, a tiny h (store layout -> logits) and train/test stores exactly spanned by it."""
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(K, C, generator=g)
    proj = torch.randn(C, N_CLS, generator=g)

    def tail(a: torch.Tensor) -> torch.Tensor:  # a: (m, H, W, C)
        return torch.relu(a).mean(dim=(1, 2)) @ proj

    def make(n, fp):
        acts, logits, labels = [], [], []
        for y in range(N_CLS):
            U = torch.rand(n, H * W_, K, generator=g)
            U[..., y] += 2.0  # class y leans on concept y
            A = (U @ W).reshape(n, H, W_, C)
            acts.append(A.numpy())
            logits.append(tail(A).numpy())
            labels.append(np.full(n, y))
        return FakeStore(acts, logits, labels, fingerprint=fp)

    return W, tail, make(6, "train"), make(5, "test")


def _dicts(W):
    classes = [f"class{i}" for i in range(N_CLS)]
    exact = ConceptDictionary({"W": W.clone()}, {"method": "nmf", "classes": classes, "codes": "nnls"})
    g = torch.Generator().manual_seed(9)
    per_class = ConceptDictionary({"W": torch.rand(N_CLS, 2, C, generator=g)},
                                  {"method": "craft", "classes": classes, "codes": "nnls"})
    return exact, per_class


def test_evaluate_exact_dictionary_and_outputs(tmp_path):
    W, tail, train, test = _world()
    exact, craft = _dicts(W)
    crops = FakeStore([l * 0.1 for l in test._a], [l * 0.1 for l in test._l], test._y, mode="crops", fingerprint="c")
    cfg = EvaluateConfig(ig_steps=16, batch_size=64, cluster_ks=(2, 4))
    res = evaluate(train, test, [exact, craft], crops, cfg, tail=tail, device="cpu", out_dir=tmp_path)
    assert res["h_check"]["max_abs_logit_diff"] == 0.0
    ex, cr, *clustered = res["methods"]
    assert ex["name"] == "nmf k=4" and cr["name"] == "craft k=2"
    # craft clustered to K = 2 and 4 joins the shared (same-capacity) comparison, without importance
    assert [(m["name"], m["capacity"]) for m in clustered] == [("craft k=2 clustered K=2", "shared"),
                                                               ("craft k=2 clustered K=4", "shared")]
    assert "importance" not in clustered[0] and cr["capacity"] == "per-class" and cr["directions"] == 6
    # the dictionary spans the activations: reconstruction is exact, accuracy and agreement are 100 %
    assert ex["reconstruction"]["agreement"]["mean"] == 1.0
    assert ex["fit"]["test"]["r2"] == pytest.approx(1.0, abs=1e-4)
    assert ex["consistency"]["train_mse"] == pytest.approx(0.0, abs=1e-6)
    assert ex["importance"]["ig_completeness"]["max_relative_error"] < 1e-2
    # inserting every concept gives the reconstruction; the target is the model's prediction, reproduced exactly
    for rank in ("gradcam", "ig"):
        assert ex["insertion_deletion"][rank]["insertion"]["accuracy"][-1] == pytest.approx(
            ex["reconstruction"]["accuracy"]["mean"])
        assert ex["insertion_deletion"][rank]["deletion"]["prob"][0] == ex["insertion_deletion"][rank]["insertion"]["prob"][-1]
    assert cr["per_class_dictionary"] and cr["fit"]["test"]["r2"] < ex["fit"]["test"]["r2"]
    assert [c["K"] for c in res["clustering"]] == [2, 4]
    assert "nmf k=4" in res["clustering"][1]["shared"]
    assert res["ood"]["auroc"] > 0.5 and res["ood"]["n_out"] == 15
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["settings"]["ig_steps"] == 16 and saved["inputs"]["test"]["fingerprint"] == "test"
    for f in saved["files"].values():
        assert (tmp_path / f).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_vit_prefix_tokens_are_fed_to_h_as_stored():
    g = torch.Generator().manual_seed(1)
    W = torch.rand(K, C, generator=g)
    proj = torch.randn(C, N_CLS, generator=g)

    def tail(t: torch.Tensor) -> torch.Tensor:  # (m, 1 + P, C), CLS first, weighs heavily
        return (5 * t[:, 0] + t[:, 1:].mean(1)) @ proj

    def make(fp):
        acts, logits, labels = [], [], []
        for y in range(N_CLS):
            patches = torch.rand(4, 9, K, generator=g) @ W
            cls = torch.randn(4, 1, C, generator=g)
            A = torch.cat([cls, patches], 1)
            acts.append(A.numpy())
            logits.append(tail(A).numpy())
            labels.append(np.full(4, y))
        return FakeStore(acts, logits, labels, fingerprint=fp, prefix=1, layout="tokens")

    exact, _ = _dicts(W)
    res = evaluate(make("a"), make("b"), [exact], config=EvaluateConfig(ig_steps=8), tail=tail, device="cpu")
    m = res["methods"][0]
    assert m["reconstruction"]["agreement"]["mean"] == 1.0
    assert m["fit"]["test"]["r2"] == pytest.approx(1.0, abs=1e-4)
    assert m["importance"]["ig_completeness"]["max_relative_error"] < 1e-2


def test_mismatches_are_clear_errors():
    W, tail, train, test = _world()
    exact, _ = _dicts(W)
    wrong = ConceptDictionary({"W": torch.rand(3, C + 1)}, {"method": "pca", "classes": [], "codes": "projection"})
    with pytest.raises(C2MFError, match="has 13 channels but the store's layer 'layer3' has 12"):
        evaluate(train, test, [wrong], tail=tail, device="cpu")
    with pytest.raises(C2MFError, match="same store"):
        evaluate(test, test, [exact], tail=tail, device="cpu")
    other = ConceptDictionary({"W": torch.rand(2, 2, C)}, {"method": "craft", "classes": ["x", "y"], "codes": "nnls"})
    with pytest.raises(C2MFError, match="has no class 'class0'"):
        evaluate(train, test, [other], tail=tail, device="cpu")
    with pytest.raises(C2MFError, match="ig-steps"):
        EvaluateConfig(ig_steps=1)


def test_write_results_turns_nan_into_null(tmp_path):
    W, tail, train, test = _world()
    exact, _ = _dicts(W)
    res = evaluate(train, test, [exact], config=EvaluateConfig(ig_steps=4, max_images_per_class=2), tail=tail,
                   device="cpu")
    assert res["methods"][0]["similarity"]["n_pairs"] == 6
    res["methods"][0]["similarity"]["pearson_mean"] = float("nan")
    files = write_results(res, tmp_path / "out")
    text = Path(files["json"]).read_text()
    assert "NaN" not in text and json.loads(text)["methods"][0]["similarity"]["pearson_mean"] is None


def test_sobol_ranks_concepts_when_asked(tmp_path):
    """--importance sobol: CRAFT's total Sobol indices rank the concepts for insertion/deletion, and only the
    rankings asked for are computed (no IG, so no completeness entry)."""
    W, tail, train, test = _world()
    exact, _ = _dicts(W)
    cfg = EvaluateConfig(batch_size=256, rankings=("sobol", "gradcam"), sobol_designs=8, encode_class=("predicted",))
    res = evaluate(train, test, [exact], config=cfg, tail=tail, device="cpu", out_dir=tmp_path)
    (ex,) = res["methods"]
    assert set(ex["insertion_deletion"]) == {"sobol", "gradcam"} and "ig_completeness" not in ex["importance"]
    sob = np.array(ex["importance"]["sobol_mean"])
    assert sob.shape == (K,) and (sob >= 0).all() and sob.sum() > 0
    assert ex["importance"]["sobol_designs"] == 8 and res["settings"]["rankings"] == ["sobol", "gradcam"]
    idl = ex["insertion_deletion"]["sobol"]
    assert idl["insertion"]["accuracy"][-1] == pytest.approx(ex["reconstruction"]["accuracy"]["mean"])
    assert (tmp_path / "insertion_deletion_sobol_prob.png").is_file()
    assert not (tmp_path / "insertion_deletion_ig_prob.png").exists()
    with pytest.raises(Exception, match="--importance takes distinct values"):
        EvaluateConfig(rankings=("shap",))


def test_code_rule_is_a_setting():
    """--codes lstsq: signed least-squares codes on the same decoder (the planted dictionary spans the data, so
    the reconstruction stays exact), recorded in the settings."""
    W, tail, train, test = _world()
    exact, _ = _dicts(W)
    cfg = EvaluateConfig(codes="lstsq", attribution=False, encode_class=("predicted",))
    res = evaluate(train, test, [exact], config=cfg, tail=tail, device="cpu")
    assert res["settings"]["codes"] == "lstsq"
    assert res["methods"][0]["reconstruction"]["agreement"]["mean"] == 1.0
    assert res["methods"][0]["fit"]["test"]["r2"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(Exception, match="--codes must be one of fit, nnls, lstsq"):
        EvaluateConfig(codes="ridge2")
