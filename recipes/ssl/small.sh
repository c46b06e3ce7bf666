#!/usr/bin/env bash
# Small-data HuBERT pretraining that learns in minutes on a CPU, on any Lhotse manifest directory.
#   stage 1: k-means (K=km_k) on per-utterance normalised MFCC of a fraction of the training cuts
#   stage 2: MFCC units on every training cut                    -> $exp/data/cuts_<split>_mfcc.jsonl.gz
#   stage 3: pretrain (conf/pretrain/small_hubert.yaml)            -> $exp/final
# The budget is either --minutes (wall-clock minutes of pretraining on this machine: the steps that fit are
# measured before training starts and recorded in $exp/config.yaml) or --steps (the same run on any machine).
# Example: recipes/ssl/small.sh --data data/mini --train-split pretrain --exp exp/small --minutes 20
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=3
data=                       # directory with cuts_<split>.jsonl.gz
train_split=train
exp=exp/small
minutes=20                  # pretraining budget in wall-clock minutes on this machine (ignored with --steps)
steps=""                    # a fixed number of updates instead of --minutes
config=$root/conf/pretrain/small_hubert.yaml
km_k=100
km_fraction=1.0             # share of training cuts the k-means is fitted on
pretrain_opts=""            # extra options, e.g. "--set model.overrides.num_layers=6" (no spaces in values)
seed=0

. "$(dirname "$0")/../lib/launch.sh"   # the launch options (one process by default) and run_training
. "$(dirname "$0")/../lib/stages.sh"
. "$(dirname "$0")/../lib/units.sh"
require data
[ -f "$data/cuts_${train_split}.jsonl.gz" ] || { echo "$0: no $data/cuts_${train_split}.jsonl.gz" >&2; exit 1; }
mkdir -p "$exp/data"
units=$exp/data/cuts_${train_split}_mfcc.jsonl.gz

if stage_in 1; then
  log "Stage 1: k-means K=$km_k on normalised MFCC of ${km_fraction} of $data/cuts_${train_split}.jsonl.gz"
  fit_units "$exp/km_mfcc" "$data/cuts_${train_split}.jsonl.gz" --feature mfcc_cmvn --n-clusters "$km_k" \
    --fraction "$km_fraction" --seed "$seed"
fi

if stage_in 2; then
  log "Stage 2: MFCC units on every training cut -> $units"
  speechssl label --cuts "$data/cuts_${train_split}.jsonl.gz" --kmeans "$exp/km_mfcc" --out "$units" --name mfcc
fi

if stage_in 3; then
  budget=(--minutes "$minutes")
  [ -z "$steps" ] || budget=(--set "trainer.max_steps=$steps")
  log "Stage 3: pretraining ($config, ${steps:-$minutes min}) -> $exp/final"
  # shellcheck disable=SC2086
  run_training pretrain "$exp" --config "$config" --set "data.train=[$units]" \
    --set "objective.kwargs.num_classes={\"mfcc\":$km_k}" --set "trainer.seed=$seed" "${budget[@]}" $pretrain_opts
fi
