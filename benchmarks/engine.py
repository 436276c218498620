"""Benchmark of the alternating engine on many small classes against few large ones, before and after the
batched code step, and CRAFT against scikit-learn's NMF per class, written as JSON.

    python benchmarks/engine.py                    # about 3 minutes on 2 loaded cores
    python benchmarks/engine.py --quick            # smaller cases: a smoke run
    python benchmarks/engine.py --before REV       # the engine of another commit as "before"
    python benchmarks/engine.py --device cuda --before none   # on a GPU, without git (no "before" column)
    python benchmarks/engine.py --only craft --previous e6cc71d   # the craft cases and scikit-learn, with the
                                                   # engine of another commit as a third column, "previous"

What it measures, each case in its own subprocess (1 torch thread), "before" being the tree of `--before`
(default: the commit before the batched engine) exported with `git archive`, "after" this tree:
  * c2mf on many small classes (1,000 x 250 rows) and on few large ones (10 x 25,000 rows), same rows, channels
    and k, a fixed number of passes (tol 0, no subsample start): seconds per pass; the ratio many / few is the
    per-class overhead (1.0 = a row costs the same however the rows are split into classes);
  * the same c2mf case on a store-like Zarr source (one float16 array per class, chunks of 64 images x 49
    positions), held on the device (the default --cache-gb) or re-read every pass (--cache-gb 0);
  * CRAFT on the CUB crop store's shape (78 classes x 48 crops x 1,280 channels, k = 10) fitted to convergence
    (defaults) before and after, and scikit-learn's `NMF(solver="cd", init="nndsvda")` fitted class by class
    (its own defaults: tol 1e-4, at most 200 iterations), with the mean relative error ||A - U W|| / ||A|| of each;
  * CRAFT on 200 classes of 200-400 crops (1,280 channels, k = 10), 5 passes (tol 0) before and after: with a
    few hundred rows per class the products A W^T and U^T A, the same before and after, weigh more.
Synthetic non-negative data with planted sparse concepts (seeded). The machine is shared: read ratios measured in
the same run, not absolute times. Results go to benchmarks/results/engine-<cpu|gpu>-<host>.json, or
engine-<only>-<cpu|gpu>-<host>.json with --only. Each case records wall and CPU seconds of its process.

Measured (2 shared cores, `--only craft --previous e6cc71d`, benchmarks/results/engine-craft-cpu-vm.json): CRAFT
on the CUB crop shape 90.0 s one class at a time (3709523), 11.7 s with the first batched engine (e6cc71d), 6.7 s
now (13.5x; 10.8x in CPU seconds), all at mean relative error 0.3376-0.3378; scikit-learn per class 7.3 s
(0.3374). Three earlier runs of the same case gave 9.2x, 9.4x and 10.6x in wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from _common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "3709523"  # main just before the batched engine landed


def planted(classes: int, rows: int | tuple[int, int], channels: int, seed: int = 0) -> list[np.ndarray]:
    """Per-class non-negative rows: 30 shared planted concepts, sparse exponential codes, uniform noise."""
    rng = np.random.default_rng(seed)
    W = (np.abs(rng.standard_normal((30, channels))) * (rng.random((30, channels)) < 0.3)).astype(np.float32)
    out = []
    for _ in range(classes):
        n = rows if isinstance(rows, int) else int(rng.integers(rows[0], rows[1] + 1))
        U = (rng.exponential(1.0, (n, 30)) * (rng.random((n, 30)) < 0.3)).astype(np.float32)
        out.append(U @ W + 0.1 * rng.random((n, channels), dtype=np.float32))
    return out


class ZarrSource:
    """A RowSource over one float16 Zarr array per class, read chunk by chunk as the store's row source reads."""

    def __init__(self, path: str, arrays: list[np.ndarray], chunk_rows: int = 64 * 49) -> None:
        import zarr

        root = zarr.open_group(path, mode="w", zarr_format=3)
        for y, a in enumerate(arrays):
            root.create_array(str(y), shape=a.shape, chunks=(chunk_rows, a.shape[1]), dtype="float16")[:] = a
        self._arrays = [root[str(y)] for y in range(len(arrays))]
        self.classes = [str(y) for y in range(len(arrays))]
        self.n_features = arrays[0].shape[1]
        self.mode = "full"
        self.info: dict[str, Any] = {}
        self._chunk = chunk_rows

    def n_rows(self, y: int) -> int:
        return int(self._arrays[y].shape[0])

    def load(self, y: int) -> np.ndarray:
        return np.asarray(self._arrays[y][:]).astype(np.float32)

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        step = max(self._chunk, batch_size // self._chunk * self._chunk)
        for s in range(0, self.n_rows(y), step):
            yield np.asarray(self._arrays[y][s : s + step]).astype(np.float32)


def worker(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process, with the engine found on sys.path (the caller points it at a tree)."""
    import torch

    torch.set_num_threads(1)
    from c2mf_cli.artifacts.sources import ArraySource
    from c2mf_cli.stages.factorize import factorize

    if case.get("kind") == "sklearn":
        from sklearn.decomposition import NMF

        arrays = planted(case["classes"], tuple(case["rows"]), case["channels"], case["seed"])
        t0, c0, errors = time.perf_counter(), time.process_time(), []
        for a in arrays:
            model = NMF(n_components=case["k"], solver="cd", init="nndsvda", random_state=0)
            U = model.fit_transform(a.astype(np.float64))
            errors.append(float(np.linalg.norm(a - U @ model.components_) / np.linalg.norm(a)))
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                "mean_relative_error": float(np.mean(errors)), "classes": len(arrays)}
    rows = case["rows"] if isinstance(case["rows"], int) else tuple(case["rows"])
    arrays = planted(case["classes"], rows, case["channels"], case["seed"])
    opts = dict(case["options"])
    with tempfile.TemporaryDirectory() as tmp:
        if case.get("zarr"):
            source: Any = ZarrSource(tmp, arrays)
        else:
            source = ArraySource(arrays, mode="crops" if case["method"] == "craft" else "full")
        t0, c0 = time.perf_counter(), time.process_time()
        d = factorize(source, case["method"], device=case["device"], **opts)
        if case["device"].startswith("cuda"):
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    hist = d.meta["history"]
    passes = [h["passes"] for h in hist]
    steady = float(np.median([r["seconds"] for r in hist[0]["loss"]]))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "class_passes": int(sum(passes)),
            "max_passes": int(max(passes)),
            "seconds_per_class_pass": seconds / sum(passes),
            # one pass of a one-dictionary fit (c2mf), the median of those it recorded: no start, no sample
            "seconds_per_pass": steady,
            "mean_relative_error": float(np.mean([h["loss"][-1]["relative_error"] for h in hist])),
            "rows": int(sum(a.shape[0] for a in arrays))}


def run(case: dict[str, Any], tree: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], env=env, capture_output=True,
                       text=True, cwd=tree)
    if p.returncode:
        raise RuntimeError(f"case {case['name']} on {tree} failed:\n{p.stderr[-3000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"{case['name']} ({tree.name}): {rec['seconds']:.1f} s", file=sys.stderr, flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE, help="git revision whose engine is 'before'")
    ap.add_argument("--previous", default="none", help="git revision run as a third column (none: skip)")
    ap.add_argument("--only", default="", help="run the cases whose names start with this (and scikit-learn "
                    "with craft_cub_fit); the result file then says so in its name")
    ap.add_argument("--quick", action="store_true", help="smaller cases: a smoke run")
    ap.add_argument("--device", default="cpu", help="where our fits run (scikit-learn runs on the CPU)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    scale = 10 if args.quick else 1
    c, k, passes = 64, 10, 3
    fixed = {"concepts": k, "iterations": passes, "tol": 0.0, "subsample_rows": 0, "seed": 0}
    common = {"device": args.device, "method": "c2mf", "channels": c, "seed": 0, "options": fixed}
    many = dict(common, classes=1000 // scale, rows=250)
    few = dict(common, classes=10 // min(scale, 5), rows=25000 // scale * min(scale, 5))  # as many rows as `many`
    cub = {"device": args.device, "method": "craft", "classes": 78 // min(scale, 3), "rows": [48, 48],
           "channels": 1280, "seed": 1, "options": {"concepts": k, "seed": 0}}
    crops = dict(cub, classes=200 // scale, rows=[200, 400], options={"concepts": k, "iterations": 5, "tol": 0.0,
                                                                       "seed": 0})
    cases = [("c2mf_many_small", many, True), ("c2mf_few_large", few, True)]
    if importlib.util.find_spec("zarr") is not None:
        cases += [("c2mf_many_small_zarr", dict(many, zarr=True), True),
                  ("c2mf_many_small_zarr_streamed", dict(many, zarr=True, options=dict(fixed, cache_gb=0.0)), False)]
    cases += [("craft_cub_fit", cub, True), ("craft_200_classes_5_passes", crops, True)]
    cases = [c for c in cases if c[0].startswith(args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for when, rev in (("before", args.before), ("previous", args.previous)):
            if rev != "none":
                trees[when] = Path(tmp) / when
                trees[when].mkdir()
                archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "c2mf_cli"], check=True,
                                         capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(trees[when])], input=archive, check=True)
        results: dict[str, Any] = {}
        for name, case, with_before in cases:
            case = dict(case, name=name)
            results[name] = {"case": case, "after": run(case, ROOT)}
            for when, tree in trees.items():
                if with_before:
                    results[name][when] = run(case, tree)
        craft = "craft_cub_fit" in results  # scikit-learn runs on its shape
        if craft and importlib.util.find_spec("sklearn") is not None:
            sk = dict(cub, kind="sklearn", name="sklearn_nmf_per_class", k=k)
            results["sklearn_nmf_per_class"] = {"case": sk, "after": run(sk, ROOT)}
        elif craft:
            results["sklearn_nmf_per_class"] = {"skipped": "scikit-learn is not installed in this environment"}

    def per_row(name: str, when: str) -> float:
        r = results[name][when]
        return r["seconds_per_pass"] / r["rows"]

    ratios: dict[str, float] = {}
    # cost of a row in many small classes over a row in few large ones (1.0: no per-class overhead)
    if "c2mf_many_small" in results and "c2mf_few_large" in results:
        for when in ("after", *trees):
            ratios[f"many_over_few_per_row_{when}"] = (per_row("c2mf_many_small", when)
                                                       / per_row("c2mf_few_large", when))
    if "c2mf_many_small_zarr_streamed" in results:
        ratios["zarr_streamed_over_held"] = (results["c2mf_many_small_zarr_streamed"]["after"]["seconds_per_pass"]
                                             / results["c2mf_many_small_zarr"]["after"]["seconds_per_pass"])
    elif importlib.util.find_spec("zarr") is None:
        results["c2mf_many_small_zarr"] = {"skipped": "zarr is not installed in this environment"}
    # this tree's speed-up over each other tree: time there / time here
    speedups = [("c2mf_many_small", "seconds_per_pass"), ("c2mf_few_large", "seconds_per_pass"),
                ("c2mf_many_small_zarr", "seconds_per_pass"), ("craft_cub_fit", "seconds"),
                ("craft_200_classes_5_passes", "seconds")]
    for name, key in speedups:
        for when in trees:
            if when in results.get(name, {}):
                label = name.replace("_5_passes", "") + "_speedup" + ("" if when == "before" else f"_over_{when}")
                ratios[label] = results[name][when][key] / results[name]["after"][key]
    # the same in CPU seconds of the fitting process (1 thread): less moved by other jobs' load than wall time
    for when in trees:
        if when in results.get("craft_cub_fit", {}):
            ratios["craft_cub_fit_cpu_speedup" + ("" if when == "before" else f"_over_{when}")] = (
                results["craft_cub_fit"][when]["cpu_seconds"] / results["craft_cub_fit"]["after"]["cpu_seconds"])
    if "after" in results.get("sklearn_nmf_per_class", {}):  # (run only with craft_cub_fit)
        for key in ("seconds", "cpu_seconds"):
            ratios[f"sklearn_over_craft_cub_fit_{key}"] = (results["sklearn_nmf_per_class"]["after"][key]
                                                           / results["craft_cub_fit"]["after"][key])
    import torch

    doc = {
        "benchmark": "alternating engine: many small classes vs few large, before / after; craft vs sklearn NMF",
        "host": platform.node(),
        "conditions": (f"{os.cpu_count()} cores shared with other jobs, 1 torch thread per case, float32 on "
                       f"{args.device}"),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "before": args.before,
        "previous": args.previous,
        "only": args.only,
        "quick": args.quick,
        "results": results,
        "ratios": ratios,
    }
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    only = f"-{args.only}" if args.only else ""
    out = write_result(doc, args.out or RESULTS / f"engine{only}-{tag}-{platform.node()}.json")
    for name, v in ratios.items():
        print(f"{name}: {v:.2f}", file=sys.stderr)
    print(str(out))


if __name__ == "__main__":
    main()
