"""`c2mf evaluate` end to end on real data: CIFAR-10 ResNet-20 at layer3 (skipped where ../shared/data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from c2mf_cli.cli import app

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR = DATA / "cifar10"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CIFAR / "resnet20-12fca82f.th").is_file(), reason=f"real data not found at {DATA}"),
]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Tiny train/test/crop stores (4 images per class) and three dictionaries fitted on them."""
    from c2mf_cli.methods.base import get_method
    from c2mf_cli.artifacts.store import ActivationStore

    root = tmp_path_factory.mktemp("cifar")
    runner = CliRunner()
    common = ["extract", "-m", f"{DATA / 'models.py'}:cifar_resnet20", "-c", str(CIFAR / "resnet20-12fca82f.th"),
              "-l", "layer3", "-d", str(CIFAR / "images"), "--device", "cpu", "--workers", "0", "-q",
              "--max-images-per-class", "5"]
    for name, extra in (("train", ["--split", "train"]), ("test", ["--split", "test"]),
                        ("crops", ["--split", "train", "--mode", "crops", "--crop-size", "0.5"])):
        r = runner.invoke(app, [*common, *extra, "-o", str(root / name)])
        assert r.exit_code == 0, r.output
    train, crops = ActivationStore.open(root / "train"), ActivationStore.open(root / "crops")
    for method, src, opts in (("c2mf", train, {"iterations": 5}), ("craft", crops, {"iterations": 5}),
                              ("pca", train, {})):
        m = get_method(method)
        d = m.fit(src.row_source(), m.make_config(concepts=4, **opts), device=torch.device("cpu"))
        d.save(root / f"{method}.safetensors")
    return root


def test_evaluate_cli_on_cifar(cifar, tmp_path):
    args = ["evaluate", "--train", str(cifar / "train"), "--test", str(cifar / "test"), "--crops",
            str(cifar / "crops"), "--out", str(tmp_path / "ev"), "--max-images-per-class", "2", "--ig-steps", "8",
            "--device", "cpu", "--quiet", "--json"]
    for m in ("c2mf", "craft", "pca"):
        args += ["--dict", str(cifar / f"{m}.safetensors")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [m["name"] for m in res["methods"]] == ["c2mf", "craft", "pca", "craft clustered K=4"]
    assert res["h_check"]["prediction_agreement"] == 1.0
    assert [m["capacity"] for m in res["methods"]] == ["shared", "per-class", "per-class", "shared"]
    refs, n = res["references"], res["n_test_images"]
    assert n == 20 and res["chance"] == 0.1
    # the model agrees with itself; the predicted class's mean can do no better than the model on labels
    assert refs["model"]["agreement"]["mean"] == 1.0
    assert refs["model"]["accuracy"]["mean"] == pytest.approx(
        float(np.mean(np.array(res["per_image"]["model_prediction"]) == np.array(res["per_image"]["label"]))))
    for m in res["methods"][:3]:
        rec = m["reconstruction"]
        assert m["encode_class"] == "predicted" and set(m["by_encoding"]) == {"predicted", "true"}
        assert rec["n_images"] == n
        assert m["importance"]["ig_completeness"]["max_relative_error"] < 0.05
    names = [m["name"] for m in res["methods"]]
    pairs = [p for p in res["significance"]["pairs"] if p["measure"] == "agreement"]
    assert len(pairs) == (len(names) + 1) * len(names) // 2 and all(0 < p["p"] <= 1 and p["n"] == n for p in pairs)
    assert 0.0 <= res["ood"]["auroc"] <= 1.0
    assert res["clustering"] and res["clustering"][0]["K"] == 4
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert all((tmp_path / "ev" / f).is_file() for f in saved["files"].values())


def test_evaluate_cli_errors(cifar, tmp_path):
    from c2mf_cli.artifacts.dictionary import ConceptDictionary

    ConceptDictionary({"W": torch.rand(3, 7)}, {"method": "pca", "codes": "projection"}).save(tmp_path / "bad.safetensors")
    base = ["evaluate", "--train", str(cifar / "train"), "--test", str(cifar / "test"), "--out", str(tmp_path / "o"),
            "--device", "cpu", "-q"]
    r = CliRunner().invoke(app, [*base, "--dict", str(tmp_path / "bad.safetensors")])
    assert r.exit_code == 1
    assert "Error: dictionary 'bad' has 7 channels but the store's layer 'layer3' has 64" in r.output
    r = CliRunner().invoke(app, [*base, "--dict", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 1 and "Error: --dict " in r.output and "missing.safetensors' does not exist" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--train", str(cifar / "crops"), "--test", str(cifar / "test"),
                                 "--out", str(tmp_path / "o"), "--dict", str(cifar / "pca.safetensors"), "-q"])
    assert r.exit_code == 1 and "Error: the train store holds 'crops' rows" in r.output
