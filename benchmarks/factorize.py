"""Benchmark of `c2mf factorize` against scikit-learn and overcomplete, written as JSON.

    python benchmarks/factorize.py                 # 200,000 x 2,048, k = 25 (minutes on 2 cores)
    python benchmarks/factorize.py --rows 50000    # smaller matrix
    python benchmarks/factorize.py --quick         # 20,000 x 512: a smoke run
    python benchmarks/factorize.py --device cuda   # our methods on the GPU, the others on this machine's CPU

What it measures, on one seeded non-negative matrix A (rows x channels; 50 planted non-negative concepts with
sparse codes plus noise, so k = 25 cannot fit it exactly):
  * each method's wall time, peak resident memory during the fit above the data itself (each method runs in its
    own subprocess; RSS sampled every 5 ms) and the
    relative reconstruction error ||A - U W||_F / ||A||_F it reaches;
  * the target error = scikit-learn NMF (cd, --sk-iters iterations)'s error x (1 + --slack); for our methods
    (their per-pass history) the time to first reach it; ratios = sklearn-cd time / time to target;
  * memory against rows for our streaming mode, on a source that generates its rows batch by batch (nothing
    resident), so any growth is the algorithm's.
Results go to benchmarks/results/factorize-<host>.json. The machine is shared: treat numbers as ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from _common import RESULTS, overcomplete_module, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ["c2mf-nmf", "c2mf-nmf-stream", "c2mf-semi-nmf", "c2mf-c2mf", "c2mf-pca"]
THEIRS = ["sklearn-nmf-cd", "sklearn-nmf-mu", "sklearn-minibatch-nmf", "sklearn-pca", "torch-pca-lowrank",
          "overcomplete-nmf", "overcomplete-semi-nmf"]


def make_matrix(rows: int, channels: int, seed: int = 0, true_k: int = 50) -> np.ndarray:
    """Seeded non-negative test matrix, built in blocks to keep the peak near the matrix itself."""
    rng = np.random.default_rng(seed)
    W = (np.abs(rng.standard_normal((true_k, channels))) * (rng.random((true_k, channels)) < 0.2)).astype(np.float32)
    A = np.empty((rows, channels), np.float32)
    for s in range(0, rows, 8192):  # small blocks: the peak while building stays near A itself
        n = min(8192, rows - s)
        U = (rng.exponential(1.0, (n, true_k)) * (rng.random((n, true_k)) < 0.3)).astype(np.float32)
        A[s : s + n] = U @ W + 0.1 * rng.random((n, channels), dtype=np.float32)
    return A


class GeneratedSource:
    """A RowSource whose rows are generated per batch from a seed: the data is never resident in memory."""

    def __init__(self, rows: int, channels: int, batch: int = 16384, seed: int = 0) -> None:
        self.classes = ["all"]
        self.n_features = channels
        self.mode = "full"
        self.info: dict[str, Any] = {}
        self._rows, self._batch, self._seed = rows, batch, seed
        rng = np.random.default_rng(seed)
        self._W = (np.abs(rng.standard_normal((50, channels))) * (rng.random((50, channels)) < 0.2)).astype(np.float32)

    def n_rows(self, y: int) -> int:
        return self._rows

    def _block(self, i: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, i])
        U = (rng.exponential(1.0, (n, 50)) * (rng.random((n, 50)) < 0.3)).astype(np.float32)
        return U @ self._W + 0.1 * rng.random((n, self.n_features), dtype=np.float32)

    def load(self, y: int) -> np.ndarray:
        return np.concatenate(list(self.batches(y, self._batch)))

    def batches(self, y: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        for i, s in enumerate(range(0, self._rows, batch_size)):
            yield self._block(i, min(batch_size, self._rows - s))


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms from /proc)."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0


def _rel(A: np.ndarray, U: np.ndarray, W: np.ndarray) -> float:
    """||A - U W|| / ||A|| in the Gram form, blockwise (never the full product)."""
    import torch

    At, Ut, Wt = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in (A, U, W))
    a2 = float((At.double() ** 2).sum())
    cross = float((Ut * (At @ Wt.T)).sum(dtype=torch.float64))
    quad = float(((Ut.T @ Ut) * (Wt @ Wt.T)).sum(dtype=torch.float64))
    return float(np.sqrt(max(a2 - 2 * cross + quad, 0.0) / a2))


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One method in this process: time, peak memory, error, and (ours) the per-pass history."""
    import torch

    rec: dict[str, Any] = {"method": name}
    if name.startswith("stream-"):
        from c2mf_cli.stages.factorize import factorize

        rows = int(name.split("-")[1])
        src = GeneratedSource(rows, args.channels)
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            d = factorize(src, "c2mf", concepts=args.k, iterations=2, tol=0.0, batch_size=16384, device=args.device,
                          alpha=0.0, subsample_rows=0)
        rec.update(rows=rows, seconds=time.perf_counter() - t0,
                   relative_error=d.meta["history"][0]["loss"][-1]["relative_error"],
                   peak_mb=mem.peak, base_mb=mem.base, extra_mb=mem.peak - mem.base)
        return rec
    A = make_matrix(args.rows, args.channels, args.seed)
    k = args.k
    mem = PeakRSS().__enter__()  # stopped right after each fit, before errors are measured
    t0 = time.perf_counter()
    if name.startswith("c2mf-"):
        from c2mf_cli.stages.factorize import factorize
        from c2mf_cli.artifacts.sources import ArraySource

        method = name[len("c2mf-"):].replace("-stream", "")
        opts: dict[str, Any] = {"concepts": k}
        if method != "pca":
            opts.update(iterations=args.iters, tol=args.tol, batch_size=None if "stream" not in name else 16384)
        if method in ("nmf", "semi-nmf"):
            opts["shared"] = True
        if method == "pca":
            opts.update(shared=True, batch_size=16384)
        if method == "c2mf":
            opts["alpha"] = 0.0
        d = factorize(ArraySource([A]), method, device=args.device, **opts)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        d = d.to("cpu")
        rec["seconds"] = time.perf_counter() - t0
        mem.__exit__()
        hist = d.meta["history"][0]["loss"]
        rec["relative_error"] = hist[-1]["relative_error"]
        rec["passes"] = len(hist)
        init = d.meta["fit_seconds"] - sum(h.get("seconds", 0.0) for h in hist)
        elapsed = np.cumsum([h.get("seconds", 0.0) for h in hist])
        rec["curve"] = [[init + float(t), h["relative_error"]] for t, h in zip(elapsed, hist)]
        rec["seconds"] = d.meta["fit_seconds"]
        # independent check of the recorded error: the final dictionary's own codes, error by the Gram form
        from c2mf_cli.methods import basis, encode, needs_class

        y = 0 if needs_class(d) else None
        U = encode(d, A, y, iters=30)
        Wf = basis(d, y).numpy()
        if "mean" in d.tensors:
            Ac = A - d.tensors["mean"].numpy()
            rec["relative_error_check"] = _rel(Ac, U, Wf) * float(np.linalg.norm(Ac) / np.linalg.norm(A))
        else:
            rec["relative_error_check"] = _rel(A, U, Wf)
    elif name.startswith("sklearn-nmf") or name == "sklearn-minibatch-nmf":
        import warnings

        from sklearn.decomposition import NMF, MiniBatchNMF

        warnings.simplefilter("ignore")
        if name == "sklearn-minibatch-nmf":
            model = MiniBatchNMF(n_components=k, batch_size=4096, max_iter=args.sk_iters, random_state=0)
        else:
            model = NMF(n_components=k, solver=name.split("-")[-1], max_iter=args.sk_iters, tol=1e-6,
                        random_state=0, init="nndsvda")
        U = model.fit_transform(A)
        rec["seconds"] = time.perf_counter() - t0
        mem.__exit__()
        rec["relative_error"] = _rel(A, U, model.components_)
        rec["passes"] = int(model.n_iter_)
    elif name == "sklearn-pca":
        from sklearn.decomposition import PCA

        model = PCA(n_components=k, svd_solver="randomized", random_state=0)
        U = model.fit_transform(A)
        rec["seconds"] = time.perf_counter() - t0
        mem.__exit__()
        Ac = A - model.mean_
        rec["relative_error"] = _rel(Ac, U, model.components_) * float(np.linalg.norm(Ac) / np.linalg.norm(A))
    elif name == "torch-pca-lowrank":
        At = torch.from_numpy(A)
        Uu, S, V = torch.pca_lowrank(At, q=k, center=True, niter=2)
        rec["seconds"] = time.perf_counter() - t0
        mem.__exit__()
        mean = At.mean(0, keepdim=True)
        Ac = (At - mean).numpy()
        rec["relative_error"] = _rel(Ac, (Uu * S).numpy(), V.T.numpy()) * float(np.linalg.norm(Ac) / np.linalg.norm(A))
    elif name.startswith("overcomplete"):
        NMF = overcomplete_module("optimization.nmf").NMF
        SemiNMF = overcomplete_module("optimization.semi_nmf").SemiNMF
        At = torch.from_numpy(A)
        if name == "overcomplete-nmf":
            model = NMF(nb_concepts=k, solver="hals", tol=1e-6)
        else:
            model = SemiNMF(nb_concepts=k, tol=1e-6)
        Z, D = model.fit(At, max_iter=args.sk_iters)
        rec["seconds"] = time.perf_counter() - t0
        mem.__exit__()
        rec["relative_error"] = _rel(A, Z.numpy(), D.numpy())
    else:
        raise SystemExit(f"unknown method {name}")
    rec.update(peak_mb=mem.peak, base_mb=mem.base, extra_mb=mem.peak - mem.base)
    return rec


