"""`c2mf sweep`: every method at each k, one evaluation per k, fidelity against k, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from c2mf_cli.cli import app
from tests.conftest import build_store


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("sweep-stores")
    return {"train": build_store(root / "train.zarr", image_folder, split="train"),
            "test": build_store(root / "test.zarr", image_folder, split="test"),
            "crops": build_store(root / "crops.zarr", image_folder, split="train", mode="crops")}


def test_sweep_fits_evaluates_and_resumes(stores, tmp_path):
    base = ["sweep", "--train", stores["train"], "--test", stores["test"], "--train-crops", stores["crops"],
            "--concepts", "2,4", "--method", "c2mf", "--method", "craft", "--device", "cpu",
            "-o", tmp_path / "sw", "--target", "0.5", "--iterations", "8", "--max-images-per-class", "3"]
    r = _run(*base, "--json", "-q")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["settings"]["ks"] == [2, 4] and res["headline_encoding"] == "predicted"
    # every method at every k, and CRAFT clustered to K = k beside the shared dictionaries
    assert set(res["series"]) == {"c2mf", "craft", "craft clustered"}
    for label in ("c2mf", "craft"):
        assert [p["k"] for p in res["series"][label]] == [2, 4]
    for label, pts in res["series"].items():
        for p in pts:
            assert 0.0 <= p["predicted"]["agreement"] <= 1.0 and 0.0 <= p["true"]["accuracy"] <= 1.0
    # smallest k: the first k whose agreement reaches the target, read from the series
    for label, k in res["smallest_k"].items():
        reached = [p["k"] for p in res["series"][label] if p["predicted"]["agreement"] >= 0.5]
        assert k == (min(reached) if reached else None)
    sw = tmp_path / "sw"
    assert (sw / "dicts" / "craft-k4.safetensors").is_file() and (sw / "k2" / "evaluation.json").is_file()
    assert (sw / "agreement_vs_k.png").is_file() and json.loads((sw / "sweep.json").read_text()) == res
    # a rerun reuses every fit and evaluation (nothing rewritten) and gives the same record
    stamps = {p: p.stat().st_mtime_ns for p in sw.rglob("*") if p.suffix in (".safetensors",) or p.name ==
              "evaluation.json"}
    r = _run(*base)
    assert r.exit_code == 0, r.output
    assert "reusing" in r.stderr and "fitting" not in r.stderr and "smallest k" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a larger sweep into the same folder fits only the new k
    r = _run(*base[:8], "2,4,6", *base[9:], "-q", "--json")
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and (sw / "dicts" / "c2mf-k6.safetensors").is_file()


def test_sweep_refuses_what_it_did_not_make(stores, tmp_path):
    base = ["sweep", "--train", stores["train"], "--test", stores["test"], "--concepts", "2", "--method", "pca",
            "--device", "cpu", "-q", "-o", tmp_path / "sw"]
    r = _run(*base)
    assert r.exit_code == 0, r.output
    # the same folder with other rows (pooled per image): the fits there are not these, so refused
    r = _run(*base, "--rows", "pooled")
    assert r.exit_code == 1 and "pca-k2.safetensors was not fitted by this sweep" in r.output
    r = _run(*base[:-2], "-o", tmp_path / "pooled", "--rows", "pooled", "--json")
    assert r.exit_code == 0, r.output
    from c2mf_cli.artifacts.dictionary import ConceptDictionary

    info = ConceptDictionary.load(tmp_path / "pooled" / "dicts" / "pca-k2.safetensors").meta["source"]["info"]
    assert info["rows"] == "pooled" and info["group_by"] == "label"
    # the tiny random model predicts none of the store's classes: grouping by prediction says so
    r = _run(*base[:-2], "-o", tmp_path / "pred", "--group-by", "predicted")
    assert r.exit_code == 2 and "3 of 3 classes get no image" in r.output
    # a dictionary of another k at the path this sweep would reuse: refused by name, never overwritten
    os.replace(tmp_path / "sw" / "dicts" / "pca-k2.safetensors", tmp_path / "keep.safetensors")
    r = _run("factorize", "-s", stores["train"], "--method", "pca", "-k", 3, "--device", "cpu", "-q",
             "-o", tmp_path / "sw" / "dicts" / "pca-k2.safetensors")
    assert r.exit_code == 0, r.output
    r = _run(*base)
    assert r.exit_code == 1 and "pca-k2.safetensors was not fitted by this sweep" in r.output
    # bad input: one clear line each
    r = _run("sweep", "--train", stores["train"], "--test", stores["test"], "--concepts", "4,2", "-o", tmp_path / "x")
    assert r.exit_code != 0 and "--concepts takes increasing, distinct numbers" in r.output
    r = _run("sweep", "--train", stores["train"], "--test", stores["test"], "--concepts", "2", "--method", "craft",
             "-o", tmp_path / "x")
    assert r.exit_code != 0 and "craft learns from crop activations: give --train-crops" in r.output
    r = _run("sweep", "--train", stores["train"], "--test", stores["test"], "--concepts", "two", "-o", tmp_path / "x")
    assert r.exit_code != 0 and "comma-separated whole numbers" in r.output
