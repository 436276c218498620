"""`c2mf evaluate` against the bare forward passes of the model tail it needs, with a profile of where the rest goes.

Case: the CUB bird model (MobileNetV2, 224 px) at `--layer` (head_conv by default: 7 x 7 x 1280), the first
`--classes` species, `--images` images of each in the train and in the test store (seeded split); a c2mf
dictionary (k = 10, shared with per-class gates) and a per-class PCA (k = 10). evaluate runs as the CLI runs it
(model reopened from the store, its weights checked and split, every metric, Grad-CAM and IG with 32 steps,
predicted- and true-class encodings, evaluation.json and plots written).

Three measurements in one process, so the machine's load weighs on them alike:
1. evaluate end to end, with a counter on the tail h: every row it feeds h, with and without a gradient;
2. the bare forward passes: the same number of rows through h in calls of `--batch-size` rows on the test
   activations, without gradient, and with gradient (forward + backward to the input) for the rows that IG and
   Grad-CAM differentiate. The ratio evaluate / bare is what issue 13 asks (1 = only forward passes);
3. evaluate again under cProfile: cumulative seconds of its parts (nested: a part's time includes the tail calls
   made inside it) and the top functions by own time.

    python benchmarks/evaluate.py [--classes 12] [--images 6] [--layer head_conv] [--label after]

Writes benchmarks/results/evaluate-<host>-<label>.json. To compare with another commit, run this script with
PYTHONPATH pointing at that commit's tree (the script uses only evaluate's public entry and `_tail_from_store`).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import c2mf_cli
from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.artifacts.store import ActivationStore
from c2mf_cli.inputs.data import DatasetSpec
from c2mf_cli.inputs.models import ModelSpec
from c2mf_cli.stages import evaluate as ev
from c2mf_cli.stages.extract import ExtractConfig, extract
from c2mf_cli.stages.factorize import factorize
from _common import write_result

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = ModelSpec(f"{SHARED}/models.py:mobilenet_v2_inat_birds", str(SHARED / "cub/mobilenet_v2_inat_birds.pt"))

# the parts of the profile: (file suffix, function) -> name; cumulative seconds, so nested parts overlap
PARTS = {
    ("stages/evaluate.py", "_tail_from_store"): "reopen model + split (once)",
    ("stages/evaluate.py", "_check_inputs"): "input checks",
    ("stages/evaluate.py", "_take"): "store reads",
    ("stages/evaluate.py", "_feed"): "per-dictionary work (_feed)",
    ("methods/base.py", "encode"): "encode",
    ("methods/base.py", "decode"): "decode",
    ("stages/evaluate.py", "_rows_to_head"): "reconstruction + reference heads",
    ("metrics/importance.py", "gradcam"): "Grad-CAM",
    ("metrics/importance.py", "integrated_gradients"): "Integrated Gradients",
    ("metrics/insertion.py", "insertion_deletion"): "insertion/deletion",
    ("metrics/reconstruction.py", "update"): "reconstruction / fit metric update",
    ("metrics/similarity.py", "update"): "similarity update",
    ("stages/evaluate.py", "write_results"): "JSON + plots",
    ("torch/autograd/__init__.py", "grad"): "backward passes (autograd.grad)",
}


class Counter:
    """Rows fed to h, split by whether a gradient is recorded."""

    def __init__(self) -> None:
        self.rows = {"no_grad": 0, "grad": 0}
        self.calls = {"no_grad": 0, "grad": 0}

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        self.rows[key] += int(args[0].shape[0])
        self.calls[key] += 1


def _stores(tmp: Path, classes: int, images: int, layer: str) -> tuple[Path, Path]:
    index = json.loads((SHARED / "cub/class_index.json").read_text())
    species = sorted(index["classes"])[:classes]
    root = tmp / "birds"
    root.mkdir()
    for name in species:
        (root / name).symlink_to(SHARED / "cub/images" / name)
    (tmp / "index.json").write_text(json.dumps({**index, "classes": {n: index["classes"][n] for n in species}}))
    out = []
    for split in ("train", "test"):
        data = DatasetSpec(str(root), class_index=str(tmp / "index.json"), max_per_class=images, split=split)
        path = tmp / f"{split}.zarr"
        extract(ExtractConfig(model=MODEL, layer=layer, data=data, out=str(path), workers=0, device="cpu"))
        out.append(path)
    return out[0], out[1]


def _inputs(work: Path, args: argparse.Namespace) -> tuple[ActivationStore, ActivationStore, list]:
    """The stores and dictionaries of the case, made in `work` unless a former run left them there."""
    key = f"{args.layer}-{args.classes}x{args.images}-k{args.concepts}"
    files = [work / f"{key}-{n}" for n in ("train.zarr", "test.zarr", "c2mf.safetensors", "pca.safetensors")]
    if not all(f.exists() for f in files):
        (work / key).mkdir(parents=True, exist_ok=True)
        train_path, test_path = _stores(work / key, args.classes, args.images, args.layer)
        train_path.rename(files[0])
        test_path.rename(files[1])
        source = ActivationStore.open(files[0]).row_source()
        factorize(source, "c2mf", concepts=args.concepts, iterations=30, device=args.device).save(files[2])
        factorize(source, "pca", concepts=args.concepts, device=args.device).save(files[3])
    return (ActivationStore.open(files[0]), ActivationStore.open(files[1]),
            [ConceptDictionary.load(f) for f in files[2:]])


def _bare(tail: Any, acts: torch.Tensor, rows: int, batch: int, grad: bool) -> float:
    """Seconds to feed `rows` rows (tiled test activations) through the tail in calls of `batch` rows."""
    reps = -(-min(rows, batch) // acts.shape[0])
    x_full = acts.repeat(reps, *[1] * (acts.ndim - 1))
    t0 = time.perf_counter()
    done = 0
    while done < rows:
        x = x_full[: min(batch, rows - done)]
        if grad:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(tail(x).max(1).values.sum(), x)
        else:
            with torch.no_grad():
                tail(x)
        done += x.shape[0]
    return time.perf_counter() - t0


def _commit() -> str | None:
    try:
        root = Path(c2mf_cli.__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=12, help="species (the first N, sorted)")
    ap.add_argument("--images", type=int, default=3, help="images per species in each of the train and test stores")
    ap.add_argument("--layer", default="head_conv")
    ap.add_argument("--concepts", type=int, default=10)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024, help="evaluate's --batch-size and the bare calls'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the stores and dictionaries here and reuse them in later runs (default: a temp folder)")
    ap.add_argument("--profile-out", type=Path, default=None, help="also save the cProfile stats here")
    ap.add_argument("--label", default="after", help="suffix of the result file (e.g. before / after)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"the real data folder {SHARED} is needed for this benchmark")
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, test, dicts = _inputs(args.work or tmp / "inputs", args)
        names = [f"c2mf k={args.concepts}", f"pca k={args.concepts} per class"]
        cfg = ev.EvaluateConfig(ig_steps=args.ig_steps, batch_size=args.batch_size)

        counter = Counter()
        original = ev._tail_from_store

        def counted(*a: Any, **kw: Any) -> Any:
            tail, warnings = original(*a, **kw)
            tail.h.register_forward_pre_hook(counter.hook)
            return tail, warnings

        ev._tail_from_store = counted  # type: ignore[assignment]
        # first-call costs (imports of the plot modules, kernels) are not counted
        ev.evaluate(train, test, dicts, config=dataclasses.replace(cfg, max_images_per_class=1), names=names,
                    device=dev, model=MODEL.name, out_dir=tmp / "warmup")
        counter.rows = {"no_grad": 0, "grad": 0}
        counter.calls = {"no_grad": 0, "grad": 0}
        t0 = time.perf_counter()
        res = ev.evaluate(train, test, dicts, config=cfg, names=names, device=dev, model=MODEL.name,
                          out_dir=tmp / "eval")
        evaluate_s = time.perf_counter() - t0
        rows, calls = dict(counter.rows), dict(counter.calls)

        t0 = time.perf_counter()
        tail, _ = original(test, dev, MODEL.name)
        reopen_s = time.perf_counter() - t0
        acts = torch.cat([torch.from_numpy(test.activations(y)[:]).float()
                          for y in range(len(test.classes)) if test.n_images(y)]).to(dev)
        fwd_s = _bare(tail, acts, rows["no_grad"], args.batch_size, grad=False)
        grad_s = _bare(tail, acts, rows["grad"], args.batch_size, grad=True)
        bare_s = fwd_s + grad_s

        prof = cProfile.Profile()
        prof.enable()
        ev.evaluate(train, test, dicts, config=cfg, names=names, device=dev, model=MODEL.name,
                    out_dir=tmp / "profiled")
        prof.disable()
        ev._tail_from_store = original  # type: ignore[assignment]
    if args.profile_out is not None:
        prof.dump_stats(args.profile_out)
    stats = pstats.Stats(prof)
    total = max(v[3] for v in stats.stats.values())  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    top = []
    for (file, line, func), (_, _, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (suffix, name), label in PARTS.items():
            if func == name and file.endswith(suffix):
                # two functions of one name in a file (the metrics' update) are told apart by their line
                parts[label if label not in parts else f"{label} (line {line})"] = round(cum, 3)
        top.append((own, f"{Path(file).name}:{func}"))
    top.sort(reverse=True)
    n_test = res["n_test_images"]
    result = {
        "benchmark": "evaluate",
        "label": args.label,
        "commit": _commit(),
        "case": f"mobilenet_v2_inat_birds {args.layer} (224 px), {args.classes} CUB species, c2mf k={args.concepts} "
                f"+ per-class PCA k={args.concepts}, IG {args.ig_steps} steps, Grad-CAM, encodings "
                f"{','.join(cfg.encode_class)}",
        "device": str(dev),
        "n_test_images": n_test,
        "n_train_images": int(sum(train.n_images(y) for y in range(len(train.classes)))),
        "evaluate_s": evaluate_s,
        "tail_rows": rows,
        "tail_calls": calls,
        "bare_forward_s": {"no_grad": fwd_s, "grad": grad_s, "total": bare_s},
        "ratio_evaluate_to_bare": evaluate_s / bare_s,
        "reopen_model_s": reopen_s,
        "ratio_without_reopen": (evaluate_s - reopen_s) / bare_s,
        "profile": {"total_s": total, "parts_cumulative_s": parts,
                    "top_own_s": [{"function": f, "s": round(s, 3)} for s, f in top[:20]]},
        "load_average_1min": os.getloadavg()[0],  # this machine is shared: say how busy it was
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"evaluate {evaluate_s:.1f} s for {n_test} test images; bare tail passes {bare_s:.2f} s "
          f"({rows['no_grad']} rows without, {rows['grad']} with gradient); ratio {evaluate_s / bare_s:.1f} "
          f"({(evaluate_s - reopen_s) / bare_s:.1f} without the {reopen_s:.1f} s model reopen)")
    for label, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {s:7.2f} s")
    path = write_result(result, args.out / f"evaluate-{platform.node() or 'host'}-{args.label}.json")
    print(path)


if __name__ == "__main__":
    main()