def _subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--run-one", name, "--rows", str(args.rows), "--channels", str(args.channels),
           "--k", str(args.k), "--iters", str(args.iters), "--sk-iters", str(args.sk_iters), "--tol", str(args.tol),
           "--seed", str(args.seed), "--device", args.device]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        return {"method": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1],
                "wall": time.perf_counter() - t0}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--iters", type=int, default=60, help="max passes for our alternating methods")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--sk-iters", type=int, default=200, help="max_iter of scikit-learn and overcomplete")
    ap.add_argument("--slack", type=float, default=0.01, help="target = sklearn-cd error x (1 + slack)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="20,000 x 512 smoke run")
    ap.add_argument("--methods", default=",".join(OURS + THEIRS))
    ap.add_argument("--stream-rows", default="", help="comma list of rows for memory vs rows (default: 4 sizes; none: skip)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--device", default="cpu", help="where our methods run (the others always run on the CPU)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick and args.run_one is None:
        args.rows, args.channels, args.sk_iters = 20_000, 512, 100
    if args.run_one:
        print(json.dumps(run_one(args.run_one, args)))
        return
    results = []
    for name in args.methods.split(","):
        rec = _subprocess(name, args)
        results.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "curve"}), file=sys.stderr, flush=True)
    ref = next((r for r in results if r["method"] == "sklearn-nmf-cd" and "error" not in r), None)
    summary: dict[str, Any] = {}
    if ref is not None:
        target = ref["relative_error"] * (1 + args.slack)
        summary["target_relative_error"] = target
        for r in results:
            if "curve" in r:
                hit = next((t for t, e in r["curve"] if e <= target), None)
                r["seconds_to_target"] = hit
            elif "relative_error" in r:
                r["seconds_to_target"] = r["seconds"] if r["relative_error"] <= target else None
            if r.get("seconds_to_target"):
                r["speedup_vs_sklearn_cd"] = ref["seconds"] / r["seconds_to_target"]
    if args.stream_rows == "none":
        stream_rows = []
    else:
        stream_rows = ([int(x) for x in args.stream_rows.split(",")] if args.stream_rows
                       else [args.rows // 4, args.rows // 2, args.rows, args.rows * 2])
    streaming = []
    for rows in stream_rows:
        rec = _subprocess(f"stream-{rows}", args)
        streaming.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    import torch

    doc = {
        "benchmark": "factorize",
        "host": platform.node(),
        "machine": {"cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "matrix": {"rows": args.rows, "channels": args.channels, "k": args.k, "seed": args.seed,
                   "kind": "non-negative, 50 planted sparse concepts + 0.1 uniform noise"},
        "settings": {"iters": args.iters, "tol": args.tol, "sk_iters": args.sk_iters, "slack": args.slack,
                     "device": args.device},
        "summary": summary,
        "methods": results,
        "streaming_memory_vs_rows": streaming,
    }
    out = write_result(doc, args.out or RESULTS / f"factorize-{platform.node()}.json")
    print(str(out))


if __name__ == "__main__":
    main()
