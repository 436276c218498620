"""Our TopK SAE (`--method sae`) against overcomplete's TopKSAE on the same rows, same k, top-k and steps, as JSON.

    python benchmarks/sae.py                  # CIFAR-10 ResNet-20 layer3 (1,000 images x 64 positions x 64 channels)
    python benchmarks/sae.py --synthetic      # a seeded planted matrix instead (no real data needed)

Both train with Adam (same learning rate) on the same rows, scaled to a mean squared entry of 1 (our fit does this
itself; overcomplete gets the scaled rows), in mini-batches of the same size, shuffled, for the same number of
passes, so the same number of steps. overcomplete's TopKSAE is its default: a linear encoder with batch norm, an
l2-normalised dictionary without decoder bias, trained by its `train_sae` with plain MSE. Measured after training,
on every row, by each model's own encode / decode: the relative reconstruction error ||A - A_hat||_F / ||A||_F, the
fraction of latents that never fire, and the wall time of the fit. Ours runs twice: with dead-latent resampling
(the default) and without, to show what resampling buys. Writes benchmarks/results/sae-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from c2mf_cli.artifacts.sources import ArraySource
from c2mf_cli.methods import decode, encode
from c2mf_cli.stages.factorize import factorize
from _common import overcomplete_module, write_result

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cifar_rows(workdir: Path) -> tuple[list[np.ndarray], list[str], str]:
    """layer3 of ResNet-20 on the 1,000 CIFAR-10 test JPEGs, extracted by `c2mf extract` into a temporary store."""
    from c2mf_cli.artifacts.store import ActivationStore
    from c2mf_cli.inputs.data import DatasetSpec
    from c2mf_cli.inputs.models import ModelSpec
    from c2mf_cli.stages.extract import ExtractConfig, extract

    cfg = ExtractConfig(model=ModelSpec(f"{SHARED}/models.py:cifar_resnet20", str(SHARED / "cifar10/resnet20-12fca82f.th")),
                        layer="layer3", data=DatasetSpec(str(SHARED / "cifar10/images")), out=str(workdir / "s.zarr"),
                        workers=0, device="cpu")
    extract(cfg)
    src = ActivationStore.open(workdir / "s.zarr").row_source()
    return [np.asarray(src.load(y), np.float32) for y in range(len(src.classes))], list(src.classes), \
        "CIFAR-10 ResNet-20 layer3, 1,000 test images"


def synthetic_rows(seed: int = 0) -> tuple[list[np.ndarray], list[str], str]:
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((256, 64)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    arrays = []
    for _ in range(10):
        U = rng.exponential(1.0, (6400, 256)) * (rng.random((6400, 256)) < 8 / 256)
        arrays.append((U @ D + 0.05 * rng.standard_normal((6400, 64))).astype(np.float32))
    return arrays, [f"c{i}" for i in range(10)], "synthetic: 64,000 x 64, sparse sums of 256 directions"


def _overcomplete_topk():
    """overcomplete's TopKSAE and train_sae."""
    try:
        return overcomplete_module("sae.topk_sae").TopKSAE, overcomplete_module("sae.train").train_sae
    except ModuleNotFoundError as e:
        raise SystemExit(str(e)) from None


def run_ours(arrays: list[np.ndarray], classes: list[str], args: argparse.Namespace, resample: bool) -> dict[str, Any]:
    A = np.concatenate(arrays)
    t0 = time.perf_counter()
    d = factorize(ArraySource(arrays, classes=classes), "sae", device="cpu", concepts=args.k, top_k=args.top_k,
                  iterations=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  resample_after=args.resample_after if resample else 0)
    seconds = time.perf_counter() - t0
    U = encode(d, A)
    rel = float(np.linalg.norm(decode(d, U) - A) / np.linalg.norm(A))
    hist = d.meta["history"][0]["loss"]
    return {"method": "c2mf sae" + ("" if resample else " (no resampling)"), "seconds": seconds,
            "relative_error": rel, "dead_fraction": float(((U > 0).sum(0) == 0).mean()),
            "steps": int(sum(h.get("steps", 0) for h in hist)),
            "resampled": int(sum(h.get("resampled", 0) for h in hist)),
            "mean_active": float((U > 0).sum(1).mean())}


def run_overcomplete(arrays: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    TopKSAE, train_sae = _overcomplete_topk()
    A = torch.from_numpy(np.concatenate(arrays))
    scale = float(torch.rsqrt(A.pow(2).mean()))  # the same normalisation our fit applies to its rows
    X = A * scale
    torch.manual_seed(args.seed)
    model = TopKSAE(X.shape[1], nb_concepts=args.k, top_k=args.top_k, device="cpu")
    loader = torch.utils.data.DataLoader(X, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    train_sae(model, loader, lambda x, x_hat, *_: (x - x_hat).square().mean(), opt, nb_epochs=args.epochs,
              monitoring=0, device="cpu")
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        _, Z, X_hat = model(X)
    rel = float(torch.linalg.norm(X_hat - X) / torch.linalg.norm(X))
    return {"method": "overcomplete TopKSAE", "seconds": seconds, "relative_error": rel,
            "dead_fraction": float(((Z > 0).sum(0) == 0).float().mean()),
            "steps": args.epochs * math.ceil(X.shape[0] / args.batch_size),
            "mean_active": float((Z > 0).sum(1).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="planted rows instead of CIFAR-10 layer3")
    ap.add_argument("--k", type=int, default=256, help="latents (4x the 64 channels)")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--resample-after", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            arrays, classes, what = synthetic_rows(args.seed)
        else:
            if not SHARED.is_dir():
                raise SystemExit(f"the real data folder {SHARED} is needed (or pass --synthetic)")
            arrays, classes, what = cifar_rows(Path(tmp))
    results = [run_ours(arrays, classes, args, resample=True), run_overcomplete(arrays, args),
               run_ours(arrays, classes, args, resample=False)]
    ours, theirs = results[0], results[1]
    out = {
        "benchmark": "sae", "host": platform.node(), "torch": torch.__version__, "threads": args.threads,
        "rows": what, "n_rows": int(sum(a.shape[0] for a in arrays)), "channels": int(arrays[0].shape[1]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": None},
        "results": results,
        "ratios_ours_over_overcomplete": {
            "relative_error": ours["relative_error"] / theirs["relative_error"],
            "dead_fraction": (ours["dead_fraction"] / theirs["dead_fraction"]) if theirs["dead_fraction"] else None,
            "seconds": ours["seconds"] / theirs["seconds"],
        },
    }
    path = write_result(out, args.out / f"sae-{'synthetic-' if args.synthetic else ''}{platform.node() or 'host'}.json")
    for r in results:
        print(f"{r['method']:28s} rel err {r['relative_error']:.4f}  dead {r['dead_fraction']:.3f}  "
              f"{r['seconds']:.1f} s  {r['steps']} steps")
    print(json.dumps(out["ratios_ours_over_overcomplete"]), "->", path)


if __name__ == "__main__":
    main()
