#!/usr/bin/env bash
# Every GPU number the docs need, in one run sized for under 8 minutes on one GPU (no GPU has run it yet, so that is
# the aim, not a measurement):
#   1. extract throughput against the bare forward pass, fp32 and bf16 autocast (benchmarks/extract.py);
#   2. factorize c2mf, nmf and pca at 200,000 x 2,048, k = 25 on the GPU against scikit-learn's NMF (cd) and
#      PCA on this machine's CPU (benchmarks/factorize.py);
#   3. factorize's data pass on 1 GPU, and on 2 with NCCL when the machine has two (benchmarks/distributed.py);
#   4. reading a store's rows on this machine's CPUs (benchmarks/store_read.py): what a pass waits for on a GPU;
#   5. evaluate against its bare head on the GPU, with blocks of 64 images and of one class (benchmarks/evaluate.py).
# Writes benchmarks/results/gpu-<host>/*.json and a summary of them all, summary.json, in that folder.
#
#   bash benchmarks/gpu.sh              # on a machine with a GPU
#   bash benchmarks/gpu.sh --dry-run    # the same steps on the CPU at toy sizes, extract in fp32 only (minutes):
#                                       # checks the script and the benchmarks run, measures nothing worth keeping
# PYTHON (default python) runs the benchmarks; C2MF_SHARED_DATA points at the real data (CIFAR-10 and CUB)
# when it is not ../shared/data; without it step 1 is skipped and says so.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
HOST=$(hostname)
OUT=benchmarks/results/gpu-$HOST
[ $DRY = 1 ] && OUT=${TMPDIR:-/tmp}/c2mf-gpu-dry-run-$HOST
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SECONDS=0

if [ $DRY = 1 ]; then
    DEV=cpu
    AMPS=none  # bf16 autocast on a CPU without bf16 units is emulated: minutes for nothing
    EXTRACT_ARGS=(--per-class 2 --cub-per-class 1 --repeats 1 --batch-size 8 --workers 0 --cost-repeats 1)
    FACT_ARGS=(--rows 4000 --channels 128 --k 5 --iters 5 --sk-iters 20 --stream-rows none)
    DIST_ARGS=(--quick --procs 1,2 --threads 1)
    READ_ARGS=(--images-per-class 4 --repeats 1)
    EVAL_ARGS=(--classes 3 --images 1 --ig-steps 4 --repeat 1)
else
    DEV=cuda
    AMPS="none bf16"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: use --dry-run')"
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    EXTRACT_ARGS=(--per-class 100 --copies 8 --cub-per-class 16 --repeats 2 --batch-size 128 --workers 8 --cost-repeats 3)
    FACT_ARGS=(--rows 200000 --channels 2048 --k 25 --iters 60 --sk-iters 200 --stream-rows none --timeout 300)
    PROCS=1; [ "$NGPU" -ge 2 ] && PROCS=1,2
    DIST_ARGS=(--procs $PROCS --rows 500000 --channels 2048 --k 25 --block 65536 --passes 4)
    READ_ARGS=(--images-per-class 100 --repeats 3)
    EVAL_ARGS=(--classes 12 --images 6 --repeat 2)
fi

step() { echo "== [${SECONDS}s] $*" >&2; }

SHARED=${C2MF_SHARED_DATA:-$(cd .. && pwd)/shared/data}
if [ -d "$SHARED" ]; then
    for amp in $AMPS; do
        step "extract vs bare forward, autocast $amp"
        C2MF_SHARED_DATA=$SHARED "$PY" benchmarks/extract.py --device $DEV --autocast $amp "${EXTRACT_ARGS[@]}" \
            --out "$OUT"
    done
else
    step "extract skipped: no real data at $SHARED (set C2MF_SHARED_DATA)"
fi

step "factorize c2mf, nmf, pca on $DEV vs scikit-learn on the CPU"
"$PY" benchmarks/factorize.py --device $DEV "${FACT_ARGS[@]}" \
    --methods c2mf-c2mf,c2mf-nmf,c2mf-pca,sklearn-nmf-cd,sklearn-pca --out "$OUT/factorize.json"

step "distributed factorize pass on $DEV"
"$PY" benchmarks/distributed.py --device $DEV "${DIST_ARGS[@]}" --out "$OUT/distributed.json"

if [ -d "$SHARED" ]; then
    step "store read rate on this machine's CPUs"
    C2MF_SHARED_DATA=$SHARED "$PY" benchmarks/store_read.py "${READ_ARGS[@]}" --out "$OUT"
fi

if [ -d "$SHARED" ]; then
    for b in 64 1; do
        step "evaluate on $DEV, blocks of $b"
        "$PY" benchmarks/evaluate.py --device $DEV --block-images $b "${EVAL_ARGS[@]}" --label "blocks$b" --out "$OUT"
    done
fi

step "summary"
"$PY" - "$OUT" "$SECONDS" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

out, seconds, dry = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
parts = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "summary.json"}
summary = {"dry_run": dry, "wall_seconds": seconds, "extract": [], "factorize": [], "distributed": [], "store_read": []}
for name, doc in parts.items():
    if name.startswith("extract"):
        for case in doc["cases"]:
            summary["extract"].append({"case": case["case"], "autocast": doc["autocast"],
                                       "images_per_s": case["extract_images_per_s"],
                                       "bare_images_per_s": case["bare_images_per_s"], "ratio": case["ratio"],
                                       "ratio_steady": case["ratio_steady"]})
    elif name == "factorize":
        for m in doc["methods"]:
            summary["factorize"].append({k: m.get(k) for k in ("method", "seconds", "relative_error", "passes",
                                         "seconds_to_target", "speedup_vs_sklearn_cd", "peak_gpu_mb", "error")})
    elif name.startswith("store_read"):
        summary["store_read"] = [{k: c[k] for k in ("way", "read_ahead", "mb_per_wall_s", "speedup_vs_numpy")}
                                 for c in doc["cases"]] + [{"cpus": doc["cpus"]}]
    elif name.startswith("evaluate"):
        summary.setdefault("evaluate", []).append({k: doc.get(k) for k in (
            "block_images", "evaluate_s", "tail_calls", "bare_head_s", "ratio_evaluate_to_bare_head")})
    elif name == "distributed":
        for r in doc["runs"]:
            summary["distributed"].append({k: r.get(k) for k in ("processes", "rows_per_s", "rows_per_s_per_process",
                                                                 "steady_pass_seconds", "skipped")})
path = out / "summary.json"
path.write_text(json.dumps({"parts": sorted(parts), **summary}, indent=2) + "\n")
print(path)
EOF
