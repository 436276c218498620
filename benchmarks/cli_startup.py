"""How fast the `c2mf` command answers when it has no work to do: help, version, a bad option.

Each case runs `python -m c2mf_cli.cli ...` in a fresh process, `--repeats` times, and records the wall time and
the CPU time of the child (user + system). `--tree DIR` measures another checkout (e.g. the commit before the
lazy imports), so before and after are measured in the same run, on the same machine load.

    python benchmarks/cli_startup.py [--repeats 5] [--tree OLD_CHECKOUT ...]

Writes benchmarks/results/cli_startup-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from _common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "--help": ["--help"],
    "version": ["version"],
    "factorize --help": ["factorize", "--help"],
    "bad option": ["extract", "--no-such-option"],
}


def _run_once(tree: Path, args: list[str]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "c2mf_cli.cli", *args], cwd=tree, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.returncode


def measure(tree: Path, repeats: int) -> dict:
    rows = {}
    for name, args in CASES.items():
        walls, cpus, codes = [], [], set()
        for _ in range(repeats):
            wall, cpu, code = _run_once(tree, args)
            walls.append(wall)
            cpus.append(cpu)
            codes.add(code)
        rows[name] = {"args": args, "exit_codes": sorted(codes), "wall_s_median": round(statistics.median(walls), 3),
                      "wall_s_min": round(min(walls), 3), "cpu_s_median": round(statistics.median(cpus), 3)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return {"tree": str(tree), "commit": commit.stdout.strip() or None, "cases": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tree", type=Path, action="append", default=[], help="Another checkout to measure too.")
    args = ap.parse_args()
    trees = [*args.tree, ROOT]
    result = {
        "benchmark": "cli_startup",
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "trees": [measure(t.resolve(), args.repeats) for t in trees],
    }
    write_result(result, RESULTS / f"cli_startup-{platform.node() or 'host'}.json")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
