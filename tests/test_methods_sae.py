"""The TopK sparse autoencoder (`--method sae`): its encoder and decoder, overcompleteness, dead-latent
resampling, streaming, checkpoint / resume, and the whole chain (factorize -> evaluate -> explain) through the CLI.
The registry-wide contract tests (tests/test_methods.py) run on it too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.artifacts.sources import ArraySource
from c2mf_cli.cli import app
from c2mf_cli.errors import C2MFError, UsageError
from c2mf_cli.methods import check_dictionary, decode, encode, get_method, needs_class
from c2mf_cli.methods import sae as sae_module
from c2mf_cli.stages.factorize import factorize

pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(seed: int = 0, classes: int = 3, n: int = 300, c: int = 12, true_k: int = 24) -> list[np.ndarray]:
    """Signed rows that are sparse sums of 24 > c directions: an overcomplete dictionary can match them."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((true_k, c))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    out = []
    for _ in range(classes):
        U = rng.exponential(1.0, (n, true_k)) * (rng.random((n, true_k)) < 3 / true_k)
        out.append((U @ D + 0.3 + 0.01 * rng.standard_normal((n, c))).astype(np.float32))
    return out


def _source(arrays: list[np.ndarray]) -> ArraySource:
    return ArraySource(arrays, classes=[f"c{i}" for i in range(len(arrays))], info={"fingerprint": "planted"})


def _fit(arrays=None, **opts) -> ConceptDictionary:
    options = dict(concepts=48, top_k=4, iterations=15, batch_size=100, lr=1e-2, seed=0)
    options.update(opts)
    return factorize(_source(arrays if arrays is not None else _planted()), "sae", device="cpu", **options)


