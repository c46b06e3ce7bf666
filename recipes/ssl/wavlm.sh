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
ngpu=1
nnodes=1                    # machines; with > 1 run the recipe on each with its --machine-rank
machine_rank=0
main_ip=""                  # address of machine rank 0 (required when nnodes > 1)
main_port=29500
launcher=""                 # a launcher prefix instead (see _launch.sh)
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

. "$(dirname "$0")/../lib/stages.sh"
. "$(dirname "$0")/_launch.sh"
[ -n "$data" ] || { echo "$0: --data DIR is required" >&2; exit 1; }
[ -n "$grad_accum" ] || grad_accum=$(accum_for "$ref_gpus" $((ngpu * nnodes)))
[ -n "$units" ] || units=hubert_l${km_layer}
splits="$train_split ${valid_split}"

if stage_in 1; then
  [ -n "$km_model" ] || { echo "$0: stage 1 needs --km-model MODEL_DIR (or start at --stage 3)" >&2; exit 1; }
  log "Stage 1: k-means K=$km_k on layer $km_layer of $km_model"
  # shellcheck disable=SC2086
  km_done "$exp/km_${units}" || speechssl kmeans --cuts "$data/cuts_${train_split}.jsonl.gz" --out "$exp/km_${units}" \
    --feature "$km_model" --layer "$km_layer" --n-clusters "$km_k" --fraction "$km_fraction" --seed "$seed" $km_opts
fi

if stage_in 2; then
  log "Stage 2: label the cuts with $units"
  for s in $splits; do
    speechssl label --cuts "$data/cuts_${s}.jsonl.gz" --kmeans "$exp/km_${units}" \
      --out "$data/cuts_${s}_${units}.jsonl.gz" --name "$units"
  done
fi

if stage_in 3; then
  log "Stage 3: WavLM pretraining ($config, $ngpu GPU(s) x $nnodes node(s), grad_accum $grad_accum) -> $exp/final"
  extra=()
  [ -z "$valid_split" ] || extra+=(--set "data.valid=[$data/cuts_${valid_split}_${units}.jsonl.gz]")
  ls -d "$exp"/checkpoints/step-* >/dev/null 2>&1 && extra+=(--resume)
  # shellcheck disable=SC2086
  launch pretrain --config "$config" --out "$exp" --set "data.train=[$data/cuts_${train_split}_${units}.jsonl.gz]" \
    --set "data.units=[$units]" --set "objective.kwargs.num_classes={\"$units\":$km_k}" \
    --set "trainer.grad_accum=$grad_accum" --set "trainer.seed=$seed" "${extra[@]}" $pretrain_opts
fi
