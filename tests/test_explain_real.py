"""Real data: a CUB bird explained with the bird MobileNetV2 and a dictionary fitted on CUB activations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "cub" / "mobilenet_v2_inat_birds.pt").is_file(),
                       reason=f"real data not found at {DATA} (CUB images + bird MobileNetV2)"),
]


def test_cub_bird_explained(tmp_path):
    from c2mf_cli.stages.explain import ExplainConfig, Explainer, explain_images
    from c2mf_cli.methods import get_method
    from c2mf_cli.inputs.models import ModelSpec, load_model, split_model
    from c2mf_cli.inputs.images import read_image
    from c2mf_cli.artifacts.sources import ArraySource

    index = json.loads((DATA / "cub" / "class_index.json").read_text())["classes"]
    names = ["American_Goldfinch", "American_Redstart"]
    spec = ModelSpec(name=f"{DATA / 'models.py'}:mobilenet_v2_inat_birds",
                     checkpoint=str(DATA / "cub" / "mobilenet_v2_inat_birds.pt"))
    lm = load_model(spec)
    layer = "head_conv"
    split = split_model(lm.model, layer)
    arrays, paths = [], []
    for n in names:
        ps = sorted((DATA / "cub" / "images" / n).glob("*.jpg"))[:6]
        paths.append(ps)
        x = torch.stack([lm.preprocess(read_image(p)) for p in ps])
        with torch.no_grad():
            a = split.to_store(split.g(x)).numpy()
        arrays.append(a.reshape(-1, a.shape[-1]))
    info = {"config": {"model": {**spec.to_dict(), "weights_sha256": lm.weights_sha256}, "layer": layer,
                       "preprocess": lm.preprocess.to_dict(), "split_info": split.describe(), "mode": "full",
                       "data": {"labels": {n: index[n]["model_label"] for n in names}}},
            "classes": [{"name": n, "label": index[n]["model_index"]} for n in names]}
    method = get_method("pca")
    d = method.fit(ArraySource(arrays, names, "full", info), method.make_config(concepts=6),
                   device=torch.device("cpu"))
    dpath = d.save(tmp_path / "cub_pca.safetensors")
    # the bird model is code (models.py:factory): explain runs it only when named, as a user would
    ex = Explainer.create(dpath, ExplainConfig(top=4), model=spec.name, checkpoint=spec.checkpoint,
                          labels=DATA / "cub" / "inat_bird_labels.txt", device="cpu")
    bird = sorted((DATA / "cub" / "images" / "American_Goldfinch").glob("*.jpg"))[10]
    s = explain_images([bird], ex, tmp_path / "out")
    assert not s["failed"]
    rec = json.loads((tmp_path / "out" / f"{bird.stem}.json").read_text())
    assert rec["prediction"]["index"] == index["American_Goldfinch"]["model_index"]
    assert "Goldfinch" in rec["prediction"]["label"]
    assert np.asarray(rec["codes"]).shape == (7, 7, 6)
    assert (tmp_path / "out" / f"{bird.stem}.png").stat().st_size > 50_000
    # without --labels, the class index's readable labels the store recorded name the classes; --class still
    # takes the store's class (folder) name
    plain = Explainer.create(dpath, ExplainConfig(top=4), model=spec.name, device="cpu")
    goldfinch = index["American_Goldfinch"]
    assert plain.label(goldfinch["model_index"]) == goldfinch["model_label"]
    probs = np.zeros(plain.n_outputs)
    assert plain.resolve_target("American_Goldfinch", probs) == goldfinch["model_index"]
    assert plain.resolve_target(goldfinch["model_label"], probs) == goldfinch["model_index"]
