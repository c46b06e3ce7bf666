#!/usr/bin/env bash
# WavLM pretraining (masked unit prediction + gated relative position bias + utterance mixing) on any Lhotse
# manifest directory. Targets: k-means units of a layer of a teacher model (the reference: layer 9 of HuBERT
# Base iteration 2, K=500), e.g. the output of recipes/ssl/hubert.sh.
#   stage 1: k-means K=km_k on layer km_layer of km_model (skip when the labelled manifests exist already)
#   stage 2: label the cuts                   -> $data/cuts_<split>_<units>.jsonl.gz
#   stage 3: pretrain                         -> $exp/final
# Example: recipes/ssl/wavlm.sh --data data/librispeech --train-split train_960 --km-model exp/hubert/iter2/final
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=3
data=
train_split=train
valid_split=""
exp=exp/wavlm
ref_gpus=32
grad_accum=""
config=$root/conf/pretrain/wavlm_base.yaml
km_model=""                 # teacher model directory for the units (stage 1)
km_layer=9
km_k=500
km_fraction=0.1
km_opts=""
units=""                    # label set name; default hubert_l<km_layer>
pretrain_opts=""
seed=0

. "$(dirname "$0")/../lib/launch.sh"   # the launch options (--ngpu, --nnodes ...) and run_training
. "$(dirname "$0")/../lib/stages.sh"
. "$(dirname "$0")/../lib/units.sh"
require data
[ -n "$grad_accum" ] || grad_accum=$(accum_for "$ref_gpus" $((ngpu * nnodes)))
[ -n "$units" ] || units=hubert_l${km_layer}
splits="$train_split ${valid_split}"

if stage_in 1; then
  [ -n "$km_model" ] || { echo "$0: stage 1 needs --km-model MODEL_DIR (or start at --stage 3)" >&2; exit 1; }
  log "Stage 1: k-means K=$km_k on layer $km_layer of $km_model"
  # shellcheck disable=SC2086
  fit_units "$exp/km_${units}" "$data/cuts_${train_split}.jsonl.gz" --feature "$km_model" --layer "$km_layer" \
    --n-clusters "$km_k" --fraction "$km_fraction" --seed "$seed" $km_opts
fi

if stage_in 2; then
  log "Stage 2: label the cuts with $units"
  # shellcheck disable=SC2086
  label_splits "$data" "$exp/km_${units}" "$units" $splits
fi

if stage_in 3; then
  log "Stage 3: WavLM pretraining ($config, $ngpu GPU(s) x $nnodes node(s), grad_accum $grad_accum) -> $exp/final"
  extra=()
  [ -z "$valid_split" ] || extra+=(--set "data.valid=[$data/cuts_${valid_split}_${units}.jsonl.gz]")
  # shellcheck disable=SC2086
  run_training pretrain "$exp" --config "$config" --set "data.train=[$data/cuts_${train_split}_${units}.jsonl.gz]" \
    --set "data.units=[$units]" --set "objective.kwargs.num_classes={\"$units\":$km_k}" \
    --set "trainer.grad_accum=$grad_accum" --set "trainer.seed=$seed" "${extra[@]}" $pretrain_opts
fi
