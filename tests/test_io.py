"""Atomic writes (umask, failure mid-write, fsync) and strict JSON: c2mf_cli._io and the files written through it."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from c2mf_cli import _io


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_honour_the_umask(tmp_path, umask_022):
    assert _mode(_io.write_text(tmp_path / "a.txt", "x")) == 0o644
    assert _mode(_io.write_json(tmp_path / "sub" / "a.json", {"a": 1})) == 0o644
    os.umask(0o077)
    assert _mode(_io.write_bytes(tmp_path / "private.bin", b"x")) == 0o600


def test_dictionary_report_and_figure_are_0644_under_umask_022(tmp_path, umask_022):
    import matplotlib.pyplot as plt

    from c2mf_cli.artifacts.dictionary import ConceptDictionary
    from c2mf_cli.render.figures import save_figure
    from c2mf_cli.report.page import build_report

    d = ConceptDictionary({"W": torch.eye(3)}, {"method": "nmf", "classes": ["a"]})
    assert _mode(d.save(tmp_path / "d.safetensors")) == 0o644
    assert _mode(save_figure(plt.figure(), tmp_path / "f.png")) == 0o644
    assert _mode(build_report(tmp_path / "run", atlas_dir=tmp_path)) == 0o644


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_the_sae_checkpoint_honours_the_umask(tmp_path, umask_022, umask, mode):
    """The SAE's checkpoint goes through _io like every other file (tempfile.mkstemp alone made it 0600)."""
    from c2mf_cli.artifacts.sources import ArraySource
    from c2mf_cli.stages.factorize import factorize

    rng = np.random.default_rng(0)
    source = ArraySource([np.abs(rng.normal(size=(40, 6))).astype(np.float32) for _ in range(2)], ["a", "b"], "full",
                         {})
    os.umask(umask)
    ckpt = tmp_path / "sae.ckpt"
    factorize(source, "sae", device="cpu", checkpoint_path=ckpt, concepts=8, top_k=2, iterations=2, batch_size=20,
              seed=0, checkpoint_every=1)
    assert _mode(ckpt) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae.ckpt"]  # no temporary file left


@pytest.mark.parametrize("fail_at", ["writer", "fsync", "replace"])
def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "out.json"
    _io.write_json(path, {"version": 1})
    before = path.read_bytes()
    boom = OSError(28, "No space left on device")
    if fail_at == "writer":
        with pytest.raises(RuntimeError, match="killed"):
            with _io.atomic_path(path) as tmp:
                tmp.write_text('{"version": 2, "trunc')
                raise RuntimeError("killed")
    else:
        def fail(*args, **kwargs):
            raise boom
        monkeypatch.setattr(_io.os, fail_at, fail)
        with pytest.raises(OSError, match="No space left"):
            _io.write_json(path, {"version": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_new_content_replaces_old_and_is_synced(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = _io.write_text(tmp_path / "a.txt", "one")
    _io.write_text(path, "two")
    assert path.read_text() == "two"
    assert len(synced) == 4  # the file and its folder, each time


def test_strict_json():
    obj = {"nan": float("nan"), "inf": -math.inf, "np": np.float32(0.5), "i": np.int64(3), "t": (1, 2),
           "arr": np.array([1.0, np.nan]), "p": Path("x/y"), 4: {"s": {"b", "a"}}}
    text = _io.dumps(obj)

    def refuse(name):
        raise ValueError(f"non-strict constant {name}")

    assert json.loads(text, parse_constant=refuse) == {
        "nan": None, "inf": None, "np": 0.5, "i": 3, "t": [1, 2], "arr": [1.0, None], "p": "x/y",
        "4": {"s": ["a", "b"]}}
    with pytest.raises(TypeError, match="cannot write a object as JSON"):
        _io.dumps({"x": object()})


def test_evaluation_json_on_stdout_is_strict(capsys):
    from c2mf_cli.commands._console import print_json

    print_json({"auc": float("nan"), "k": np.int32(2)})
    assert json.loads(capsys.readouterr().out) == {"auc": None, "k": 2}
