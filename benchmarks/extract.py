"""Throughput of `c2mf extract` against the bare model forward pass on the same images and batch size.

The bare pass is what a user would write by hand: the same preprocessing in a DataLoader with the same workers,
`model(x)` under inference_mode, nothing stored. `extract` adds the split (g then h), the float16 conversion and
the Zarr writes. Target on a 2-core CPU: ratio >= 0.9.

    python benchmarks/extract.py [--images 320] [--batch-size 32] [--workers 1] [--repeats 3]

Writes benchmarks/results/extract-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from c2mf_cli.inputs.data import DatasetSpec, resolve_dataset
from c2mf_cli.stages.extract import ExtractConfig, _collate, _Images, extract
from c2mf_cli.inputs.models import ModelSpec, load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CASES = [
    {
        "name": "cifar_resnet20 layer3 (32 px)",
        "model": ModelSpec(f"{SHARED}/models.py:cifar_resnet20", str(SHARED / "cifar10/resnet20-12fca82f.th")),
        "layer": "layer3",
        "data": SHARED / "cifar10/images",
        "class_index": None,
    },
    {
        "name": "mobilenet_v2_inat_birds head_conv (224 px)",
        "model": ModelSpec(f"{SHARED}/models.py:mobilenet_v2_inat_birds", str(SHARED / "cub/mobilenet_v2_inat_birds.pt")),
        "layer": "head_conv",
        "data": SHARED / "cub/images",
        "class_index": str(SHARED / "cub/class_index.json"),
    },
]


def bare_pass(case: dict, per_class: int, batch_size: int, workers: int) -> tuple[float, int]:
    lm = load_model(case["model"])
    items = resolve_dataset(DatasetSpec(str(case["data"]), class_index=case["class_index"], max_per_class=per_class))
    loader = DataLoader(_Images([(0, it.path) for it in items], lm.preprocess, None), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate)
    model = lm.model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _slots, _paths, x, _errors, _counts in loader:
            model(x.contiguous(memory_format=torch.channels_last))
    return time.perf_counter() - t0, len(items)


def c2mf_pass(case: dict, per_class: int, batch_size: int, workers: int, out: Path) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = ExtractConfig(model=case["model"], layer=case["layer"],
                        data=DatasetSpec(str(case["data"]), class_index=case["class_index"], max_per_class=per_class),
                        out=str(out), batch_size=batch_size, workers=workers)
    t0 = time.perf_counter()
    result = extract(cfg)
    # end to end counts model loading, the split's check and the store's layout: what a user waits for;
    # steady state is the images' loop alone (reading, model, writing), what dominates on a large dataset
    return time.perf_counter() - t0, result.compute_seconds, result.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=32, help="images per class (CIFAR: 10 classes, CUB: 78)")
    ap.add_argument("--cub-per-class", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"the real data folder {SHARED} is needed for this benchmark")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            per_class = args.per_class if "cifar" in case["name"] else args.cub_per_class
            bare, ours, steady = [], [], []
            for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
                s, n = bare_pass(case, per_class, args.batch_size, args.workers)
                bare.append(n / s)
                s, s_loop, n = c2mf_pass(case, per_class, args.batch_size, args.workers, Path(tmp) / f"s{r}.zarr")
                ours.append(n / s)
                steady.append(n / s_loop)
            row = {
                "case": case["name"],
                "images": n,
                "bare_images_per_s": statistics.median(bare),
                "extract_images_per_s": statistics.median(ours),
                "ratio": statistics.median(ours) / statistics.median(bare),
                "extract_steady_images_per_s": statistics.median(steady),
                "ratio_steady": statistics.median(steady) / statistics.median(bare),
                "runs_bare": bare,
                "runs_extract": ours,
            }
            rows.append(row)
            print(f"{row['case']}: bare {row['bare_images_per_s']:.1f}/s, extract {row['extract_images_per_s']:.1f}/s,"
                  f" ratio {row['ratio']:.2f} (steady state {row['ratio_steady']:.2f})")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "extract",
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "repeats": args.repeats,
        "cases": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = args.out / f"extract-{platform.node() or 'host'}.json"
    path.write_text(json.dumps(result, indent=2))
    print(path)


if __name__ == "__main__":
    main()
