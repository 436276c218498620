#!/usr/bin/env bash
# Extract ImageNet activations with a SLURM job array: each task computes its own chunks of one shared store,
# and the task that finishes last finalizes it. Resubmitting the same array resumes whatever was not finished.
#
#   sbatch examples/slurm_extract.sh
#
#SBATCH --job-name=c2mf-extract
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail

# --shard is read from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; pass --shard i/n to override.
c2mf extract \
    --model nf_resnet50.ra2_in1k --checkpoint "$HOME/weights/nf_resnet50.ra2_in1k.safetensors" \
    --layer stages.3 \
    --data /datasets/imagenet/train --class-index "$HOME/imagenet_class_index.json" \
    --max-images-per-class 100 \
    --out "$SCRATCH/imagenet-nf50-stages3.zarr" \
    --device cuda --batch-size 128 --workers "$SLURM_CPUS_PER_TASK" --autocast bf16 --quiet

# After the array: c2mf info "$SCRATCH/imagenet-nf50-stages3.zarr"
