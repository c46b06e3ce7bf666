#!/usr/bin/env bash
# BEST-RQ-style pretraining (fbank input, frozen random-projection quantizer targets) on any Lhotse manifest directory (no labels needed).
# The reference setting: 32 GPUs x 87.5 s per step. Options as recipes/ssl/pretrain.sh; later ones win.
# Example: recipes/ssl/bestrq.sh --data data/librispeech --train-split train_960 --exp exp/bestrq --ngpu 8
root=$(cd "$(dirname "$0")/../.." && pwd)
exec bash "$root/recipes/ssl/pretrain.sh" --exp exp/bestrq --ref-gpus 32 \
  --config "$root/conf/pretrain/bestrq.yaml" "$@"
