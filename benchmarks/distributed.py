"""Throughput of factorize's data pass on 1, 2, ... processes (gloo on CPU, NCCL on GPUs), written as JSON.

    python benchmarks/distributed.py --procs 1,2                       # CPU, gloo
    python benchmarks/distributed.py --procs 1,2 --device cuda         # NCCL, one GPU per process
    python benchmarks/distributed.py --quick                           # 20,000 x 256: a smoke run

Each process count runs as its own torch.multiprocessing spawn (a real process group, as torchrun makes). The
rows are generated from a seed in blocks; each process builds only its own blocks, in memory, before the timed
passes, so this measures the code step, the all-reduce and the dictionary step, not storage. A pass time is
the median of the passes after the first. Separately, `--store-images N` measures one process reading a Zarr
array laid out as a store's (N images at 7x7 positions, float16, 64 images per chunk, zarr's default codec) back
into float32 rows as the store's row source does, from the page cache: the decode-and-convert rate that bounds
a pass on a fast GPU.
Results go to benchmarks/results/distributed-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from _common import RESULTS, free_port, rank_env, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Blocks:
    """A RowSource of one class whose rows are seeded blocks; a shard builds only its own blocks."""

    def __init__(self, rows: int, channels: int, block: int, seed: int, part: tuple[int, int] = (0, 1)) -> None:
        self.classes, self.n_features, self.mode, self.info = ["all"], channels, "full", {}
        self._rows, self._block, self._seed, self._part = rows, block, seed, part
        rng = np.random.default_rng(seed)
        self._W = (np.abs(rng.standard_normal((50, channels))) * (rng.random((50, channels)) < 0.2)).astype(np.float32)
        starts = range(0, rows, block)
        self._mine = [j for j in range(len(starts)) if j % part[1] == part[0]]
        self._cache: dict[int, np.ndarray] = {}
        self._shards: dict[tuple[int, int], Blocks] = {}

    def _make(self, j: int) -> np.ndarray:
        if j not in self._cache:
            n = min(self._block, self._rows - j * self._block)
            rng = np.random.default_rng([self._seed, j])
            U = (rng.exponential(1.0, (n, 50)) * (rng.random((n, 50)) < 0.3)).astype(np.float32)
            self._cache[j] = U @ self._W + 0.1 * rng.random((n, self.n_features), dtype=np.float32)
        return self._cache[j]

    def build(self) -> None:
        for j in self._mine:
            self._make(j)

    def n_rows(self, y: int) -> int:
        return sum(min(self._block, self._rows - j * self._block) for j in self._mine)

    def load(self, y: int) -> np.ndarray:
        return np.concatenate([self._make(j) for j in self._mine])

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        order = list(self._mine)
        if shuffle:
            np.random.default_rng(seed).shuffle(order)
        for j in order:
            b = self._make(j)
            for s in range(0, b.shape[0], batch_size):
                yield b[s : s + batch_size]

    def shard(self, index: int, count: int) -> "Blocks":
        if (index, count) not in self._shards:
            part = Blocks(self._rows, self.n_features, self._block, self._seed, (index, count))
            part.build()
            self._shards[index, count] = part
        return self._shards[index, count]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import time

    import torch

    from c2mf_cli import distributed
    from c2mf_cli.stages.factorize import factorize

    if args.threads:
        torch.set_num_threads(args.threads)
    env = rank_env(rank, world, port)
    dev = distributed.start(args.device, 300, env=env) or args.device
    try:
        source = Blocks(args.rows, args.channels, args.block, args.seed)
        if world == 1:
            source.build()
        else:
            source.shard(rank, world)  # built before the clock starts, as the one-process data is
        c0 = time.process_time()
        d = factorize(source, "c2mf", device=dev, concepts=args.k, alpha=0.0, iterations=args.passes, tol=0.0,
                      batch_size=args.block, subsample_rows=0, warmup=0)
        cpu = time.process_time() - c0  # all threads of this process, the start (sample, k-means++) included
        passes = [h["seconds"] for h in d.meta["history"][0]["loss"]]
        steady = statistics.median(passes[1:]) if len(passes) > 1 else passes[0]
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available() and str(dev).startswith("cuda"):
            peak_mb_gpu = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mb_gpu = None
        rec = {"rank": rank, "pass_seconds": passes, "steady_pass_seconds": steady, "fit_cpu_seconds": cpu, "peak_rss_mb": peak_mb,
               "peak_gpu_mb": peak_mb_gpu, "relative_error": d.meta["history"][0]["loss"][-1]["relative_error"],
               "fitted_by": d.meta["distributed"]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(rec))
    finally:
        distributed.stop()


def store_read_rate(images: int, channels: int, positions: int = 49, chunk_images: int = 64) -> dict[str, Any]:
    """Rows per second one process reads back from a store-like Zarr array (activations after a ReLU: half 0)."""
    import time

    import zarr

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        arr = zarr.open_group(tmp, mode="w", zarr_format=3).create_array(
            "activations", shape=(images, 7, 7, channels), chunks=(chunk_images, 7, 7, channels), dtype="float16",
            fill_value=0)
        for s in range(0, images, chunk_images):
            n = min(chunk_images, images - s)
            a = rng.standard_normal((n, 7, 7, channels), dtype=np.float32)
            arr[s : s + n] = np.maximum(a, 0).astype(np.float16)
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        t0, c0 = time.perf_counter(), time.process_time()
        rows = 0
        for s in range(0, images, chunk_images):  # as the store's row source: a chunk, to float32, flattened
            a = np.asarray(arr[s : s + chunk_images]).astype(np.float32, copy=False).reshape(-1, channels)
            rows += a.shape[0]
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    mb = rows * channels * 2 / 1e6
    # CPU seconds as well as wall: on a shared machine the wall rate mostly measures the other users
    return {"images": images, "rows": rows, "channels": channels, "seconds": seconds, "cpu_seconds": cpu,
            "rows_per_s": rows / seconds, "float16_mb_per_s": mb / seconds, "float16_mb_per_cpu_s": mb / cpu,
            "disk_bytes_per_float16_byte": disk / (rows * channels * 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2", help="comma list of process counts")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--block", type=int, default=16384, help="rows per block (the unit dealt to processes)")
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-images", type=int, default=0, help="also measure reading a store of this many images")
    ap.add_argument("--quick", action="store_true", help="20,000 x 256, 3 passes: a smoke run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.channels, args.block, args.passes = 20_000, 256, 4096, 3
    import torch
    import torch.multiprocessing as mp

    runs = []
    for world in [int(p) for p in args.procs.split(",")]:
        if args.device.startswith("cuda") and world > torch.cuda.device_count():
            runs.append({"processes": world, "skipped": f"only {torch.cuda.device_count()} GPU(s)"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, free_port(), args, tmp), nprocs=world, join=True)
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        pass_s = max(r["steady_pass_seconds"] for r in ranks)  # a pass ends when the slowest rank is done
        cpu = max(r["fit_cpu_seconds"] for r in ranks)
        run = {"processes": world, "steady_pass_seconds": pass_s, "rows_per_s": args.rows / pass_s,
               "rows_per_s_per_process": args.rows / pass_s / world,
               "rows_per_cpu_s_per_process": args.rows / world * args.passes / cpu, "ranks": ranks}
        runs.append(run)
        print(f"{world} process(es): {run['rows_per_s']:.0f} rows/s ({run['rows_per_s_per_process']:.0f} per process),"
              f" pass {pass_s:.2f} s", file=sys.stderr, flush=True)
    store_read = None
    if args.store_images:
        store_read = store_read_rate(args.store_images, args.channels)
        print(f"store read: {store_read['rows_per_s']:.0f} rows/s ({store_read['float16_mb_per_s']:.0f} MB/s of "
              "float16) in one process", file=sys.stderr, flush=True)
    doc = {
        "benchmark": "distributed factorize pass (c2mf, alpha 0)",
        "host": platform.node(),
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "matrix": {"rows": args.rows, "channels": args.channels, "k": args.k, "block": args.block},
        "device": args.device,
        "runs": runs,
        "store_read_one_process": store_read,
    }
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    out = write_result(doc, args.out or RESULTS / f"distributed-{tag}-{platform.node()}.json")
    print(str(out))


if __name__ == "__main__":
    main()
