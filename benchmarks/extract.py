"""Throughput of `c2mf extract` against the bare model forward pass on the same images and batch size.

The bare pass is what a user would write by hand: the same preprocessing in a DataLoader with the same workers,
`model(x)` under inference_mode, nothing stored. `extract` adds the split (g then h), the float16 conversion and
the Zarr writes. Target on a 2-core CPU: ratio >= 0.9.

The checksums' cost (format version 2 puts zarr's crc32c codec after zstd on every array) is measured apart, since
it is far below the run-to-run noise of a whole extract: the rows of the last store written are encoded and
written again as extract writes them, with and without crc32c, interleaved, and the difference of the fastest
repeats (the least disturbed by other load) is given as a share of extract's steady-state time per image; the
crc32c computation alone over every chunk file of the store is timed too. The last store's file count and bytes
(files per GB) are recorded as well.

    python benchmarks/extract.py [--per-class 32] [--cub-per-class 4] [--batch-size 32] [--workers 1] [--repeats 3]
                                 [--only cifar] [--chunk-images auto,64]
    python benchmarks/extract.py --device cuda --autocast bf16     # both passes on the GPU, in bf16 autocast

Writes benchmarks/results/extract-<host>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader
from zarr.codecs import Crc32cCodec, ZstdCodec

from c2mf_cli.inputs.data import DatasetSpec, resolve_dataset
from c2mf_cli.stages.extract import ExtractConfig, _collate, _Images, extract
from c2mf_cli.inputs.models import ModelSpec, load_model
from _common import write_result

SHARED = Path(os.environ.get("C2MF_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

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


def bare_pass(case: dict, per_class: int, batch_size: int, workers: int, device: str = "cpu",
              autocast: str = "none") -> tuple[float, int]:
    lm = load_model(case["model"])
    items = resolve_dataset(DatasetSpec(str(case["data"]), class_index=case["class_index"], max_per_class=per_class))
    loader = DataLoader(_Images([(0, it.path) for it in items], lm.preprocess, None), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=device.startswith("cuda"))
    dev = torch.device(device)
    model = lm.model.to(dev, memory_format=torch.channels_last)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)
           if autocast != "none" else contextlib.nullcontext())
    t0 = time.perf_counter()
    with torch.inference_mode(), amp:
        for _slots, _paths, x, _errors, _counts in loader:
            model(x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, len(items)


def dihedral_copies(data: Path, per_class: int, copies: int, out: Path) -> Path:
    """An image folder holding, for the first `per_class` images of each class, the image and `copies - 1` of its
    flips and rotations (distinct images with the same statistics), as JPEGs like the originals. Named copy first,
    so a class's copies of one image are a whole pass of the class apart, not neighbours in a chunk."""
    if not 1 <= copies <= 8:
        raise SystemExit("--copies must be between 1 and 8 (the image and its 7 flips and rotations)")
    ops = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180,
           Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
           Image.Transpose.ROTATE_270]
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        (out / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_class]:
            with Image.open(f) as im:
                im = im.convert("RGB")
                for k, op in enumerate(ops[:copies]):
                    (im if op is None else im.transpose(op)).save(out / folder.name / f"{k}_{f.stem}.jpg",
                                                                  quality=90)
    return out


