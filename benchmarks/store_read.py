"""How fast a pass over a store's rows is read: what factorize and evaluate wait for on a GPU.

A store like a ResNet-50's last stage (7 x 7 positions x 2,048 channels, float16, zstd + crc32c, 64 images a
chunk; ReLU features of a random convolution on the CIFAR-10 images, so they compress like real ones) is written
once with `extract`. Then one pass over every class's rows (`ActivationStore.row_source().batches`, float32 rows
as methods receive them) is timed, interleaved:

* `c2mf`: the row source as it reads today (chunks read ahead in `READ_AHEAD` threads, float16 -> float32 by torch);
* `c2mf, one thread`: the same with no read-ahead (`READ_AHEAD = 1`), as before it;
* `zarr + numpy`: what a user would write by hand: `np.asarray(arr[s : s + 64]).astype(np.float32)` chunk by
  chunk, the valid rows kept.

Wall seconds and the process's CPU seconds per pass; MB are of float16 as stored (before compression).

    python benchmarks/store_read.py [--images-per-class 100] [--repeats 3]

Writes benchmarks/results/store_read-<host>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from c2mf_cli.artifacts import store as store_module
from c2mf_cli.artifacts.store import ActivationStore
from c2mf_cli.inputs.data import DatasetSpec
from c2mf_cli.inputs.models import ModelSpec
from c2mf_cli.stages.extract import ExtractConfig, extract
from _common import write_result

SHARED = Path(os.environ.get("C2MF_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def wide_model() -> nn.Module:
    """A random network whose `features` output is 2,048 x 7 x 7 on a 28-px input (the benchmark's store)."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.features = nn.Sequential(nn.Conv2d(3, 2048, 4, stride=4), nn.ReLU())
    net.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.head = nn.Linear(2048, 10)
    net.pretrained_cfg = dict(input_size=(3, 28, 28), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              crop_pct=1.0, interpolation="bilinear")
    return net.eval()


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pass_c2mf(store: ActivationStore, batch: int) -> int:
    source = store.row_source()
    n = 0
    for y in range(len(source.classes)):
        for rows in source.batches(y, batch):
            n += rows.shape[0]
    return n


def pass_numpy(store: ActivationStore, batch: int) -> int:
    n = 0
    for y in range(len(store.classes)):
        arr = store._group(y)["activations"]
        valid = store._valid(y)
        step = int(arr.chunks[0])
        for s in range(0, arr.shape[0], step):
            rows = np.asarray(arr[s : s + step]).astype(np.float32)[valid[s : s + step]]
            n += rows.reshape(-1, rows.shape[-1]).shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-class", type=int, default=100, help="CIFAR-10 images per class (at most 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32768, help="rows per batch handed to the method")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"the real data folder {SHARED} is needed for this benchmark")
    ahead = store_module.READ_AHEAD
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wide.zarr"
        extract(ExtractConfig(model=ModelSpec(f"{Path(__file__).resolve()}:wide_model"), layer="features",
                              data=DatasetSpec(str(SHARED / "cifar10/images"), max_per_class=args.images_per_class),
                              out=str(path), workers=0))
        store = ActivationStore.open(path)
        stored = sum(f.stat().st_size for f in path.rglob("c/**/*") if f.is_file() and "activations" in f.parts)
        mb = sum(store.n_images(y) for y in range(len(store.classes))) * int(np.prod(store.row_shape)) * 2 / 1e6
        ways = {"c2mf": (pass_c2mf, ahead), "c2mf, one thread": (pass_c2mf, 1), "zarr + numpy": (pass_numpy, 1)}
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        rows_read = {}
        for _ in range(args.repeats):
            for name, (fn, depth) in ways.items():
                store_module.READ_AHEAD = depth
                t0, c0 = time.perf_counter(), cpu_seconds()
                rows_read[name] = fn(store, args.batch)
                runs[name].append((time.perf_counter() - t0, cpu_seconds() - c0))
        store_module.READ_AHEAD = ahead
    if len(set(rows_read.values())) != 1:
        raise SystemExit(f"the ways read different row counts: {rows_read}")
    base = statistics.median(w for w, _ in runs["zarr + numpy"])
    cases = []
    for name, r in runs.items():
        wall, cpu = statistics.median(w for w, _ in r), statistics.median(c for _, c in r)
        cases.append({"way": name, "read_ahead": ways[name][1], "wall_s": wall, "cpu_s": cpu,
                      "mb_per_wall_s": mb / wall, "mb_per_cpu_s": mb / cpu, "speedup_vs_numpy": base / wall,
                      "runs": r})
        print(f"{name:18s} {wall:6.2f} s wall ({mb / wall:6.0f} MB/s), {cpu:6.2f} CPU s ({mb / cpu:6.0f} MB/CPU-s),"
              f" {base / wall:.2f}x zarr + numpy")
    result = {"benchmark": "store_read", "host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows_read["c2mf"],
              "row_shape": list(store.row_shape), "float16_mb": mb, "stored_mb": stored / 1e6,
              "chunk_images": int(store.info["config"]["chunk_images"]), "repeats": args.repeats,
              "load_average_1min_at_end": os.getloadavg()[0], "cases": cases,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(write_result(result, args.out / f"store_read-{platform.node() or 'host'}.json"))


if __name__ == "__main__":
    main()
