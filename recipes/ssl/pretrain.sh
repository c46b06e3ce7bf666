#!/usr/bin/env bash
# Label-free pretraining (wav2vec 2.0, BEST-RQ, or any objective whose targets need no k-means units) on any
# Lhotse manifest directory. wav2vec2.sh and bestrq.sh call this with their reference defaults.
#   stage 1: pretrain -> $exp/final  (resumes automatically when $exp has checkpoints)
# Example: recipes/ssl/pretrain.sh --config conf/pretrain/bestrq.yaml --data data/librispeech --train-split train_960 --exp exp/bestrq --ngpu 8
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=1
data=                       # directory with cuts_<split>.jsonl.gz
train_split=train
valid_split=""
exp=exp/pretrain
ref_gpus=32                 # the reference global batch in GPUs x 87.5 s
grad_accum=""               # default: ceil(ref_gpus / (ngpu * nnodes))
config=                     # conf/pretrain/NAME.yaml (required)
pretrain_opts=""            # extra options, e.g. "--set trainer.max_steps=1000" (no spaces in values)
seed=0

. "$(dirname "$0")/../lib/launch.sh"   # the launch options (--ngpu, --nnodes ...) and run_training
. "$(dirname "$0")/../lib/stages.sh"
require data config
[ -n "$grad_accum" ] || grad_accum=$(accum_for "$ref_gpus" $((ngpu * nnodes)))

if stage_in 1; then
  log "Stage 1: pretraining ($config, $ngpu GPU(s) x $nnodes node(s), grad_accum $grad_accum) -> $exp/final"
  extra=()
  [ -z "$valid_split" ] || extra+=(--set "data.valid=[$data/cuts_${valid_split}.jsonl.gz]")
  # shellcheck disable=SC2086
  run_training pretrain "$exp" --config "$config" --set "data.train=[$data/cuts_${train_split}.jsonl.gz]" \
    --set "trainer.grad_accum=$grad_accum" --set "trainer.seed=$seed" "${extra[@]}" $pretrain_opts
fi
