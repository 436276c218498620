"""The provenance record: written by the store, recorded by the dictionary, read back typed in one place."""

from __future__ import annotations

import pytest

from c2mf_cli.artifacts.provenance import ENCODING_TYPE, Provenance
from c2mf_cli.errors import C2MFError


def _record() -> Provenance:
    return Provenance(model="/m/net.py:create", checkpoint="/m/w.safetensors", weights_sha256="ab" * 32,
                      layer="blocks.3", layout="tokens", grid=(7, 7), num_prefix_tokens=1, channels=768,
                      preprocess={"input_size": [3, 224, 224]}, mode="full", split="train", files_sha256="cd" * 32,
                      seed=0, c2mf_version="0.1.0", classes=("cat", "dog"), class_indices=(3, 5), store="/s.zarr",
                      fingerprint="ef" * 32)


def test_round_trip_and_identity():
    p = _record()
    d = p.to_dict()
    assert d["encoding-type"] == ENCODING_TYPE and d["layer"] == "blocks.3" and d["grid"] == [7, 7]
    assert Provenance.read(d) == p
    assert p.identity() == {"weights_sha256": "ab" * 32, "model": "/m/net.py:create", "layer": "blocks.3",
                            "channels": 768}
    assert p.describe() == "/m/net.py:create (weights abababababab) at layer 'blocks.3' (768 channels)"


def test_older_shapes_are_read_in_one_place():
    flat = {"store": "/s.zarr", "fingerprint": "f", "model": {"name": "resnet18", "weights_sha256": "aa"},
            "layer": "layer4", "layout": "nchw", "grid": [7, 7], "num_prefix_tokens": 0, "row_shape": [7, 7, 512],
            "classes": ["cat", "dog"], "class_indices": [3, 5]}
    p = Provenance.read(flat)
    assert (p.model, p.weights_sha256, p.layer, p.channels, p.grid) == ("resnet18", "aa", "layer4", 512, (7, 7))
    assert dict(zip(p.class_indices, p.classes)) == {3: "cat", 5: "dog"}
    attrs = {"config": {"model": {"name": "x.py:f", "checkpoint": "w.pt", "weights_sha256": "bb"}, "layer": "act",
                        "split_info": {"layout": "nchw", "grid": [4, 4], "num_prefix_tokens": 0, "channels": 8},
                        "mode": "full"},
             "classes": [{"name": "plain", "label": 0}, {"name": "red", "label": 1}]}
    q = Provenance.read(attrs)
    assert (q.model, q.checkpoint, q.layer, q.channels, q.classes) == ("x.py:f", "w.pt", "act", 8, ("plain", "red"))
    assert Provenance.read(None) == Provenance()


def test_edited_or_newer_records_are_refused():
    d = _record().to_dict()
    with pytest.raises(C2MFError, match="unknown fields \\['layer_name'\\]"):
        Provenance.read({**d, "layer_name": "x"})
    with pytest.raises(C2MFError, match="reads up to 2: upgrade c2mf"):
        Provenance.read({**d, "encoding-version": 3})
    # a version-1 record (before readable labels) still reads
    old = {k: v for k, v in d.items() if k != "labels"}
    assert Provenance.read({**old, "encoding-version": 1}).labels == ()
    with pytest.raises(C2MFError, match="expected 'c2mf-provenance'"):
        Provenance.read({**d, "encoding-type": "something"})


def test_store_and_dictionary_carry_the_same_record(tiny_store):
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.stages.factorize import factorize

    store = ActivationStore.open(tiny_store)
    p = store.provenance
    assert (p.layer, p.mode, p.layout, p.channels, p.store) == ("layer3", "full", "nchw", 192, str(tiny_store))
    assert p.weights_sha256 == store.weights_sha256 and p.fingerprint == store.fingerprint
    d = factorize(store.row_source(), "pca", concepts=3, device="cpu")
    assert d.provenance == p


def test_a_dictionary_fitted_on_regrouped_rows_records_how(tiny_store):
    """Pooled rows (one per image): the record says how the rows were drawn, and reads back."""
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.stages.factorize import factorize

    store = ActivationStore.open(tiny_store)
    d = factorize(store.row_source(rows="pooled"), "pca", concepts=2, device="cpu")
    p = d.provenance
    assert (p.rows, p.group_by, p.left_out) == ("pooled", "label", 0)
    assert p.layer == "layer3" and p.fingerprint == store.fingerprint
    assert store.provenance.rows is None


def test_a_dictionary_written_before_the_record_still_reads(tiny_store, tmp_path):
    """A dictionary of an older c2mf holds the flat describe_source() (model as a dict, row_shape): it loads,
    says what produced it, and is checked against a store as before."""
    from c2mf_cli.artifacts.dictionary import ConceptDictionary, mismatch_message
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.stages.factorize import factorize

    store = ActivationStore.open(tiny_store)
    d = factorize(store.row_source(), "pca", concepts=3, device="cpu")
    cfg = store.config
    d.meta["source"]["info"] = {
        "store": str(tiny_store), "fingerprint": store.fingerprint, "model": cfg["model"], "layer": store.layer,
        "mode": store.mode, "layout": store.layout, "grid": list(store.grid), "num_prefix_tokens": 0,
        "row_shape": list(store.row_shape), "preprocess": cfg["preprocess"], "classes": store.classes,
        "class_indices": store.class_indices}
    old = ConceptDictionary.load(d.save(tmp_path / "old.safetensors"))
    assert old.path == tmp_path / "old.safetensors"
    assert old.provenance.identity() == store.provenance.identity()
    assert old.provenance.class_indices == store.provenance.class_indices
    old.check_compatible(store.describe_source())
    other = dict(store.describe_source(), layer="layer2")
    with pytest.raises(C2MFError, match="fitted on layer 'layer3', the store has 'layer2'"):
        old.check_compatible(other)
    assert f"({tmp_path / 'old.safetensors'})" in mismatch_message(old, "old", other, 192)
    assert "path" not in old.meta  # the file's own path is never saved into it
