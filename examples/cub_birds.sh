#!/usr/bin/env bash
# c2mf, craft and pca on the CUB birds in ../shared/data with the bird MobileNetV2, side by side.
#   LAYER=head_conv (1280x7x7, ReLU6, non-negative) or LAYER=blocks.16 (320x7x7, signed).
#   TRAIN/TEST/CROPS: images per class for the whole-image train and test stores and the crop store.
set -euo pipefail
DATA=${DATA:-../shared/data}
LAYER=${LAYER:-head_conv}
K=${K:-10}
TRAIN=${TRAIN:-24}
CROPS=${CROPS:-4}
OUT=${OUT:-runs/cub-$LAYER}
SHIFT=${SHIFT:-}   # set SHIFT=--shift for a signed layer: craft then fits A - min(A), as the paper analyses
MODEL=(-m "$DATA/models.py:mobilenet_v2_inat_birds" -c "$DATA/cub/mobilenet_v2_inat_birds.pt" -l "$LAYER"
       -d "$DATA/cub/images" --class-index "$DATA/cub/class_index.json")

c2mf extract "${MODEL[@]}" --split train --max-images-per-class "$TRAIN" -o "$OUT/train.zarr"
c2mf extract "${MODEL[@]}" --split test -o "$OUT/test.zarr"
c2mf extract "${MODEL[@]}" --split train --max-images-per-class "$CROPS" --mode crops -o "$OUT/crops.zarr"

dicts=()
for k in $K; do
    c2mf factorize -s "$OUT/train.zarr" --method c2mf --concepts "$k" -o "$OUT/c2mf-k$k.safetensors"
    c2mf factorize -s "$OUT/crops.zarr" --method craft --concepts "$k" $SHIFT -o "$OUT/craft-k$k.safetensors"
    c2mf factorize -s "$OUT/train.zarr" --method pca --concepts "$k" -o "$OUT/pca-k$k.safetensors"
    dicts+=(--dict "$OUT/c2mf-k$k.safetensors" --dict "$OUT/craft-k$k.safetensors" --dict "$OUT/pca-k$k.safetensors")
done
c2mf evaluate --train "$OUT/train.zarr" --test "$OUT/test.zarr" --crops "$OUT/crops.zarr" "${dicts[@]}" \
    -m "${MODEL[1]}" --out "$OUT/evaluation"
