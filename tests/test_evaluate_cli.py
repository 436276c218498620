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
MODEL = f"{DATA / 'models.py'}:cifar_resnet20"

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
    common = ["extract", "-m", MODEL, "-c", str(CIFAR / "resnet20-12fca82f.th"),
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
            "--device", "cpu", "--quiet", "--json", "--model", MODEL]
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

    ConceptDictionary({"W": torch.rand(3, 7), "mean": torch.zeros(7)}, {"method": "pca", "codes": "projection"}).save(
        tmp_path / "bad.safetensors")
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


def test_evaluate_never_runs_code_a_store_names(tmp_path):
    """A store from someone else names `path/file.py:factory`: evaluate refuses to import it unless --model names it,
    and shows the command that would."""
    from types import SimpleNamespace

    from c2mf_cli.errors import C2MFError
    from c2mf_cli.stages.evaluate import _tail_from_store

    evil = tmp_path / "evil.py"
    marker = tmp_path / "ran"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\ndef net():\n    raise SystemExit\n")
    store = SimpleNamespace(config={"model": {"name": f"{evil}:net", "checkpoint": None, "pretrained": False}},
                            layer="layer3", preprocess=None)
    with pytest.raises(C2MFError, match=r"the test store records its model as code.*--model \S*evil.py:net") as e:
        _tail_from_store(store, torch.device("cpu"))
    assert "never runs code" in str(e.value) and not marker.exists()


def test_evaluate_checks_the_stores_weights(cifar, tmp_path):
    """The recorded weights' sha256 is checked when the model is reopened: weights other than those recorded are
    refused, unless chosen with --checkpoint, which uses them with a note that says so."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from c2mf_cli.inputs.models import WeightsMismatch
    from c2mf_cli.stages.evaluate import _tail_from_store

    recorded = {"name": MODEL, "checkpoint": str(CIFAR / "resnet20-12fca82f.th"), "weights_sha256": "0" * 64}
    store = SimpleNamespace(config={"model": recorded}, layer="layer3", preprocess=None)
    with pytest.raises(WeightsMismatch, match="are not those the test store was made with"):
        _tail_from_store(store, torch.device("cpu"), model=MODEL)

    state = torch.load(CIFAR / "resnet20-12fca82f.th", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v.clone() for k, v in state.items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[key] = state[key] * 1.01
    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    base = ["evaluate", "--train", str(cifar / "train"), "--test", str(cifar / "test"), "--dict",
            str(cifar / "pca.safetensors"), "--max-images-per-class", "1", "--no-attribution", "--device", "cpu",
            "--quiet", "--json", "--model", MODEL, "--out", str(tmp_path / "ev")]
    r = CliRunner().invoke(app, [*base, "--checkpoint", str(other)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert any("are not those the test store was made with" in n for n in res["notes"]), res["notes"]


def test_evaluate_refuses_a_tail_that_does_not_reproduce_the_store(cifar, tmp_path):
    """Weights that change the model's decision (here: the classifier's rows rolled by one class) cannot explain a
    store made with other weights: one Error line, nothing written; the store's own weights pass."""
    from safetensors.torch import save_file

    state = torch.load(CIFAR / "resnet20-12fca82f.th", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v.clone() for k, v in state.items()}
    for key in ("linear.weight", "linear.bias"):
        state[key] = torch.roll(state[key], 1, dims=0)
    rolled = tmp_path / "rolled.safetensors"
    save_file(state, str(rolled))
    out = tmp_path / "ev"
    base = ["evaluate", "--train", str(cifar / "train"), "--test", str(cifar / "test"), "--dict",
            str(cifar / "pca.safetensors"), "--max-images-per-class", "1", "--no-attribution", "--device", "cpu",
            "--quiet", "--model", MODEL, "--out", str(out)]
    r = CliRunner().invoke(app, [*base, "--checkpoint", str(rolled)])
    assert r.exit_code != 0
    assert "gives the stored prediction on only 0.0% of the test images" in r.output, r.output
    assert "--checkpoint" in r.output and not (out / "evaluation.json").exists()
    r = CliRunner().invoke(app, [*base, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["h_check"]["prediction_agreement"] == 1.0
