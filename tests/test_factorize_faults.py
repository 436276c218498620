"""kill -9 at seeded random points of `c2mf factorize --checkpoint-every`, then `--resume`, over a chain of kills:
the dictionary at the end of the chain is bit-identical to an uninterrupted run's (tensors equal, not close), and
no checkpoint or temporary file is left behind.

Each link of the chain is a subprocess (`python -m tests.kill9`) that runs the real CLI and SIGKILLs itself at
the N-th end of a pass (before that pass's checkpoint) or inside the N-th checkpoint write (the temporary file
written, not yet renamed). The next link resumes when a checkpoint exists, and starts afresh otherwise, as a
user's script would.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _c2mf(point: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tests.kill9", point, str(n), "--", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# (method, store fixture, seed of the chain): c2mf on whole images (gated, tol-based convergence), CRAFT on crops
CHAINS = [("c2mf", "tiny_store", 1), ("craft", "tiny_crop_store", 2)]


@pytest.mark.parametrize("method, store_fixture, seed", CHAINS, ids=[c[0] for c in CHAINS])
def test_a_chain_of_kill_9_and_resume_is_bit_identical(method, store_fixture, seed, request, tmp_path: Path):
    store = request.getfixturevalue(store_fixture)
    args = ["factorize", "-s", str(store), "--method", method, "--concepts", "3", "--device", "cpu",
            "--iterations", "24", "--batch-size", "40", "--checkpoint-every", "2", "-q"]
    reference = tmp_path / "reference.safetensors"
    r = CliRunner().invoke(app, args + ["--out", str(reference)])
    assert r.exit_code == 0, r.output
    ref = ConceptDictionary.load(reference)

    out = tmp_path / "chain" / "d.safetensors"
    ckpt = out.with_name(out.name + ".ckpt")
    rng = random.Random(seed)
    kills = []
    for _ in range(4):
        point = rng.choice(["progress", "replace:.ckpt"])
        n = rng.randint(1, 6) if point == "progress" else rng.randint(1, 3)
        resume = ["--resume"] if ckpt.exists() else []
        p = _c2mf(point, n, args + ["--out", str(out), *resume])
        if p.returncode == 0:  # the fit ended before the N-th event: the chain is over
            break
        assert p.returncode == -9, p.stderr
        assert not out.exists()
        kills.append((point, n, bool(resume)))
    assert kills, "no link of the chain was killed"
    if not out.exists():
        p = _c2mf("none", 0, args + ["--out", str(out)] + (["--resume"] if ckpt.exists() else []))
        assert p.returncode == 0, p.stderr
    got = ConceptDictionary.load(out)
    assert set(got.tensors) == set(ref.tensors)
    for name, t in ref.tensors.items():
        assert torch.equal(got.tensors[name], t), (name, kills)
    assert [h["passes"] for h in got.meta["history"]] == [h["passes"] for h in ref.meta["history"]]
    assert sorted(f.name for f in out.parent.iterdir()) == [out.name], kills  # no checkpoint, no temporary file


def test_a_killed_checkpoint_write_leaves_a_temporary_that_the_finished_fit_removes(tiny_store: Path, tmp_path: Path):
    out = tmp_path / "d.safetensors"
    args = ["factorize", "-s", str(tiny_store), "--method", "c2mf", "--concepts", "3", "--device", "cpu",
            "--iterations", "6", "--checkpoint-every", "2", "-q", "--out", str(out)]
    p = _c2mf("replace:.ckpt", 2, args)
    assert p.returncode == -9, p.stderr
    left = sorted(f.name for f in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(".d.safetensors.ckpt.") and left[1] == "d.safetensors.ckpt", left
    r = CliRunner().invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.safetensors"]
