"""The SLURM examples: valid bash, and the commands they submit and run, recorded by fake sbatch and c2mf."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.sh"))

FAKE_SBATCH = """#!/usr/bin/env bash
# records its arguments (one call a line, NUL-free shell quoting) and answers a job id, as --parsable does
n=$(( $(wc -l < "$CALLS" 2>/dev/null || echo 0) + 101 ))
printf '%s\\n' "$(printf '%q ' sbatch "$@")" >> "$CALLS"
echo "$n"
"""

FAKE_C2MF = """#!/usr/bin/env bash
printf '%s\\n' "$(printf '%q ' c2mf "$@")" >> "$CALLS"
"""


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_syntax(script: Path):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _fake_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("c2mf", FAKE_C2MF)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("export ACTIVATED=1\n")
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"), "VENV": str(venv.parent),
            "HOME": str(tmp_path), "SCRATCH": str(tmp_path / "scratch")}


def _calls(tmp_path: Path) -> list[list[str]]:
    return [shlex.split(line) for line in (tmp_path / "calls").read_text().splitlines()]


def test_extract_activates_passes_out_and_sizes_workers(tmp_path: Path):
    env = _fake_env(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "examples" / "slurm_extract.sh")], cwd=tmp_path, capture_output=True,
                       text=True, env={**env, "SLURM_CPUS_PER_TASK": "6", "SLURM_ARRAY_TASK_ID": "2",
                                       "SLURM_ARRAY_TASK_COUNT": "8", "OUT": str(tmp_path / "s.zarr")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("task 2 of 8 on ") and "(5 workers)" in r.stdout  # a readable first log line
    (call,) = _calls(tmp_path)
    assert call[:2] == ["c2mf", "extract"]
    args = dict(zip(call[2::2], call[3::2]))
    assert args["--out"] == str(tmp_path / "s.zarr") and args["--workers"] == "5"


def test_chain_submits_extract_then_factorize_then_evaluate(tmp_path: Path):
    env = _fake_env(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "examples" / "slurm_chain.sh")], cwd=tmp_path, capture_output=True,
                       text=True, env={**env, "OUT": str(tmp_path / "run"), "TASKS": "3", "CPUS": "4"})
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    assert [c[0] for c in calls] == ["sbatch"] * 5
    opts = [{a.split("=")[0]: a.split("=", 1)[1] for a in c[1:] if a.startswith("--") and "=" in a} for c in calls]
    wraps = [c[c.index("--wrap") + 1] for c in calls]
    # ids 101, 102: the extract arrays; 103, 104: the fits (after train); 105: evaluate (after fits and test)
    assert opts[0]["--array"] == "0-2" and "--split train" in wraps[0] and "--workers 3" in wraps[0]
    assert "--split test" in wraps[1]
    assert opts[2]["--dependency"] == opts[3]["--dependency"] == "afterok:101"
    assert opts[4]["--dependency"] == "afterok:103:104:102"
    for w in wraps[:4]:
        assert w.startswith(f"source '{env['VENV']}/bin/activate' && c2mf ")
    # evaluate: one process per GPU of its node (torchrun), as many GPUs asked of SLURM
    assert wraps[4].startswith(f"source '{env['VENV']}/bin/activate' && torchrun --standalone --nproc-per-node 4 "
                               "-m c2mf_cli.cli evaluate ") and opts[4]["--gres"] == "gpu:4"
    args = shlex.split(wraps[4].split("-m c2mf_cli.cli ", 1)[1])
    params = _parse(args)
    assert len(params["dicts"]) == 2 and str(params["out_dir"]) == f"{tmp_path / 'run'}/evaluate"
    assert "--method c2mf" in wraps[2] and "--method pca" in wraps[3] and "-o '" in wraps[2]
    assert wraps[4].count("--dict") == 2 and f"-o '{tmp_path / 'run'}/evaluate'" in wraps[4]
    # the wrapped command lines parse as the CLI expects
    assert shlex.split(wraps[2].split("&& ", 1)[1])[:4] == ["c2mf", "factorize", "-s", f"{tmp_path / 'run'}/train.zarr"]


def _parse(call: list[str]) -> dict:
    """The parameters the real CLI reads from `c2mf CALL...` (parsing only: nothing runs)."""
    import typer

    from c2mf_cli.cli import app

    group = typer.main.get_command(app)
    with group.make_context("c2mf", list(call), resilient_parsing=False) as ctx:
        command = group.get_command(ctx, call[0])
        assert command is not None, call
        return command.make_context(call[0], list(call[1:]), parent=ctx).params


@pytest.mark.parametrize("script", ["cifar10.sh", "cub_birds.sh"])
def test_local_chains_parse_and_name_their_model_code(script: str, tmp_path: Path):
    """Every c2mf call of the local example chains parses with the real CLI, and the stages that reopen the model
    (evaluate, explain) name it with -m: a model that is code runs only when the command line names it."""
    env = _fake_env(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "examples" / script)], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "OUT": str(tmp_path / "run"), "DATA": str(tmp_path / "data")})
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    model = None
    for call in calls:
        assert call[0] == "c2mf"
        params = _parse(call[1:])
        if call[1] == "extract":
            model = params["model"]
        if call[1] in ("evaluate", "explain"):
            assert params["model"] == model and ".py:" in model, call
    assert {c[1] for c in calls} >= {"extract", "factorize", "evaluate"}
