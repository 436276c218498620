"""ConceptDictionary (a plain artifact) and the methods' entry on it: encode / decode / gates dispatched by the
recorded method, the safetensors file, version checks and compatibility checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from c2mf_cli.artifacts.dictionary import ENCODING_VERSION, ConceptDictionary, tensors_sha256
from c2mf_cli.errors import C2MFError
from c2mf_cli.methods import basis, check_dictionary, concepts_used, decode, encode, needs_class


def _c2mf_dict() -> ConceptDictionary:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 6, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    gates = torch.tensor([[5.0, 5.0, -5.0, -5.0], [-5.0, 5.0, 5.0, 0.2]])
    meta = {"method": "c2mf", "classes": ["cat", "dog"], "ridge": 0.1,
            "source": {"info": {"model": {"name": "resnet18"}, "layer": "layer4", "layout": "nchw"}}}
    return ConceptDictionary({"W": W, "gates": gates}, meta)


def test_basis_is_gated_dictionary_and_concepts_used():
    d = _c2mf_dict()
    B = basis(d, 0)
    torch.testing.assert_close(B, torch.sigmoid(d.tensors["gates"][0])[:, None] * d.tensors["W"])
    assert concepts_used(d, 0) == [0, 1]
    assert concepts_used(d, 1) == [1, 2, 3]
    assert concepts_used(d, 1, threshold=0.6) == [1, 2]


def test_encode_decode_numpy_and_torch():
    d = _c2mf_dict()
    rng = np.random.default_rng(0)
    U_true = np.zeros((10, 4), np.float32)
    U_true[:, :2] = rng.random((10, 2))
    A = decode(d, U_true, 0)
    assert isinstance(A, np.ndarray) and A.shape == (10, 6)
    U = encode(d, A, 0)
    assert isinstance(U, np.ndarray) and (U >= 0).all()
    Ut = encode(d, torch.from_numpy(A), 0)
    assert isinstance(Ut, torch.Tensor)
    np.testing.assert_allclose(Ut.numpy(), U, atol=1e-6)
    # the ridge shrinks codes a little; the reconstruction stays close
    assert np.linalg.norm(decode(d, U, 0) - A) < 0.2 * np.linalg.norm(A)


def test_class_is_required_for_gated_and_range_checked():
    d = _c2mf_dict()
    with pytest.raises(C2MFError, match="give the class index y"):
        basis(d)
    with pytest.raises(C2MFError, match="out of range"):
        basis(d, 5)
    with pytest.raises(C2MFError, match="'bird' is not in this dictionary"):
        d.class_index("bird")
    with pytest.raises(C2MFError, match=r"expected \(n, 6\)"):
        encode(d, np.zeros((3, 5), np.float32), 0)
    with pytest.raises(C2MFError, match="do not match the dictionary's 4 concepts"):
        decode(d, np.zeros((3, 5), np.float32), 0)


def test_pca_projection_codes():
    W = torch.eye(3, 5)
    mean = torch.arange(5, dtype=torch.float32)
    d = ConceptDictionary({"W": W, "mean": mean}, {"method": "pca", "classes": ["a"]})
    A = np.ones((2, 5), np.float32)
    U = encode(d, A)
    np.testing.assert_allclose(U, (A - mean.numpy()) @ W.numpy().T)
    np.testing.assert_allclose(decode(d, U), U @ W.numpy() + mean.numpy())


def test_whether_a_class_is_needed_is_the_methods_call():
    W, W3 = torch.eye(3, 5), torch.rand(2, 3, 5)
    classes = {"classes": ["a", "b"]}
    assert needs_class(_c2mf_dict())  # gates, with a shared W
    assert not needs_class(ConceptDictionary({"W": W}, {"method": "nmf", **classes}))
    assert needs_class(ConceptDictionary({"W": W3}, {"method": "craft", **classes}))
    # PCA: a shared basis with per-class means still codes each class differently
    per_mean = ConceptDictionary({"W": W, "mean": torch.rand(2, 5)}, {"method": "pca", **classes})
    assert needs_class(per_mean)
    with pytest.raises(C2MFError, match="give the class index y"):
        encode(per_mean, np.ones((1, 5), np.float32))


def test_unknown_method_and_undeclared_tensors_are_refused():
    with pytest.raises(C2MFError, match="method 'ica', which this c2mf does not know"):
        encode(ConceptDictionary({"W": torch.eye(3)}, {"method": "ica", "classes": ["a"]}), np.ones((1, 3)))
    check_dictionary(_c2mf_dict())
    no_gates = ConceptDictionary({"W": torch.eye(4, 6)}, {"method": "c2mf", "classes": ["cat", "dog"]})
    with pytest.raises(C2MFError, match="lacks its tensor 'gates'"):
        check_dictionary(no_gates)
    short = ConceptDictionary(_c2mf_dict().tensors, {"method": "c2mf", "classes": ["cat"]})
    with pytest.raises(C2MFError, match=r"'gates' has shape \(2, 4\), expected \(m, k\) with m=1"):
        check_dictionary(short)
    with pytest.raises(C2MFError, match="does not declare: mean"):
        check_dictionary(ConceptDictionary({"W": torch.eye(3), "mean": torch.zeros(3)},
                                           {"method": "nmf", "classes": ["a"]}))


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
    with pytest.raises(C2MFError, match=f"reads up to {ENCODING_VERSION}: upgrade c2mf or refit"):
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


def _rewrite(tmp_path: Path, name: str, tensors: dict, meta: dict, checksum: bool = True) -> Path:
    """A dictionary file edited by hand; with `checksum`, its sha256 recomputed as a careful forger would."""
    meta = dict(meta)
    if checksum:
        meta["tensors_sha256"] = tensors_sha256(tensors)
    save_file(tensors, str(tmp_path / name), metadata={"c2mf": json.dumps(meta)})
    return tmp_path / name


def test_load_refuses_damaged_or_edited_tensors(tmp_path: Path):
    d = _c2mf_dict()
    path = d.save(tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # one flipped bit in the last tensor's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(C2MFError, match=r"flipped.safetensors: its tensors do not match the sha256"):
        ConceptDictionary.load(tmp_path / "flipped.safetensors")
    tensors, meta = load_file(str(path)), dict(d.meta)
    with pytest.raises(C2MFError, match="tensor 'W' is int32, a dictionary holds float32 only"):
        ConceptDictionary.load(_rewrite(tmp_path, "int.safetensors", {**tensors, "W": tensors["W"].to(torch.int32)},
                                        meta))
    nan_w = tensors["W"].clone()
    nan_w[0, 0] = float("nan")
    with pytest.raises(C2MFError, match="tensor 'W' holds 1 NaN or infinite value"):
        ConceptDictionary.load(_rewrite(tmp_path, "nan.safetensors", {**tensors, "W": nan_w}, meta))
    inf_gates = tensors["gates"].clone()
    inf_gates[1, 2] = float("inf")
    with pytest.raises(C2MFError, match="tensor 'gates' holds 1 NaN or infinite"):
        ConceptDictionary.load(_rewrite(tmp_path, "inf.safetensors", {**tensors, "gates": inf_gates}, meta))
    with pytest.raises(C2MFError, match="do not match the sha256"):  # gates removed, checksum left as it was
        ConceptDictionary.load(_rewrite(tmp_path, "nogates.safetensors", {"W": tensors["W"]}, meta, checksum=False))
    old = {k: v for k, v in meta.items() if k != "tensors_sha256"}
    old["encoding-version"] = 1
    with pytest.raises(C2MFError, match="older c2mf .* without a checksum of its tensors: refit it"):
        ConceptDictionary.load(_rewrite(tmp_path, "v1.safetensors", tensors, old, checksum=False))
    assert ConceptDictionary.load(path).meta["tensors_sha256"] == tensors_sha256(d.tensors)
    from c2mf_cli.stages.verify import verify

    report = verify(path)
    assert report.ok and report.kind == "dictionary" and report.checked == {"tensors": 2}
    [problem] = verify(tmp_path / "flipped.safetensors").problems
    assert "flipped.safetensors: its tensors do not match" in problem
