"""The demo chain: recovery helpers on known answers, and the whole demo end to end at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from c2mf_cli.demo.pipeline import DemoConfig, gate_recovery, heatmap_recovery, planted_activations, run_demo
from c2mf_cli.demo.synthetic import World, WorldConfig, generate
from c2mf_cli.demo.train import TrainConfig, load_images, load_trained, normalize
from c2mf_cli.artifacts.dictionary import ConceptDictionary

TINY_WORLD = WorldConfig(n_classes=3, n_primitives=4, images_per_class=6, test_per_class=4, seed=1)


class _MaskStore:
    """A stand-in store whose activations at full image resolution are given per image (n, H, W, c)."""

    def __init__(self, world: World, acts: np.ndarray) -> None:
        self.classes = list(world.classes)
        labels = world.labels("test")
        paths = world.paths("test")
        self._idx = [np.nonzero(labels == y)[0] for y in range(len(self.classes))]
        self._acts, self._paths = acts, paths

    def n_images(self, y: int) -> int:
        return len(self._idx[y])

    def activations(self, y: int) -> np.ndarray:
        return self._acts[self._idx[y]]

    def paths(self, y: int) -> list[str]:
        return [str(self._paths[i]) for i in self._idx[y]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return generate(TINY_WORLD, tmp_path_factory.mktemp("world"))


def _identity_dictionary(world: World) -> ConceptDictionary:
    P = len(world.primitives)
    return ConceptDictionary({"W": torch.eye(P)}, {"method": "nmf", "classes": world.classes, "codes": "nnls"})


def test_recovery_is_one_for_perfect_concept_maps_and_near_zero_for_noise(world: World) -> None:
    masks = world.primitive_masks("test").astype(np.float32)  # (n, P, H, W)
    perfect = _MaskStore(world, masks.transpose(0, 2, 3, 1).copy())
    rec = heatmap_recovery(_identity_dictionary(world), perfect, world)
    assert rec["per_class"]["mean"] == pytest.approx(1.0)
    assert rec["shared"]["mean"] == pytest.approx(1.0)
    assert rec["shared"]["best_concept"] == list(range(len(world.primitives)))
    noise = np.random.default_rng(0).random(masks.transpose(0, 2, 3, 1).shape).astype(np.float32)
    rec = heatmap_recovery(_identity_dictionary(world), _MaskStore(world, noise), world)
    assert rec["shared"]["mean"] < 0.15 and rec["per_class"]["mean"] < 0.2


def test_gate_recovery_reads_planted_class_sets(world: World) -> None:
    P = len(world.primitives)
    logits = torch.where(torch.from_numpy(world.class_matrix()), 5.0, -5.0)
    d = ConceptDictionary({"W": torch.eye(P), "gates": logits},
                          {"method": "c2mf", "classes": world.classes, "codes": "nnls"})
    res = gate_recovery(d, world, list(range(P)))
    assert res["accuracy"] == 1.0 and res["exact"] == 1.0
    assert res["open_gates"]["class_00"] == list(world.class_primitives[0])
    shuffled = gate_recovery(d, world, list(reversed(range(P))))
    assert shuffled["accuracy"] < 1.0


def test_planted_activations_follow_the_class_structure(world: World) -> None:
    arrays, W = planted_activations(world, 16, 50, seed=0)
    assert W.shape == (len(world.primitives), 16) and (W >= 0).all()
    assert len(arrays) == len(world.classes) and all(a.shape == (50, 16) and (a >= 0).all() for a in arrays)


def _tiny_config() -> DemoConfig:
    return DemoConfig(world=TINY_WORLD, train=TrainConfig(epochs=1, batch_size=8), c2mf_concepts=4,
                      concepts_per_class=2, iterations=3, ig_steps=4, explain_images=1, planted_rows=40,
                      device="cpu")


def test_demo_end_to_end_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from c2mf_cli.cli import app

    monkeypatch.setattr(DemoConfig, "quick", classmethod(lambda cls, seed=0, device="auto": _tiny_config()))
    result = CliRunner().invoke(app, ["demo", "--quick", "--quiet", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "ground-truth concept recovery" in result.output and "c2mf" in result.output
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["method"] for r in summary["table"]] == ["c2mf", "craft", "pca"]
    # the reported accuracy is the saved model's, counted by hand on the world's test images
    world = World.load(tmp_path / "demo" / "world")
    with torch.no_grad():
        pred = load_trained(summary["model"]["checkpoint"])(normalize(load_images(world.paths("test")))).argmax(1)
    hits = int((pred == torch.as_tensor(world.labels("test"))).sum())
    assert summary["model"]["test_accuracy"] == hits / len(world.paths("test"))
    evaluation = json.loads((tmp_path / "demo" / "evaluation" / "evaluation.json").read_text())
    rec = evaluation["recovery"]
    assert set(rec["heatmaps"]) == {"c2mf", "craft", "pca"}
    for name in ("c2mf", "craft", "pca"):
        assert len(rec["heatmaps"][name]["per_class"]["best_iou"]) == TINY_WORLD.n_primitives
        assert rec["planted_dictionary"]["nonnegative"][name]["mean"] is not None
        assert rec["planted_dictionary"]["signed"][name]["mean"] is not None
    assert "accuracy" in rec["gates"]["c2mf"]
    # a re-run reuses the world, the model and the stores: their files are not written again
    kept = [tmp_path / "demo" / "world" / "world.json", Path(summary["model"]["checkpoint"]),
            *sorted((tmp_path / "demo").glob("stores/*/zarr.json"))]
    assert len(kept) > 2
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
    logged: list[str] = []
    again = run_demo(tmp_path / "demo", _tiny_config(), log=logged.append)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == before
    assert any("reusing the trained model" in m for m in logged)
    assert again.summary["model"]["test_accuracy"] == summary["model"]["test_accuracy"]


def test_demo_bad_device_is_one_clear_error(tmp_path: Path) -> None:
    from c2mf_cli.cli import app

    result = CliRunner().invoke(app, ["demo", "--device", "tpu", "--out", str(tmp_path / "d")])
    assert result.exit_code != 0 and "Error:" in result.output
