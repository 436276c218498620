#!/usr/bin/env bash
# The whole chain on the CIFAR-10 images and ResNet-20 in ../shared/data (a few minutes on a laptop CPU).
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/cifar10}
MODEL=(-m "$DATA/models.py:cifar_resnet20" -c "$DATA/cifar10/resnet20-12fca82f.th" -l layer3 -d "$DATA/cifar10/images")

c2mf extract "${MODEL[@]}" --split train -o "$OUT/train.zarr"
c2mf extract "${MODEL[@]}" --split test -o "$OUT/test.zarr"
c2mf extract "${MODEL[@]}" --split train --mode crops -o "$OUT/crops.zarr"

c2mf factorize -s "$OUT/train.zarr" --method c2mf --concepts 10 -o "$OUT/c2mf.safetensors"
c2mf factorize -s "$OUT/crops.zarr" --method craft --concepts 10 -o "$OUT/craft.safetensors"
c2mf factorize -s "$OUT/train.zarr" --method pca --concepts 10 -o "$OUT/pca.safetensors"

c2mf evaluate --train "$OUT/train.zarr" --test "$OUT/test.zarr" --crops "$OUT/crops.zarr" \
    --dict "$OUT/c2mf.safetensors" --dict "$OUT/craft.safetensors" --dict "$OUT/pca.safetensors" \
    -m "${MODEL[1]}" --out "$OUT/evaluation"
c2mf atlas -s "$OUT/train.zarr" --dict "$OUT/c2mf.safetensors" --out "$OUT/atlas"
c2mf explain "$DATA"/cifar10/images/cat/000{0,1,2}.jpg --dict "$OUT/c2mf.safetensors" -m "${MODEL[1]}" \
    --out "$OUT/explained"
c2mf report "$OUT"
