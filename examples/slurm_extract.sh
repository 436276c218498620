#!/usr/bin/env bash
# Extract activations with a SLURM job array: each task computes its own chunks of one shared store, and the task
# that finishes last finalizes it. Resubmitting the same array resumes whatever was not finished.
#
#   sbatch examples/slurm_extract.sh                      # or set the variables below: sbatch --export=ALL,...
#
# The log (logs/c2mf-extract-JOB_TASK.out) gets plain progress lines every 30 s (C2MF_PROGRESS_INTERVAL), since
# stderr is a file there, not a terminal.
#
#SBATCH --job-name=c2mf-extract
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

VENV=${VENV:-$HOME/venvs/c2mf}                 # the environment c2mf is installed in (pip install -e .)
MODEL=${MODEL:-nf_resnet50.ra2_in1k}
CHECKPOINT=${CHECKPOINT:-$HOME/weights/nf_resnet50.ra2_in1k.safetensors}
LAYER=${LAYER:-stages.3}
DATA=${DATA:-/datasets/imagenet/train}
CLASS_INDEX=${CLASS_INDEX:-$HOME/imagenet_class_index.json}
SPLIT=${SPLIT:-train}
OUT=${OUT:-$SCRATCH/imagenet-nf50-stages3-$SPLIT.zarr}

# shellcheck disable=SC1091
source "$VENV/bin/activate"
# DataLoader workers: what SLURM gave this task, less one core for the main process
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-2} > 1 ? ${SLURM_CPUS_PER_TASK:-2} - 1 : 0 ))
echo "task ${SLURM_ARRAY_TASK_ID:-0} of ${SLURM_ARRAY_TASK_COUNT:-1} on $(hostname): $MODEL $LAYER -> $OUT ($WORKERS workers)"

# --shard is read from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; pass --shard i/n to override.
c2mf extract \
    --model "$MODEL" --checkpoint "$CHECKPOINT" --layer "$LAYER" \
    --data "$DATA" --class-index "$CLASS_INDEX" --split "$SPLIT" \
    --max-images-per-class 100 \
    --out "$OUT" \
    --device cuda --batch-size 128 --workers "$WORKERS" --autocast bf16

# After the array: c2mf info "$OUT"
