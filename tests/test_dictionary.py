"""ConceptDictionary: the contract, the safetensors file, version checks and compatibility checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from c2mf_cli.artifacts.dictionary import ENCODING_VERSION, ConceptDictionary
from c2mf_cli.errors import C2MFError


def _c2mf_dict() -> ConceptDictionary:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 6, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    gates = torch.tensor([[5.0, 5.0, -5.0, -5.0], [-5.0, 5.0, 5.0, 0.2]])
    meta = {"method": "c2mf", "classes": ["cat", "dog"], "codes": "nnls", "ridge": 0.1,
            "source": {"info": {"model": {"name": "resnet18"}, "layer": "layer4", "layout": "nchw"}}}
    return ConceptDictionary({"W": W, "gates": gates}, meta)


def test_basis_is_gated_dictionary_and_concepts_used():
    d = _c2mf_dict()
    B = d.basis(0)
    torch.testing.assert_close(B, torch.sigmoid(d.tensors["gates"][0])[:, None] * d.tensors["W"])
    assert d.concepts_used(0) == [0, 1]
    assert d.concepts_used(1) == [1, 2, 3]
    assert d.concepts_used(1, threshold=0.6) == [1, 2]


def test_encode_decode_numpy_and_torch():
    d = _c2mf_dict()
    rng = np.random.default_rng(0)
    U_true = np.zeros((10, 4), np.float32)
    U_true[:, :2] = rng.random((10, 2))
    A = d.decode(U_true, 0)
    assert isinstance(A, np.ndarray) and A.shape == (10, 6)
    U = d.encode(A, 0)
    assert isinstance(U, np.ndarray) and (U >= 0).all()
    Ut = d.encode(torch.from_numpy(A), 0)
    assert isinstance(Ut, torch.Tensor)
    np.testing.assert_allclose(Ut.numpy(), U, atol=1e-6)
    # the ridge shrinks codes a little; the reconstruction stays close
    assert np.linalg.norm(d.decode(U, 0) - A) < 0.2 * np.linalg.norm(A)


def test_class_is_required_for_gated_and_range_checked():
    d = _c2mf_dict()
    with pytest.raises(C2MFError, match="give the class index y"):
        d.basis()
    with pytest.raises(C2MFError, match="out of range"):
        d.basis(5)
    with pytest.raises(C2MFError, match="'bird' is not in this dictionary"):
        d.class_index("bird")
    with pytest.raises(C2MFError, match=r"expected \(n, 6\)"):
        d.encode(np.zeros((3, 5), np.float32), 0)


def test_pca_projection_codes():
    W = torch.eye(3, 5)
    mean = torch.arange(5, dtype=torch.float32)
    d = ConceptDictionary({"W": W, "mean": mean}, {"method": "pca", "classes": ["a"], "codes": "projection"})
    A = np.ones((2, 5), np.float32)
    U = d.encode(A)
    np.testing.assert_allclose(U, (A - mean.numpy()) @ W.numpy().T)
    np.testing.assert_allclose(d.decode(U), U @ W.numpy() + mean.numpy())


def test_save_load_roundtrip_atomic(tmp_path: Path):
    d = _c2mf_dict()
    path = d.save(tmp_path / "sub" / "dict.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["dict.safetensors"]  # no temporary left over
    e = ConceptDictionary.load(path)
    assert e.meta["encoding-type"] == "c2mf-dictionary" and e.meta["encoding-version"] == ENCODING_VERSION
    assert e.classes == ["cat", "dog"] and e.method == "c2mf"
    for name in d.tensors:
        torch.testing.assert_close(d.tensors[name], e.tensors[name])
    raw = path.read_bytes()
    assert b"pickle" not in raw and not raw.startswith(b"\x80")


def test_load_refuses_wrong_type_newer_version_and_garbage(tmp_path: Path):
    d = _c2mf_dict()
    path = d.save(tmp_path / "d.safetensors")
    tensors = load_file(str(path))
    meta = dict(d.meta)
    meta["encoding-version"] = ENCODING_VERSION + 1
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata={"c2mf": json.dumps(meta)})
    with pytest.raises(C2MFError, match="reads up to 1: upgrade c2mf or refit"):
        ConceptDictionary.load(tmp_path / "newer.safetensors")
    meta["encoding-version"], meta["encoding-type"] = ENCODING_VERSION, "something-else"
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"c2mf": json.dumps(meta)})
    with pytest.raises(C2MFError, match="expected 'c2mf-dictionary'"):
        ConceptDictionary.load(tmp_path / "other.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(C2MFError, match="not a c2mf dictionary"):
        ConceptDictionary.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(C2MFError, match="not a readable c2mf dictionary"):
        ConceptDictionary.load(tmp_path / "junk.safetensors")
    with pytest.raises(C2MFError, match="no dictionary file"):
        ConceptDictionary.load(tmp_path / "missing.safetensors")


def test_check_compatible_names_both_sides():
    d = _c2mf_dict()
    d.check_compatible({"model": {"name": "resnet18"}, "layer": "layer4", "layout": "nchw", "fingerprint": "x"})
    with pytest.raises(C2MFError, match="layer 'layer4', the store has 'layer3'"):
        d.check_compatible({"model": {"name": "resnet18"}, "layer": "layer3"})
    with pytest.raises(C2MFError, match="model 'resnet18', the store has 'vit_base_patch32_224'"):
        d.check_compatible({"model": {"name": "vit_base_patch32_224"}, "layer": "layer4"})


def _store_info(**over: object) -> dict:
    model = {"name": "/a/models.py:net", "checkpoint": "/a/net.pt", "pretrained": False, "weights_sha256": "ab12"}
    info = {"store": "/a/train.zarr", "fingerprint": "f1", "model": model, "layer": "layer4", "mode": "full",
            "layout": "nchw", "grid": [7, 7], "num_prefix_tokens": 0, "row_shape": [7, 7, 6],
            "preprocess": {"size": 224}, "classes": ["cat", "dog"], "class_indices": [0, 1]}
    info.update(over)
    return info


def _dict_on(info: dict) -> ConceptDictionary:
    d = _c2mf_dict()
    d.meta["source"] = {"info": info}
    return d


def test_check_compatible_same_weights_elsewhere_is_accepted():
    d = _dict_on(_store_info())
    moved = {"name": "/b/copy/models.py:net", "checkpoint": "/b/copy/net.pt", "pretrained": False,
             "weights_sha256": "ab12"}
    # same weights at another path, another store (crops of the same layer, other grid, other classes): fine
    d.check_compatible(_store_info(model=moved, store="/b/test.zarr", fingerprint="f2", mode="crops",
                                   row_shape=[6], grid=[14, 14], classes=["dog"], class_indices=[1]))


def test_check_compatible_refuses_other_weights_layer_or_width():
    d = _dict_on(_store_info())
    other = dict(_store_info()["model"], weights_sha256="cd34")  # same name and path, other weights
    with pytest.raises(C2MFError, match=r"model weights \(sha256\) 'ab12', the store has 'cd34'"):
        d.check_compatible(_store_info(model=other))
    with pytest.raises(C2MFError, match="layer 'layer4', the store has 'layer3'"):
        d.check_compatible(_store_info(layer="layer3"))
    with pytest.raises(C2MFError, match="channels 6, the store has 12"):
        d.check_compatible(_store_info(row_shape=[7, 7, 12]))
