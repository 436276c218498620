"""Throughput of `evaluate` on 1, 2, ... processes (gloo on CPU, NCCL on GPUs), written as JSON.

    python benchmarks/evaluate_distributed.py --procs 1,2                  # CIFAR-10 ResNet-20 at layer2, CPU
    python benchmarks/evaluate_distributed.py --procs 1,2 --device cuda    # one GPU per process

Builds small train and test stores from ../shared/data/cifar10 (ResNet-20 at layer2: 16x16 positions x 32
channels, 10 classes, so that the tail h, layer3 and the classifier, has work to do), fits one c2mf dictionary (k = 10) on the train store, then runs `evaluate` (IG and
Grad-CAM, insertion/deletion, every reference) with each process count as its own torch.multiprocessing spawn
(a real process group, as torchrun makes). Per run: the wall time of `evaluate` (the slowest rank: the result
exists when it is done), test images per second in all and per process, and each rank's CPU seconds (on a
shared machine the wall time measures the other users as much as the code). The result of every process count
is compared with one process's (largest relative difference over every number).
Results go to benchmarks/results/evaluate-distributed-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, free_port, rank_env, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
MODEL = f"{DATA / 'models.py'}:cifar_resnet20"


def _stores(root: Path, layer: str, per_class: int) -> dict[str, Path]:
    from c2mf_cli.inputs.data import DatasetSpec
    from c2mf_cli.inputs.models import ModelSpec
    from c2mf_cli.stages.extract import ExtractConfig, extract

    out = {}
    for split in ("train", "test"):
        cfg = ExtractConfig(model=ModelSpec(MODEL, checkpoint=str(DATA / "cifar10" / "resnet20-12fca82f.th")),
                            layer=layer, data=DatasetSpec(str(DATA / "cifar10" / "images"), split=split,
                                                             max_per_class=per_class),
                            out=str(root / f"{split}.zarr"), device="cpu", workers=0)
        extract(cfg)
        out[split] = root / f"{split}.zarr"
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, paths: dict[str, str], out: str) -> None:
    import resource

    import torch

    from c2mf_cli import distributed
    from c2mf_cli._io import write_json
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.methods import load_dictionary
    from c2mf_cli.stages.evaluate import EvaluateConfig, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    env = rank_env(rank, world, port)
    dev = distributed.start(args.device, 600, env=env) or args.device
    try:
        train, test = ActivationStore.open(paths["train"]), ActivationStore.open(paths["test"])
        d = load_dictionary(paths["dict"])
        cfg = EvaluateConfig(ig_steps=args.ig_steps, encode_class=("predicted",), cluster_ks=())
        distributed.all_reduce_sum(torch.zeros(1, device=dev))  # every rank starts the clock together
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate(train, test, [d], config=cfg, device=dev, model=MODEL)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_json(Path(out, f"rank{rank}.json"), {
            "rank": rank, "seconds": wall, "cpu_seconds": cpu, "n_test_images": res["n_test_images"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "result": res})
    finally:
        distributed.stop()


def _numbers(x: Any, path: str = "") -> dict[str, float]:
    """Every number of a result, by its path (time and how the work was divided left out)."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() if key not in ("time_s", "distributed")
                for k, v in _numbers(val, f"{path}.{key}").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in _numbers(val, f"{path}[{i}]").items()}
    if isinstance(x, (int, float)) and not isinstance(x, bool) and x is not None and not math.isnan(x):
        return {path: float(x)}
    return {}


def _largest_difference(a: dict, b: dict) -> float:
    na, nb = _numbers(a), _numbers(b)
    if set(na) != set(nb):
        return math.inf
    return max((abs(na[k] - nb[k]) / max(abs(na[k]), abs(nb[k]), 1e-12) for k in na), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2", help="comma list of process counts")
    ap.add_argument("--layer", default="layer2")
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--test-per-class", type=int, default=20, help="at most 20: the test split of 100 per class")
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not (DATA / "cifar10" / "resnet20-12fca82f.th").is_file():
        sys.exit(f"the CIFAR-10 data is not at {DATA}: this benchmark reads ../shared/data")
    import torch
    import torch.multiprocessing as mp

    from c2mf_cli.stages.factorize import factorize, open_store_source

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        train = _stores(root / "train", args.layer, args.train_per_class)["train"]
        test = _stores(root / "test", args.layer, args.test_per_class)["test"]
        d = factorize(open_store_source(train), "c2mf", device="cpu", concepts=10, iterations=20)
        d.save(root / "c2mf.safetensors")
        paths = {"train": str(train), "test": str(test), "dict": str(root / "c2mf.safetensors")}
        print(f"stores and dictionary in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        runs, reference = [], None
        for world in [int(p) for p in args.procs.split(",")]:
            if args.device.startswith("cuda") and world > torch.cuda.device_count():
                runs.append({"processes": world, "skipped": f"only {torch.cuda.device_count()} GPU(s)"})
                continue
            out = root / f"w{world}"
            out.mkdir()
            mp.spawn(_worker, args=(world, free_port(), args, paths, str(out)), nprocs=world, join=True)
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
            result = ranks[0].pop("result")
            for r in ranks[1:]:
                r.pop("result")
            reference = reference or result
            seconds = max(r["seconds"] for r in ranks)
            n = ranks[0]["n_test_images"]
            run = {"processes": world, "seconds": seconds, "test_images": n, "images_per_s": n / seconds,
                   "images_per_s_per_process": n / seconds / world,
                   "cpu_seconds_per_process": [r["cpu_seconds"] for r in ranks],
                   "images_per_cpu_s": n / sum(r["cpu_seconds"] for r in ranks),
                   "largest_relative_difference_to_first_run": _largest_difference(reference, result),
                   "ranks": ranks}
            runs.append(run)
            print(f"{world} process(es): {seconds:.1f} s, {run['images_per_s']:.2f} test images/s "
                  f"({run['images_per_s_per_process']:.2f} per process), CPU s per process "
                  f"{', '.join(f'{c:.1f}' for c in run['cpu_seconds_per_process'])}, largest difference "
                  f"{run['largest_relative_difference_to_first_run']:.1e}", file=sys.stderr, flush=True)
    doc = {
        "benchmark": f"distributed evaluate (CIFAR-10 ResNet-20 {args.layer}, c2mf k = 10, Grad-CAM + IG)",
        "host": socket.gethostname(),
        "machine": {"cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
                    "platform": platform.platform(),
                    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "settings": {"layer": args.layer, "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
                     "ig_steps": args.ig_steps, "threads_per_process": args.threads, "device": args.device},
        "runs": runs,
    }
    path = write_result(doc, args.out or RESULTS / f"evaluate-distributed-{socket.gethostname()}.json")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
