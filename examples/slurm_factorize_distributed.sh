#!/usr/bin/env bash
# ImageNet end to end on SLURM: extract (a job array) -> factorize (torchrun over the GPUs of 2 nodes) ->
# evaluate (the same), chained with job dependencies. Submit the chain from a login node:
#
#   bash examples/slurm_factorize_distributed.sh
#
# Every path must be on a file system all nodes see (the store, the dictionary and its checkpoint).
# Resubmitting resumes: extract skips finished chunks, factorize continues from its checkpoint.
set -euo pipefail

STORE=${STORE:-$SCRATCH/imagenet-nf50-stages3.zarr}   # what examples/slurm_extract.sh writes
# the held-out images, extracted the same way beforehand (slurm_extract.sh with the val folder and this --out)
TEST_STORE=${TEST_STORE:-$SCRATCH/imagenet-val-nf50-stages3.zarr}
DICT=${DICT:-$SCRATCH/imagenet-c2mf-k25.safetensors}
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}

# 1. extract: each array task computes its own chunks of one store; the last one to finish finalizes it
extract=$(sbatch --parsable examples/slurm_extract.sh)

# 2. factorize: one srun task per node starts torchrun, which starts one process per GPU (NCCL); rank 0
#    writes the dictionary. A rank that dies ends the job within --timeout seconds on the others.
factorize=$(sbatch --parsable --dependency=afterok:"$extract" \
    --job-name=c2mf-factorize --nodes="$NODES" --ntasks-per-node=1 --gres=gpu:"$GPUS_PER_NODE" \
    --cpus-per-task=16 --time=04:00:00 --wrap "
set -euo pipefail
export MASTER_ADDR=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1)
export MASTER_PORT=29500
RESUME=; [ -f $DICT.ckpt ] && RESUME=--resume   # an earlier attempt left a checkpoint: continue it
srun torchrun --nnodes=$NODES --nproc-per-node=$GPUS_PER_NODE \
    --rdzv-backend=c10d --rdzv-endpoint=\$MASTER_ADDR:\$MASTER_PORT --rdzv-id=\$SLURM_JOB_ID \
    -m c2mf_cli.cli factorize --store $STORE --method c2mf --concepts 25 --out $DICT \
    --device cuda --checkpoint-every 5 --timeout 900 --quiet \$RESUME
")
# Without torchrun, srun can start the processes itself (one task per GPU):
#   srun --ntasks-per-node=$GPUS_PER_NODE --gpus-per-task=1 c2mf factorize ...   (reads SLURM_PROCID,
#   SLURM_STEP_NUM_TASKS, SLURM_LOCALID and the MASTER_ADDR exported above)

# 3. evaluate on held-out images, once the dictionary exists: one process per GPU again, each takes its share
#    of the classes (balanced by image count); rank 0 writes the results
evaluate=$(sbatch --parsable --dependency=afterok:"$factorize" \
    --job-name=c2mf-evaluate --nodes="$NODES" --ntasks-per-node=1 --gres=gpu:"$GPUS_PER_NODE" \
    --cpus-per-task=16 --time=04:00:00 --wrap "
set -euo pipefail
export MASTER_ADDR=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1)
export MASTER_PORT=29501
srun torchrun --nnodes=$NODES --nproc-per-node=$GPUS_PER_NODE \
    --rdzv-backend=c10d --rdzv-endpoint=\$MASTER_ADDR:\$MASTER_PORT --rdzv-id=\$SLURM_JOB_ID \
    -m c2mf_cli.cli evaluate --train $STORE --test $TEST_STORE --dict $DICT --out $SCRATCH/imagenet-eval \
    --device cuda --timeout 900 --quiet
")

echo "submitted: extract $extract -> factorize $factorize -> evaluate $evaluate"
