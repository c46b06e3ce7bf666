#!/usr/bin/env bash
# wav2vec 2.0 pretraining (contrastive, Gumbel quantizer) on raw waveforms on any Lhotse manifest directory (no labels needed).
# The reference Base setting: 64 GPUs x 87.5 s per step. Options as recipes/ssl/pretrain.sh; later ones win.
# Example: recipes/ssl/wav2vec2.sh --data data/librispeech --train-split train_960 --exp exp/wav2vec2 --ngpu 8
root=$(cd "$(dirname "$0")/../.." && pwd)
exec bash "$root/recipes/ssl/pretrain.sh" --exp exp/wav2vec2 --ref-gpus 64 \
  --config "$root/conf/pretrain/wav2vec2_base.yaml" "$@"