def store_files(path: Path) -> dict:
    """How many files the store holds and their bytes: what a file system with per-file costs sees."""
    files = [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    return {"files": len(files), "bytes": size, "files_per_gb": len(files) / (size / 1e9) if size else None}


def c2mf_pass(case: dict, per_class: int, batch_size: int, workers: int, out: Path, device: str = "cpu",
              autocast: str = "none", chunk_images: int | None = None) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = ExtractConfig(model=case["model"], layer=case["layer"],
                        data=DatasetSpec(str(case["data"]), class_index=case["class_index"], max_per_class=per_class),
                        out=str(out), batch_size=batch_size, workers=workers, device=device, autocast=autocast,
                        chunk_images=chunk_images)
    t0 = time.perf_counter()
    result = extract(cfg)
    # end to end counts model loading, the split's check and the store's layout: what a user waits for;
    # steady state is the images' loop alone (reading, model, writing), what dominates on a large dataset
    return time.perf_counter() - t0, result.compute_seconds, result.images


def checksum_cost(store: Path, tmp: Path, repeats: int) -> dict:
    """Seconds per image to encode and write (then read back) a store's rows with zstd, and with zstd + crc32c."""
    from c2mf_cli.artifacts.store import ZSTD_LEVEL, ActivationStore

    s = ActivationStore.open(store)
    groups = [{name: s._read(y, name) for name in ("activations", "logits", "valid")} for y in range(len(s.classes))]
    rows = int(s._group(0)["activations"].chunks[0])
    n = sum(g["valid"].shape[0] for g in groups)
    times: dict[str, list[float]] = {"zstd": [], "zstd+crc32c": [], "read zstd": [], "read zstd+crc32c": []}
    for r in range(repeats):
        for label, compressors in (("zstd", [ZstdCodec(level=ZSTD_LEVEL)]),
                                   ("zstd+crc32c", [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()])):
            root = zarr.open_group(str(tmp / f"cost-{label}-{r}"), mode="w", zarr_format=3)
            arrays = []
            for y, g in enumerate(groups):
                for name, a in g.items():
                    arr = root.create_array(f"c{y}/{name}", shape=a.shape, chunks=(rows, *a.shape[1:]),
                                            dtype=a.dtype, compressors=compressors)
                    arrays.append((arr.with_config({"write_empty_chunks": True}), a))
            t0 = time.perf_counter()
            for arr, a in arrays:
                for i in range(0, a.shape[0], rows):
                    arr[i : i + rows] = a[i : i + rows]
            times[label].append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            for arr, _ in arrays:
                np.asarray(arr[:])
            times[f"read {label}"].append((time.perf_counter() - t0) / n)
    best = {k: min(v) for k, v in times.items()}
    chunks = [f.read_bytes() for f in store.rglob("c/**/*") if f.is_file()]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for b in chunks:
            google_crc32c.value(b)
    crc_alone = (time.perf_counter() - t0) / repeats / n
    return {"images": n, "chunk_rows": rows, "best_seconds_per_image": best,
            "write_extra_seconds_per_image": best["zstd+crc32c"] - best["zstd"],
            "read_extra_seconds_per_image": best["read zstd+crc32c"] - best["read zstd"],
            "crc32c_alone_seconds_per_image": crc_alone, "runs": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=32, help="images per class (CIFAR: 10 classes, CUB: 78)")
    ap.add_argument("--cub-per-class", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...: both passes run there")
    ap.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"], help="both passes alike")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    ap.add_argument("--cost-repeats", type=int, default=20, help="repeats of the checksum-cost measurement")
    ap.add_argument("--copies", type=int, default=1, help="CIFAR only: each image and up to 7 of its flips and "
                    "rotations, written as new JPEGs (a larger job from the 1,000 images at hand)")
    ap.add_argument("--chunk-images", default="auto", help="extract's --chunk-images, several comma-separated "
                    "(e.g. auto,64: each interleaved with the bare pass; the first gives the headline ratios)")
    args = ap.parse_args()
    chunkings = [None if c == "auto" else int(c) for c in args.chunk_images.split(",")]
    if not SHARED.is_dir():
        raise SystemExit(f"the real data folder {SHARED} is needed for this benchmark")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in [c for c in CASES if args.only is None or args.only in c["name"]]:
            per_class = args.per_class if "cifar" in case["name"] else args.cub_per_class
            if args.copies > 1 and "cifar" in case["name"]:
                case = dict(case, data=dihedral_copies(case["data"], per_class, args.copies, Path(tmp) / "copies"))
                per_class *= args.copies
            for f in Path(case["data"]).rglob("*"):  # the images in the page cache before either pass reads them
                if f.is_file():
                    f.read_bytes()
            bare: list[float] = []
            ours: dict[int | None, list[float]] = {c: [] for c in chunkings}
            steady: dict[int | None, list[float]] = {c: [] for c in chunkings}
            stores: dict[int | None, dict] = {}
            for r in range(args.repeats):  # interleaved, so drift in machine load hits all alike
                s, n = bare_pass(case, per_class, args.batch_size, args.workers, args.device, args.autocast)
                bare.append(n / s)
                for c in chunkings:
                    path = Path(tmp) / f"s{r}-{c or 'auto'}.zarr"
                    s, s_loop, n = c2mf_pass(case, per_class, args.batch_size, args.workers, path, args.device,
                                             args.autocast, c)
                    ours[c].append(n / s)
                    steady[c].append(n / s_loop)
                    stores[c] = dict(store_files(path), chunk_images=json.loads(
                        (path / "zarr.json").read_text())["attributes"]["config"]["chunk_images"])
            by_chunking = [{"chunk_images": c or "auto", "store": stores[c],
                            "extract_images_per_s": statistics.median(ours[c]),
                            "ratio": statistics.median(ours[c]) / statistics.median(bare),
                            "extract_steady_images_per_s": statistics.median(steady[c]),
                            "ratio_steady": statistics.median(steady[c]) / statistics.median(bare),
                            "runs_extract": ours[c], "runs_steady": steady[c]} for c in chunkings]
            head = by_chunking[0]
            last = Path(tmp) / f"s{args.repeats - 1}-{chunkings[0] or 'auto'}.zarr"
            row = {
                "case": case["name"],
                "images": n,
                "bare_images_per_s": statistics.median(bare),
                "extract_images_per_s": head["extract_images_per_s"],
                "ratio": head["ratio"],
                "extract_steady_images_per_s": head["extract_steady_images_per_s"],
                "ratio_steady": head["ratio_steady"],
                "runs_bare": bare,
                "runs_extract": head["runs_extract"],
                "store": head["store"],
                "chunkings": by_chunking,
            }
            cost = checksum_cost(last, Path(tmp), args.cost_repeats)
            cost["share_of_extract_steady"] = cost["write_extra_seconds_per_image"] * row["extract_steady_images_per_s"]
            row["checksum_cost"] = cost
            rows.append(row)
            print(f"{row['case']}: bare {row['bare_images_per_s']:.1f}/s, extract {row['extract_images_per_s']:.1f}/s,"
                  f" ratio {row['ratio']:.2f} (steady state {row['ratio_steady']:.2f}); crc32c adds "
                  f"{cost['write_extra_seconds_per_image'] * 1e6:.1f} us per image written "
                  f"({100 * cost['share_of_extract_steady']:.2f} % of extract's steady time per image)")
            for b in by_chunking[1:]:
                print(f"  --chunk-images {b['chunk_images']}: ratio {b['ratio']:.2f} (steady state "
                      f"{b['ratio_steady']:.2f}), {b['store']['files']} files")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "extract",
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "repeats": args.repeats,
        "copies": args.copies,
        "load_average_1min_at_end": os.getloadavg()[0],
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "autocast": args.autocast,
        "cases": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    suffix = f"-{args.only}" if args.only else ""
    tag = "" if (args.device, args.autocast) == ("cpu", "none") else f"-{args.device.replace(':', '')}-{args.autocast}"
    path = write_result(result, args.out / f"extract-{platform.node() or 'host'}{suffix}{tag}.json")
    print(path)


if __name__ == "__main__":
    main()
