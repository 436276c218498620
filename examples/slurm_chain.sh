#!/usr/bin/env bash
# The whole chain on a SLURM cluster, submitted from the login node in one go:
#   1. two extract job arrays (train and test stores; each array task computes its shard of the store),
#   2. one factorize job per method, started only when the train extraction succeeded (--dependency=afterok),
#   3. one evaluate job, started when every fit and the test extraction succeeded: torchrun starts one process
#      per GPU of the node, each takes an equal share of the images, and rank 0 writes the results (docs/scale.md).
#
#   VENV=~/venvs/c2mf DATA=/datasets/cub OUT=$SCRATCH/cub bash examples/slurm_chain.sh
#
# Logs: logs/<job name>-<job id>[_<task>].out, with plain progress lines every 30 s.
set -euo pipefail

VENV=${VENV:-$HOME/venvs/c2mf}
MODEL=${MODEL:-../shared/data/models.py:mobilenet_v2_inat_birds}
CHECKPOINT=${CHECKPOINT:-../shared/data/cub/mobilenet_v2_inat_birds.pt}
LAYER=${LAYER:-blocks.16}
DATA=${DATA:-../shared/data/cub/images}
CLASS_INDEX=${CLASS_INDEX:-../shared/data/cub/class_index.json}
OUT=${OUT:-$PWD/c2mf-run}
K=${K:-10}
TASKS=${TASKS:-4}                 # array tasks per extraction
CPUS=${CPUS:-8}
EVAL_GPUS=${EVAL_GPUS:-4}         # evaluate's processes (one GPU each, one node)

mkdir -p logs "$OUT"
activate="source '$VENV/bin/activate'"
common=(--parsable --cpus-per-task="$CPUS")

extract() {  # $1: split; prints the job id
    sbatch "${common[@]}" --job-name="c2mf-extract-$1" --array="0-$((TASKS - 1))" --gres=gpu:1 --time=04:00:00 \
        --output='logs/%x-%A_%a.out' \
        --wrap "$activate && c2mf extract -m '$MODEL' -c '$CHECKPOINT' -l '$LAYER' -d '$DATA' \
--class-index '$CLASS_INDEX' --split $1 -o '$OUT/$1.zarr' --device cuda --workers $((CPUS - 1))"
}

train=$(extract train)
test=$(extract test)
echo "extract: train job $train, test job $test"

dicts=()
fits=()
for method in c2mf pca; do
    job=$(sbatch "${common[@]}" --job-name="c2mf-factorize-$method" --dependency="afterok:$train" --gres=gpu:1 \
        --output='logs/%x-%j.out' --time=02:00:00 --wrap "$activate && c2mf factorize -s '$OUT/train.zarr' --method $method -k $K \
--device cuda -o '$OUT/$method-k$K.safetensors'")
    fits+=("$job")
    dicts+=(--dict "'$OUT/$method-k$K.safetensors'")
    echo "factorize $method: job $job (after $train)"
done

after=$(IFS=:; echo "${fits[*]}:$test")
evaluate=$(sbatch "${common[@]}" --job-name=c2mf-evaluate --dependency="afterok:$after" --gres=gpu:"$EVAL_GPUS" \
    --output='logs/%x-%j.out' --time=01:00:00 --wrap "$activate && torchrun --standalone --nproc-per-node $EVAL_GPUS \
-m c2mf_cli.cli evaluate --train '$OUT/train.zarr' --test '$OUT/test.zarr' ${dicts[*]} -m '$MODEL' --device cuda \
-o '$OUT/evaluate'")
echo "evaluate: job $evaluate (after $after); results in $OUT/evaluate"
