#!/usr/bin/env bash
# wav2vec 2.0 pretraining (contrastive, Gumbel quantizer) on raw waveforms on any Lhotse manifest directory (no labels needed).
#   stage 1: pretrain -> $exp/final  (resumes automatically when $exp has checkpoints)
# Example: recipes/ssl/wav2vec2.sh --data data/librispeech --train-split train_960 --exp exp/wav2vec2 --ngpu 8
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=1
data=                       # directory with cuts_<split>.jsonl.gz
train_split=train
valid_split=""
exp=exp/wav2vec2
ngpu=1
nnodes=1
launcher=""
ref_gpus=64                 # the reference global batch in GPUs x 87.5 s
grad_accum=""               # default: ceil(ref_gpus / (ngpu * nnodes))
config=$root/conf/pretrain/wav2vec2_base.yaml
pretrain_opts=""            # extra options, e.g. "--set trainer.max_steps=1000" (no spaces in values)
seed=0

. "$(dirname "$0")/../lib/stages.sh"
. "$(dirname "$0")/_launch.sh"
[ -n "$data" ] || { echo "$0: --data DIR is required" >&2; exit 1; }
[ -n "$grad_accum" ] || grad_accum=$(accum_for "$ref_gpus" $((ngpu * nnodes)))

if stage_in 1; then
  log "Stage 1: wav2vec2 pretraining ($config, $ngpu GPU(s) x $nnodes node(s), grad_accum $grad_accum) -> $exp/final"
  extra=()
  [ -z "$valid_split" ] || extra+=(--set "data.valid=[$data/cuts_${valid_split}.jsonl.gz]")
  ls -d "$exp"/checkpoints/step-* >/dev/null 2>&1 && extra+=(--resume)
  # shellcheck disable=SC2086
  launch pretrain --config "$config" --out "$exp" --set "data.train=[$data/cuts_${train_split}.jsonl.gz]" \
    --set "trainer.grad_accum=$grad_accum" --set "trainer.seed=$seed" "${extra[@]}" $pretrain_opts
fi
