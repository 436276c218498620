"""evaluate()'s numbers pinned: every number of a small case (gated c2mf, per-class PCA, shared NMF, per-class
CRAFT with its clustering ablation; Grad-CAM, IG, Sobol; true, predicted and no-class encodings; a grid store and a
ViT store with a CLS token) must equal the numbers the unbatched evaluate gave before its speed work, to float
tolerance. tests/data/evaluate_pinned.json holds them; `python -m tests.test_evaluate_pinned` rewrites it (only
for a change that is meant to change the numbers, said in its commit).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.stages.evaluate import EvaluateConfig, evaluate

from .test_evaluate import FakeStore

PINNED = Path(__file__).parent / "data" / "evaluate_pinned.json"
C, K, N_CLS, GRID = 12, 4, 4, 3
CLASSES = [f"class{i}" for i in range(N_CLS)]


def _case(vit: bool):
    """Stores whose model often predicts another class than the label (so predicted-class groups split a class),
    a non-linear h, and four dictionaries of different kinds."""
    g = torch.Generator().manual_seed(3 if vit else 2)
    planted = torch.rand(K + 2, C, generator=g)
    proj = torch.randn(C, N_CLS, generator=g)

    if vit:
        def tail(t: torch.Tensor) -> torch.Tensor:  # (m, 1 + P, C): CLS first
            return (torch.tanh(t[:, 0]) + torch.relu(t[:, 1:]).pow(1.5).mean(1)) @ proj
    else:
        def tail(a: torch.Tensor) -> torch.Tensor:  # (m, H, W, C)
            return torch.relu(a - 0.5).pow(1.5).mean(dim=(1, 2)) @ proj

    def make(n: int, fp: str) -> FakeStore:
        acts, logits, labels = [], [], []
        for y in range(N_CLS):
            U = torch.rand(n, GRID * GRID, K + 2, generator=g)
            U[..., y] += 1.0
            A = U @ planted + 0.05 * torch.randn(n, GRID * GRID, C, generator=g)
            A = torch.cat([torch.randn(n, 1, C, generator=g), A], 1) if vit else A.reshape(n, GRID, GRID, C)
            acts.append(A.numpy())
            logits.append(tail(A).numpy())
            labels.append(np.full(n, y))
        return FakeStore(acts, logits, labels, fingerprint=fp, prefix=1 if vit else 0,
                         layout="tokens" if vit else "nhwc")

    W = torch.randn(K, C, generator=g)
    c2mf = ConceptDictionary({"W": W / W.norm(dim=1, keepdim=True), "gates": torch.randn(N_CLS, K, generator=g)},
                             {"method": "c2mf", "classes": CLASSES, "ridge": 0.1})
    Q = torch.linalg.qr(torch.randn(N_CLS, C, 3, generator=g)).Q.mT.contiguous()
    pca = ConceptDictionary({"W": Q, "mean": torch.rand(N_CLS, C, generator=g)}, {"method": "pca", "classes": CLASSES})
    nmf = ConceptDictionary({"W": torch.rand(K, C, generator=g)}, {"method": "nmf", "classes": CLASSES})
    craft = ConceptDictionary({"W": torch.rand(N_CLS, 2, C, generator=g)}, {"method": "craft", "classes": CLASSES})
    return tail, make(5, "train"), make(4, "test"), [c2mf, pca, nmf, craft]


def _run(vit: bool) -> dict[str, Any]:
    tail, train, test, dicts = _case(vit)
    cfg = EvaluateConfig(ig_steps=6, batch_size=40, cluster_ks=(2, 3), rankings=("gradcam", "ig", "sobol"),
                         sobol_designs=4, encode_class=("predicted", "true", "none"))
    res = evaluate(train, test, dicts, config=cfg, tail=tail, device="cpu")
    # the numbers, not the record of how they were made (settings and inputs grow fields over time)
    return {k: v for k, v in res.items() if k not in ("time_s", "inputs", "settings")}


def _compare(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            _compare(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            _compare(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        if math.isnan(want):
            assert isinstance(got, float) and math.isnan(got), f"{where}: {got} != nan"
        else:
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=float))


@pytest.mark.parametrize("vit", [False, True], ids=["grid", "vit"])
def test_evaluate_numbers_are_pinned(vit):
    want = json.loads(PINNED.read_text())["vit" if vit else "grid"]
    _compare(_jsonable(_run(vit)), want, "result")


if __name__ == "__main__":
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text(json.dumps({"grid": _jsonable(_run(False)), "vit": _jsonable(_run(True))}, indent=1) + "\n")
    print(PINNED)
