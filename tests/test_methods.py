"""Every registered method through the same contract tests (registry, fit, encode/decode, save/load,
seed, streaming == full batch, bad inputs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.errors import C2MFError, UsageError
from c2mf_cli.stages.factorize import factorize, make_config
from c2mf_cli.methods import (basis, check_dictionary, concepts_used, config_from_options, decode, encode,
                              get_method, list_methods, method_options, method_table)
from c2mf_cli.artifacts.sources import ArraySource

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0, classes: int = 3, n: int = 240, c: int = 16, k: int = 4) -> list[np.ndarray]:
    """Non-negative planted data (so every method, NMF included, applies)."""
    rng = np.random.default_rng(seed)
    W = np.abs(rng.standard_normal((k, c)))
    return [(rng.exponential(1.0, (n, k)) @ W + 0.05 * rng.random((n, c))).astype(np.float32)
            for _ in range(classes)]


def _source(method: str, arrays: list[np.ndarray] | None = None) -> ArraySource:
    m = get_method(method)
    return ArraySource(arrays if arrays is not None else _data(), classes=["a", "b", "c"][: len(arrays or _data())],
                       mode=m.needs, info={"model": {"name": "toy"}, "layer": "l1", "fingerprint": "f0"})


def _options(method: str, **extra) -> dict:
    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    opts = {"concepts": 4, "iterations": 12, "batch_size": 100, "seed": 3, "lr": 1e-2}  # lr: the sae's, for 96 steps
    opts.update(extra)
    return {k: v for k, v in opts.items() if k in fields}


METHODS = list_methods()


def test_registry_lists_every_method_and_refuses_unknown_names():
    assert {"c2mf", "craft", "pca", "nmf", "semi-nmf"} <= set(METHODS) and METHODS[0] == "c2mf"
    rows = method_table()
    assert [r["name"] for r in rows] == METHODS
    assert all(r["description"] and r["learns_from"] in ("full", "crops") for r in rows)
    with pytest.raises(C2MFError, match=f"unknown method 'ica': choose one of {', '.join(METHODS)}"):
        get_method("ica")


def test_configs_are_frozen_and_refuse_unknown_settings():
    cfg = make_config("c2mf", concepts=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.concepts = 6  # type: ignore[misc]
    with pytest.raises(UsageError, match="method 'pca' does not take alpha"):
        make_config("pca", concepts=5, alpha=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_fit_encode_decode_contract(method):
    src = _source(method)
    d = factorize(src, method, device="cpu", **_options(method))
    assert isinstance(d, ConceptDictionary)
    assert d.method == method and d.classes == ["a", "b", "c"] and d.n_concepts == 4 and d.n_features == 16
    assert d.meta["source"]["info"]["layer"] == "l1" and d.meta["device"] == "cpu"
    assert d.meta["config"]["concepts"] == 4 and d.meta["history"] and d.meta["fit_seconds"] > 0
    m = get_method(method)
    if not m.signed_dictionary:
        assert (d.tensors["W"] >= 0).all()
    check_dictionary(d)  # the tensors it wrote are the ones it declares
    for y in range(3):
        A = src.load(y)
        B = basis(d, y)
        assert B.shape == (4, 16)
        U = encode(d, A, y)
        assert U.shape == (A.shape[0], 4)
        if not m.signed_codes:
            assert (U >= 0).all()
        R = decode(d, U, y)
        rel = np.linalg.norm(R - A) / np.linalg.norm(A)
        assert rel < 0.35, (method, y, rel)
        assert len(concepts_used(d, y)) <= 4


@pytest.mark.parametrize("method", METHODS)
def test_save_load_gives_the_same_codes(method, tmp_path: Path):
    src = _source(method)
    d = factorize(src, method, device="cpu", **_options(method))
    e = ConceptDictionary.load(d.save(tmp_path / f"{method}.safetensors"))
    assert e.meta == d.meta
    A = src.load(1)
    # same tensors; only float rounding may differ (reloaded buffers can take other SIMD paths)
    np.testing.assert_allclose(encode(e, A, 1), encode(d, A, 1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_seed_makes_a_fit_reproducible(method):
    src = _source(method)
    d1 = factorize(src, method, device="cpu", **_options(method, seed=7))
    d2 = factorize(src, method, device="cpu", **_options(method, seed=7))
    for name in d1.tensors:
        torch.testing.assert_close(d1.tensors[name], d2.tensors[name], atol=0, rtol=0)


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).batch_invariant])
def test_streaming_equals_full_batch(method):
    src = _source(method)
    full = factorize(src, method, device="cpu", **_options(method, batch_size=None))
    stream = factorize(src, method, device="cpu", **_options(method, batch_size=37))
    for name in full.tensors:
        torch.testing.assert_close(full.tensors[name], stream.tensors[name], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("method", [m for m in METHODS if not get_method(m).supports_overcomplete])
def test_k_larger_than_channels(method):
    with pytest.raises(UsageError, match="--concepts 17 is larger than the 16 channels"):
        factorize(_source(method), method, device="cpu", **_options(method, concepts=17))


def test_options_come_from_the_configs():
    """Every config field declared with `option` is a factorize option, with one flag and one meaning."""
    opts = {o.name: o for o in method_options()}
    for name in METHODS:
        cfg = get_method(name).config_class
        declared = {f.name for f in dataclasses.fields(cfg) if "help" in f.metadata}
        assert declared and all(name in opts[f].defaults for f in declared)
        assert {f for f, o in opts.items() if name in o.defaults} == declared
    assert opts["alpha"].value_types == (float, str) and opts["shared"].flag == "--shared/--per-class"
    assert opts["iterations"].default_text().startswith("100 (c2mf), 200 (craft, nmf, semi-nmf)")
    cfg = config_from_options("c2mf", 5, {"alpha": "0.05", "iterations": 7, "shared": None})
    assert cfg.alpha == 0.05 and cfg.iterations == 7
    assert config_from_options("c2mf", 5, {"alpha": "auto"}).alpha == "auto"
    with pytest.raises(UsageError, match=r"--alpha does not apply to --method pca \(it takes --batch-size, "):
        config_from_options("pca", 5, {"alpha": "0.1"})
    with pytest.raises(UsageError, match="--beta must be a finite number, got inf"):
        config_from_options("c2mf", 5, {"beta": float("inf")})


def test_a_field_shared_by_two_methods_must_keep_one_flag(monkeypatch):
    from c2mf_cli.methods import base

    @dataclasses.dataclass(frozen=True)
    class OddConfig:
        concepts: int
        seed: str = base.option("0", help="not the seed everyone else means")

    class Odd(base.Method):
        name, description, needs, config_class = "odd", "test", "full", OddConfig

    monkeypatch.setitem(base._REGISTRY, "odd", Odd)
    with pytest.raises(ValueError, match="option 'seed'.*one flag must keep one meaning"):
        method_options()


@pytest.mark.parametrize("method", METHODS)
def test_empty_class(method):
    arrays = _data()
    arrays[1] = arrays[1][:0]
    with pytest.raises(C2MFError, match="class 'b' has no activations"):
        factorize(_source(method, arrays), method, device="cpu", **_options(method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_late_batch(method, bad):
    arrays = _data()
    arrays[2][-1, 5] = bad  # in the last streamed batch of the last class
    with pytest.raises(C2MFError, match="class 'c' has NaN or infinite activations"):
        factorize(_source(method, arrays), method, device="cpu", **_options(method))


@pytest.mark.parametrize("method", METHODS)
def test_wrong_store_mode(method):
    m = get_method(method)
    other = "crops" if m.needs == "full" else "full"
    src = ArraySource(_data(), classes=["a", "b", "c"], mode=other)
    expected = "this store holds crops" if other == "crops" else "this store holds whole images"
    with pytest.raises(C2MFError, match=expected):
        factorize(src, method, device="cpu", **_options(method))


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).requires_nonnegative_input])
def test_signed_input_needs_explicit_shift(method):
    arrays = [a - 0.5 for a in _data()]
    src = _source(method, arrays)
    with pytest.raises(C2MFError, match="negative activations .* Pass --shift"):
        factorize(src, method, device="cpu", **_options(method))
    d = factorize(src, method, device="cpu", **_options(method, shift=True))
    lo = min(float(a.min()) for a in arrays)
    assert float(d.tensors["shift"]) == pytest.approx(-lo)
    A = arrays[0]
    rel = np.linalg.norm(decode(d, encode(d, A, 0), 0) - A) / np.linalg.norm(A)
    assert rel < 0.5


@pytest.mark.parametrize("method", ["c2mf", "nmf"])
def test_subsample_start_streaming_equals_full_batch(method):
    src = _source(method)
    full = factorize(src, method, device="cpu", **_options(method, batch_size=None, subsample_rows=90))
    stream = factorize(src, method, device="cpu", **_options(method, batch_size=50, subsample_rows=90))
    for h in (full.meta["history"][0], stream.meta["history"][0]):
        assert h["subsample"] is not None and h["subsample"]["rows"] == 90 and h["subsample"]["passes"] >= 1
    for name in full.tensors:
        torch.testing.assert_close(full.tensors[name], stream.tensors[name], atol=2e-4, rtol=2e-4)


class _CountingSource(ArraySource):
    """Counts the rows read, to see whether passes re-read the store."""

    rows_read = 0

    def load(self, y):
        a = super().load(y)
        self.rows_read += a.shape[0]
        return a

    def batches(self, y, batch_size, *, shuffle=False, seed=0):
        for b in super().batches(y, batch_size, shuffle=shuffle, seed=seed):
            self.rows_read += b.shape[0]
            yield b


@pytest.mark.parametrize("method", ["craft", "nmf"])
def test_small_classes_are_read_once_and_fit_in_memory(method):
    """A class that fits in one batch is read once (plus the start's sample), however many passes its fit takes,
    and the fit is the one streaming in small batches gives."""
    rng = np.random.default_rng(5)
    # noise well above float rounding: at tol 0 the stopping pass must not hang on the objective's last bits
    arrays = [a + rng.random(a.shape, dtype=np.float32) for a in _data(n=48)]
    src = _CountingSource(arrays, classes=["a", "b", "c"], mode=get_method(method).needs)
    d = factorize(src, method, device="cpu", **_options(method, iterations=30, tol=0.0, batch_size=1000))
    assert sum(h["passes"] for h in d.meta["history"]) == 90
    assert src.rows_read == 2 * 3 * 48  # the sample, then the class once; not once per pass
    stream = factorize(ArraySource(arrays, classes=["a", "b", "c"], mode=get_method(method).needs), method,
                       device="cpu", **_options(method, iterations=30, tol=0.0, batch_size=20))
    torch.testing.assert_close(d.tensors["W"], stream.tensors["W"], atol=2e-4, rtol=2e-4)
    bad = [a.copy() for a in arrays]
    bad[1][7, 3] = np.nan
    with pytest.raises(C2MFError, match="class 'b' has NaN"):
        factorize(ArraySource(bad, classes=["a", "b", "c"], mode=get_method(method).needs), method, device="cpu",
                  **_options(method, batch_size=1000))


@pytest.mark.parametrize("method", METHODS)
def test_every_code_rule_solves_against_the_methods_decoder(method):
    """codes=nnls / lstsq solve against the same decoder as the fit's rule: lstsq reaches the least-squares
    optimum of the decoder (no worse than any rule), nnls has no ridge and stays non-negative."""
    src = _source(method)
    d = factorize(src, method, device="cpu", **_options(method))
    A = src.load(1)
    err = {}
    for rule in ("fit", "nnls", "lstsq"):
        U = encode(d, A, 1, codes=rule)
        assert U.shape == (A.shape[0], 4)
        if rule == "nnls":
            assert (U >= 0).all()
        err[rule] = float(np.linalg.norm(decode(d, U, 1) - A))
    assert err["lstsq"] <= min(err["fit"], err["nnls"]) * (1 + 1e-4), err
    with pytest.raises(UsageError, match="unknown code rule 'ridge2'"):
        encode(d, A, 1, codes="ridge2")


def test_signed_codes_reconstruct_a_planted_signed_case_exactly():
    """A signed dictionary and signed codes: lstsq recovers them exactly, the fit's non-negative codes cannot."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 8)).astype(np.float32)
    U = rng.standard_normal((50, 3)).astype(np.float32)
    A = U @ W
    d = ConceptDictionary({"W": torch.from_numpy(W)}, {"method": "semi-nmf", "classes": ["a"], "ridge": 0.0})
    np.testing.assert_allclose(encode(d, A, codes="lstsq"), U, atol=1e-4)
    nonneg = decode(d, encode(d, A, iters=500), None)
    assert np.linalg.norm(nonneg - A) > 0.3 * np.linalg.norm(A)


@pytest.mark.parametrize("method,short", [("craft", 37), ("semi-nmf", 37), ("craft", 12)])
def test_per_class_fits_together_equal_one_class_at_a_time(method, short):
    """Per-class dictionaries fitted together (batched code and dictionary steps) are each class's own fit:
    class i alone, seeded as the joint fit seeds it (seed + i), gives the same dictionary and passes."""
    rng = np.random.default_rng(9)
    arrays = [a + 0.5 * rng.random(a.shape, dtype=np.float32) for a in _data(n=60, classes=3)]
    # unequal classes: 37 rows are padded to 60 in the joint solves' stacked rows; with 12, padding would add
    # more than a fifth, and the products are made class by class
    arrays[1] = arrays[1][:short]
    opts = _options(method, iterations=25, tol=1e-4, batch_size=1000)
    together = factorize(_source(method, arrays), method, device="cpu", **opts)
    for i, a in enumerate(arrays):
        alone = factorize(ArraySource([a], classes=["x"], mode=get_method(method).needs), method, device="cpu",
                          **dict(opts, seed=opts["seed"] + i))
        assert together.meta["history"][i]["passes"] == alone.meta["history"][0]["passes"]
        torch.testing.assert_close(together.tensors["W"][i], alone.tensors["W"][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["c2mf", "craft"])
def test_the_cache_budget_changes_reads_not_the_answer(method):
    """Rows above --cache-gb are streamed from the source on every pass (memory flat in the rows); below it they
    are read once. The dictionary is the same bit for bit (c2mf) or to float rounding (craft, whose classes are
    then fitted one after another instead of together)."""
    arrays = _data(n=48)
    opts = _options(method, iterations=6, tol=0.0, batch_size=20, subsample_rows=0)
    held = _CountingSource(arrays, classes=["a", "b", "c"], mode=get_method(method).needs)
    streamed = _CountingSource(arrays, classes=["a", "b", "c"], mode=get_method(method).needs)
    d_held = factorize(held, method, device="cpu", **opts)
    d_streamed = factorize(streamed, method, device="cpu", **dict(opts, cache_gb=0.0))
    sample = 3 * 48  # the start's sample: every row of these small classes
    assert held.rows_read == sample + 3 * 48
    assert streamed.rows_read == sample + 6 * 3 * 48
    for name, t in d_held.tensors.items():
        if method == "c2mf":
            assert torch.equal(t, d_streamed.tensors[name]), name
        else:
            torch.testing.assert_close(t, d_streamed.tensors[name], atol=1e-4, rtol=1e-4)
    with pytest.raises(UsageError, match="--cache-gb must be >= 0"):
        factorize(held, method, device="cpu", **dict(opts, cache_gb=-1.0))
