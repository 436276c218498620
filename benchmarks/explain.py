"""Seconds per image of `c2mf explain` at 224 px with figures, split into the model side and the figure side.

Case: the CUB bird model (MobileNetV2, 224 px) at `head_conv` (1280 x 7 x 7), a c2mf dictionary of k = 10
concepts fitted on a small store of the real birds (one image of each of the first `--images` species); explain
those images with Grad-CAM (the default) and with Integrated Gradients, through `explain_images` exactly as
the CLI calls it (reading, model passes, figure, PNG and JSON writes). The model side is also timed alone,
batched (`Explainer.explain_batch`, what explain_images does) and one image at a time (as before batching),
and the figure side (drawing + PNG) alone. Goal (issue 13): under 0.5 s per image with figures.

    python benchmarks/explain.py [--images 16] [--label after]

Writes benchmarks/results/explain-<host>-<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from c2mf_cli.artifacts.store import ActivationStore
from c2mf_cli.inputs.data import DatasetSpec, resolve_dataset
from c2mf_cli.inputs.models import ModelSpec
from c2mf_cli.stages.explain import ExplainConfig, Explainer, explain_images, read_image
from c2mf_cli.stages.extract import ExtractConfig, extract
from c2mf_cli.stages.factorize import factorize
from _common import write_result

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = ModelSpec(f"{SHARED}/models.py:mobilenet_v2_inat_birds", str(SHARED / "cub/mobilenet_v2_inat_birds.pt"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="images explained per importance method")
    ap.add_argument("--label", default="after", help="suffix of the result file (e.g. before / after)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"the real data folder {SHARED} is needed for this benchmark")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # a folder of links to the first species (the class index filtered to them): a small store to fit on
        index = json.loads((SHARED / "cub/class_index.json").read_text())
        species = sorted(index["classes"])[: args.images]
        root = Path(tmp) / "birds"
        root.mkdir()
        for name in species:
            (root / name).symlink_to(SHARED / "cub/images" / name)
        (Path(tmp) / "index.json").write_text(json.dumps({**index, "classes": {n: index["classes"][n]
                                                                              for n in species}}))
        data = DatasetSpec(str(root), class_index=str(Path(tmp) / "index.json"), max_per_class=1)
        paths = [Path(it.path) for it in resolve_dataset(data)]
        store_path = Path(tmp) / "birds.zarr"
        extract(ExtractConfig(model=MODEL, layer="head_conv", data=data, out=str(store_path), workers=0))
        d = factorize(ActivationStore.open(store_path).row_source(), "c2mf", concepts=10, iterations=50,
                      device="cpu")
        dict_path = d.save(Path(tmp) / "c2mf.safetensors")
        for importance in ("gradcam", "ig"):
            ex = Explainer.create(dict_path, ExplainConfig(importance=importance, top=5), model=MODEL.name,
                                  device="cpu")  # the model is code: explain runs it only when told to
            explain_images(paths[:1], ex, Path(tmp) / "warmup")  # first-call costs (fonts, kernels) not counted
            t0 = time.perf_counter()
            summary = explain_images(paths, ex, Path(tmp) / importance)
            total = time.perf_counter() - t0
            images = [read_image(p) for p in paths]
            t0 = time.perf_counter()
            records = ex.explain_batch(images)
            model_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for im in images:
                ex.explain_batch([im])
            single_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for p, im, rec in zip(paths, images, records):
                ex.save_figure(im, rec, Path(tmp) / "figures" / f"{p.stem}.png", title=p.name)
            figure_s = time.perf_counter() - t0
            n = len(summary["explained"])
            row = {"importance": importance, "images": n, "seconds_per_image": total / n,
                   "model_seconds_per_image": model_s / n, "model_one_at_a_time_seconds_per_image": single_s / n,
                   "figure_seconds_per_image": figure_s / n,
                   "goal_seconds_per_image": 0.5, "met": total / n < 0.5}
            rows.append(row)
            print(f"{importance}: {row['seconds_per_image']:.3f} s/image (model {row['model_seconds_per_image']:.3f}"
                  f" batched, {row['model_one_at_a_time_seconds_per_image']:.3f} one at a time; figure "
                  f"{row['figure_seconds_per_image']:.3f})")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "explain",
        "label": args.label,
        "case": "mobilenet_v2_inat_birds head_conv (224 px), c2mf k=10, top 5 concepts",
        "load_average_1min": os.getloadavg()[0],  # this machine is shared: say how busy it was
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cases": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = write_result(result, args.out / f"explain-{platform.node() or 'host'}-{args.label}.json")
    print(path)


if __name__ == "__main__":
    main()
