"""`c2mf evaluate` against the bare forward passes of the model tail it needs, with a profile of where the rest goes.

Case: the CUB bird model (MobileNetV2, 224 px) at `--layer` (head_conv by default: 7 x 7 x 1280), the first
`--classes` species, `--images` images of each in the train and in the test store (seeded split); a c2mf
dictionary (k = 10, shared with per-class gates) and a per-class PCA (k = 10). evaluate runs as the CLI runs it
(model reopened from the store, its weights checked and split, every metric, Grad-CAM and IG with 32 steps,
predicted- and true-class encodings, evaluation.json and plots written).

Measured in one process, so the machine's load weighs on them alike (CPU seconds of this process are the headline,
wall seconds beside them: the machine is shared; each timing is the fastest of `--repeat` runs):
1. evaluate end to end, counting every row it feeds h (images x steps) and the decoder (positions), with and
   without a gradient;
2. the bare tail: the same number of rows through h in calls of `--batch-size` rows on the test activations,
   without gradient, and with gradient (forward + backward to the input) for the rows IG and Grad-CAM
   differentiate. evaluate / bare tail is the ratio issue 13 asks for (1 = only the tail's forward passes);
3. the bare head: the bare tail plus the decoder on the counted code rows (forward, and backward to the codes for
   the differentiated ones). Every metric feeds h with decode(U), so evaluate / bare head is what is left once the
   decoder, which the metrics need too, is counted; at head_conv the tail is a mean and a linear layer and the
   decoder (k -> 1280 channels at every position) costs several times the tail;
4. evaluate again under cProfile: cumulative seconds of its parts (nested: a part's time includes the tail calls
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
from typing import Any, Callable

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

SHARED = Path(os.environ.get("C2MF_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
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
    """Rows fed to h (images x steps) and to the decoder (positions), split by whether a gradient is recorded."""

    def __init__(self) -> None:
        self.tail = {"no_grad": 0, "grad": 0}
        self.calls = {"no_grad": 0, "grad": 0}
        self.decode: dict[str, dict[str, int]] = {}

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        self.tail[key] += int(args[0].shape[0])
        self.calls[key] += 1

    def decoded(self, method: str, U: torch.Tensor) -> None:
        key = "grad" if torch.is_grad_enabled() and U.requires_grad else "no_grad"
        per = self.decode.setdefault(method, {"no_grad": 0, "grad": 0})
        per[key] += int(U.shape[0])


class Clock:
    """Wall and CPU seconds of a block (CPU: this process's threads, less sensitive to the other users)."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def as_dict(self) -> dict[str, float]:
        return {"wall": self.wall, "cpu": self.cpu}


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


def _in_calls(rows: int, block: int, call: Callable[[int], None]) -> Clock:
    """Time `call(n)` over `rows` rows in calls of at most `block`."""
    with Clock() as clock:
        done = 0
        while done < rows:
            n = min(block, rows - done)
            call(n)
            done += n
    return clock


def _bare_tail(tail: Any, acts: torch.Tensor, rows: int, batch: int, grad: bool) -> Clock:
    """Feed `rows` rows (tiled test activations) through the tail in calls of `batch` rows."""
    x_full = acts.repeat(-(-min(rows, batch) // acts.shape[0]), *[1] * (acts.ndim - 1))

    def call(n: int) -> None:
        x = x_full[:n].detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = tail(x)
            if grad:
                torch.autograd.grad(out.max(1).values.sum(), x)

    return _in_calls(rows, batch, call)


def _bare_decode(d: ConceptDictionary, rows: int, block: int, grad: bool) -> Clock:
    """Decode `rows` code rows (random, non-negative) of class 0 in blocks of `block` rows, and with `grad` also
    the backward to the codes: what the head adds to the tail for each row it feeds."""
    from c2mf_cli.methods import decode, needs_class

    y = 0 if needs_class(d) else None
    u_full = torch.rand(min(rows, block), d.n_concepts, generator=torch.Generator().manual_seed(0))

    def call(n: int) -> None:
        u = u_full[:n].detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            X = decode(d, u, y)
            if grad:
                torch.autograd.grad(X, u, torch.ones_like(X))

    return _in_calls(rows, block, call)


def _fastest(clocks: list[Clock]) -> Clock:
    """The repeat with the fewest CPU seconds: the one the other users of the machine disturbed least."""
    return min(clocks, key=lambda c: c.cpu)


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
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of evaluate and of each bare pass (the "
                    "fastest is kept)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the stores and dictionaries here and reuse them in later runs (default: a temp folder)")
    ap.add_argument("--profile-out", type=Path, default=None, help="also save the cProfile stats here")
    ap.add_argument("--label", default="after", help="suffix of the result file (e.g. before / after)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--block-images", type=int, default=None, help="evaluate's images per block on this device "
                    "(default: its own, stages.evaluate.block_images)")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"the real data folder {SHARED} is needed for this benchmark")
    dev = torch.device(args.device)
    if args.block_images is not None:
        ev.BLOCK_IMAGES = {**ev.BLOCK_IMAGES, dev.type: args.block_images}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, test, dicts = _inputs(args.work or tmp / "inputs", args)
        names = [f"c2mf k={args.concepts}", f"pca k={args.concepts} per class"]
        cfg = ev.EvaluateConfig(ig_steps=args.ig_steps, batch_size=args.batch_size)

        counter = Counter()
        original_tail, original_decode = ev._tail_from_store, ev._decode

        def counted_tail(*a: Any, **kw: Any) -> Any:
            tail, warnings = original_tail(*a, **kw)
            tail.h.register_forward_pre_hook(counter.hook)
            return tail, warnings

        def counted_decode(d: Any, U: torch.Tensor, y: Any) -> torch.Tensor:
            counter.decoded(d.method, U)
            return original_decode(d, U, y)

        ev._tail_from_store, ev._decode = counted_tail, counted_decode  # type: ignore[assignment]
        # first-call costs (imports of the plot modules, kernels) are not counted
        ev.evaluate(train, test, dicts, config=dataclasses.replace(cfg, max_images_per_class=1), names=names,
                    device=dev, model=MODEL.name, out_dir=tmp / "warmup")
        runs = []
        for _ in range(args.repeat):
            counter.__init__()  # type: ignore[misc]
            with Clock() as clock:
                res = ev.evaluate(train, test, dicts, config=cfg, names=names, device=dev, model=MODEL.name,
                                  out_dir=tmp / "eval")
            runs.append(clock)
        run = _fastest(runs)
        ev._tail_from_store, ev._decode = original_tail, original_decode  # type: ignore[assignment]

        with Clock() as reopen:
            tail, _ = original_tail(test, dev, MODEL.name)
        acts = torch.cat([torch.from_numpy(test.activations(y)[:]).float()
                          for y in range(len(test.classes)) if test.n_images(y)]).to(dev)
        bare = {key: _fastest([_bare_tail(tail, acts, counter.tail[key], args.batch_size, grad=key == "grad")
                               for _ in range(args.repeat)]) for key in ("no_grad", "grad")}
        positions = int(acts[0].numel() // acts.shape[-1]) - int(getattr(test, "num_prefix_tokens", 0) or 0)
        by_method = {d.method: d for d in dicts}
        dec = {f"{m}.{key}": _fastest([_bare_decode(by_method[m], n, args.batch_size * positions,
                                                    grad=key == "grad") for _ in range(args.repeat)])
               for m, per in counter.decode.items() for key, n in per.items() if m in by_method and n}

        prof = cProfile.Profile()
        prof.enable()
        ev.evaluate(train, test, dicts, config=cfg, names=names, device=dev, model=MODEL.name,
                    out_dir=tmp / "profiled")
        prof.disable()
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
    tail_s = {k: sum(getattr(c, k) for c in bare.values()) for k in ("wall", "cpu")}
    head_s = {k: tail_s[k] + sum(getattr(c, k) for c in dec.values()) for k in ("wall", "cpu")}
    result = {
        "benchmark": "evaluate",
        "label": args.label,
        "commit": _commit(),
        "case": f"mobilenet_v2_inat_birds {args.layer} (224 px), {args.classes} CUB species, c2mf k={args.concepts} "
                f"+ per-class PCA k={args.concepts}, IG {args.ig_steps} steps, Grad-CAM, encodings "
                f"{','.join(cfg.encode_class)}, --batch-size {args.batch_size}",
        "device": str(dev),
        "block_images": ev.block_images(dev),
        "n_test_images": n_test,
        "n_train_images": int(sum(train.n_images(y) for y in range(len(train.classes)))),
        "evaluate_s": run.as_dict(),
        "evaluate_s_every_repeat": [c.as_dict() for c in runs],
        "tail_rows": counter.tail,
        "tail_calls": counter.calls,
        "decoded_rows": counter.decode,
        "bare_tail_s": {key: c.as_dict() for key, c in bare.items()} | {"total": tail_s},
        "bare_decode_s": {key: c.as_dict() for key, c in dec.items()},
        "bare_head_s": head_s,
        "reopen_model_s": reopen.as_dict(),
        # the headline ratios, on CPU seconds (the machine is shared); wall-time ones beside them
        "ratio_evaluate_to_bare_tail": {k: run.as_dict()[k] / tail_s[k] for k in ("wall", "cpu")},
        "ratio_evaluate_to_bare_head": {k: run.as_dict()[k] / head_s[k] for k in ("wall", "cpu")},
        "ratio_without_reopen_to_bare_head": {k: (run.as_dict()[k] - reopen.as_dict()[k]) / head_s[k]
                                              for k in ("wall", "cpu")},
        "profile": {"total_s": total, "parts_cumulative_s": parts,
                    "top_own_s": [{"function": f, "s": round(s, 3)} for s, f in top[:20]]},
        "load_average_1min": os.getloadavg()[0],  # this machine is shared: say how busy it was
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"evaluate {run.cpu:.1f} CPU s ({run.wall:.1f} s wall) for {n_test} test images; bare tail passes "
          f"{tail_s['cpu']:.2f} CPU s ({counter.tail['no_grad']} rows without, {counter.tail['grad']} with gradient), "
          f"with the decoder (bare head) {head_s['cpu']:.2f}; ratios {run.cpu / tail_s['cpu']:.1f} to the tail, "
          f"{run.cpu / head_s['cpu']:.1f} to the head ({(run.cpu - reopen.cpu) / head_s['cpu']:.1f} without the "
          f"{reopen.cpu:.1f} s model reopen)")
    for label, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {s:7.2f} s")
    path = write_result(result, args.out / f"evaluate-{platform.node() or 'host'}-{args.label}.json")
    print(path)


if __name__ == "__main__":
    main()