def test_encoder_decoder_are_the_topk_autoencoder():
    arrays = _planted()
    d = _fit(arrays)
    check_dictionary(d)
    assert d.n_concepts == 48 > d.n_features == 12  # overcomplete: 4x the channels
    assert not needs_class(d) and get_method("sae").supports_overcomplete
    torch.testing.assert_close(d.tensors["W"].norm(dim=1), torch.ones(48), atol=1e-5, rtol=0)
    A = np.concatenate(arrays)
    U = encode(d, A)
    assert U.shape == (A.shape[0], 48) and (U >= 0).all() and ((U > 0).sum(1) <= 4).all()
    t = {k: v.numpy() for k, v in d.tensors.items()}
    z = (A - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    kept = np.argsort(-z, axis=1)[:, :4]  # by hand: the 4 largest pre-activations, ReLU'd
    by_hand = np.zeros_like(z)
    np.put_along_axis(by_hand, kept, np.maximum(np.take_along_axis(z, kept, 1), 0), 1)
    np.testing.assert_allclose(U, by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode(d, U), U @ t["W"] + t["b_dec"], rtol=1e-5, atol=1e-5)
    rel = np.linalg.norm(decode(d, U) - A) / np.linalg.norm(A)
    final = d.meta["history"][0]["loss"][-1]
    # the recorded error is the final dictionary's on every row, on the raw (unscaled) activations
    assert final["relative_error"] == pytest.approx(rel, rel=1e-4)
    assert rel < 0.4 * np.linalg.norm(A - A.mean(0)) / np.linalg.norm(A)  # far better than the mean row
    assert d.meta["dead_fraction"] == final["dead_fraction"] == pytest.approx(float((U > 0).sum(0).__eq__(0).mean()))


def test_dead_latents_are_resampled_toward_high_error_rows():
    g = torch.Generator().manual_seed(0)
    k, c = 6, 4
    params = {"W_enc": torch.randn(c, k, generator=g), "b_enc": torch.ones(k), "W_dec": torch.randn(k, c, generator=g),
              "b_dec": torch.zeros(c)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=1e-3)
    sum(p.sum() for p in params.values()).backward()
    opt.step()  # moments are non-zero now
    x = torch.zeros(5, c)
    x[3] = torch.tensor([3.0, 0.0, 4.0, 0.0])  # the only row with an error
    x_hat = torch.zeros(5, c)
    silent = torch.tensor([0, 9, 2, 10, 0, 1])
    with torch.no_grad():
        n = sae_module._resample(params, opt, silent, 9, x, x_hat, (x - x_hat).pow(2).sum(1), g)
    assert n == 2 and silent.tolist() == [0, 0, 2, 0, 0, 1]
    for j in (1, 3):
        torch.testing.assert_close(params["W_dec"][j].detach(), torch.tensor([0.6, 0.0, 0.8, 0.0]))
        assert float(params["b_enc"][j].detach()) == 0.0 and float(opt.state[params["W_dec"]]["exp_avg"][j].abs().sum()) == 0
        assert float(opt.state[params["W_enc"]]["exp_avg_sq"][:, j].abs().sum()) == 0
    assert float(params["b_enc"][0].detach()) != 0.0 and float(opt.state[params["W_dec"]]["exp_avg"][0].abs().sum()) > 0


def test_resampling_runs_in_a_fit_and_can_be_turned_off():
    arrays = _planted()
    counts = {ra: sum(h.get("resampled", 0) for h in _fit(arrays, concepts=96, resample_after=ra).meta["history"][0]["loss"])
              for ra in (0, 10)}
    assert counts[0] == 0 and counts[10] > 0


def test_streamed_from_the_source_when_rows_do_not_fit_in_memory(monkeypatch):
    class Counting(ArraySource):
        seen: set = set()

        def batches(self, y, batch_size, *, shuffle=False, seed=0):
            self.seen.add(y)
            yield from super().batches(y, batch_size, shuffle=shuffle, seed=seed)

        def load(self, y):
            raise AssertionError("a streamed fit never loads a class whole")

    monkeypatch.setattr(sae_module, "IN_MEMORY_BYTES", 0)
    arrays = _planted()
    src = Counting(arrays, classes=["c0", "c1", "c2"])
    d = factorize(src, "sae", device="cpu", concepts=48, top_k=4, iterations=15, batch_size=100, lr=1e-2, seed=0)
    assert src.seen == {0, 1, 2} and d.meta["history"][0]["loss"][-1]["relative_error"] < 0.35
    bad = [a.copy() for a in arrays]
    bad[2][-1, 0] = np.nan
    with pytest.raises(C2MFError, match="class 'c2' has NaN"):
        factorize(ArraySource(bad, classes=["c0", "c1", "c2"]), "sae", device="cpu", concepts=8, iterations=1)


def test_settings_are_checked():
    for opts, msg in [({"top_k": 9}, "--top-k must be between 1 and --concepts"),
                      ({"batch_size": None}, "give --batch-size N, not --full-batch"),
                      ({"lr": 0.0}, "--lr must be a positive number"),
                      ({"resample_after": -1}, "--resample-after must be >= 0")]:
        with pytest.raises(UsageError, match=msg):
            get_method("sae").make_config(concepts=8, **opts)
    assert get_method("sae").make_config(concepts=256).active == 32
    assert get_method("sae").make_config(concepts=8).active == 2


def test_resume_continues_the_same_trajectory(tmp_path: Path):
    ckpt = tmp_path / "sae.ckpt"
    ref = _fit(iterations=6, checkpoint_every=2)

    class Stop(Exception):
        pass

    def stop_after_three(description, total):
        count = [0]

        def advance(n=1):
            count[0] += n
            if count[0] == 4:  # the fourth pass ended before its checkpoint: the file holds two passes
                raise Stop

        return advance

    with pytest.raises(Stop):
        factorize(_source(_planted()), "sae", device="cpu", progress=stop_after_three, checkpoint_path=ckpt,
                  concepts=48, top_k=4, iterations=6, batch_size=100, lr=1e-2, seed=0, checkpoint_every=2)
    assert ckpt.exists()
    resumed = factorize(_source(_planted()), "sae", device="cpu", checkpoint_path=ckpt, resume=True,
                        concepts=48, top_k=4, iterations=6, batch_size=100, lr=1e-2, seed=0, checkpoint_every=2)
    for name in ref.tensors:
        torch.testing.assert_close(resumed.tensors[name], ref.tensors[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(C2MFError, match="other settings or data"):
        factorize(_source(_planted()), "sae", device="cpu", checkpoint_path=ckpt, resume=True,
                  concepts=48, top_k=4, iterations=6, batch_size=100, lr=2e-2, seed=0, checkpoint_every=2)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_factorize_evaluate_explain_through_the_cli(image_folder: Path, tmp_path: Path):
    """A tiny store through factorize -> evaluate -> explain with --method sae: the stages do not know the method."""
    from tests.conftest import build_store

    train = build_store(tmp_path / "train.zarr", image_folder, split="train")
    test = build_store(tmp_path / "test.zarr", image_folder, split="test")
    out = tmp_path / "sae.safetensors"
    r = _run("factorize", "-s", train, "--method", "sae", "-k", 16, "--iterations", 3, "--batch-size", 64,
             "--device", "cpu", "--json", "-o", out)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "sae" and summary["concepts"] == 16 and 0 < summary["relative_error"] < 1
    assert summary["converged"] is None  # no tolerance: it runs its passes
    r = _run("evaluate", "--train", train, "--test", test, "--dict", out, "-o", tmp_path / "eval",
             "--max-images-per-class", 2, "--ig-steps", 4, "--device", "cpu", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    (m,) = json.loads(r.stdout)["methods"]
    assert m["method"] == "sae" and m["k"] == 16 and not m["per_class_dictionary"]
    image = sorted(p for p in image_folder.rglob("*.png"))[0]
    r = _run("explain", image, "--dict", out, "-o", tmp_path / "explained", "--device", "cpu", "--json", "-q")
    assert r.exit_code == 0, r.output
    (summary,) = json.loads(r.stdout)["explained"]
    rec = json.loads((tmp_path / "explained" / summary["json"]).read_text())
    assert rec["dictionary"]["method"] == "sae" and rec["dictionary"]["class"] is None  # no class needed
    assert len(rec["importance"]) == 16 and "gates" not in rec
    codes = np.asarray(rec["codes"])
    assert codes.shape[-1] == 16 and (codes >= 0).all() and ((codes > 0).sum(-1) <= 4).all()  # top_k 16 / 4
