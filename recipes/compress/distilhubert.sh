#!/usr/bin/env bash
# DistilHuBERT distillation of any pretrained teacher on any Lhotse manifest directory, then a profile.
#   stage 1: distil -> $exp/final  (resumes automatically when $exp has checkpoints)
#   stage 2: profile teacher vs student (params, MACs for 10 s, CPU real-time factor) -> $exp/profile
# Example: recipes/compress/distilhubert.sh --data data/librispeech --train-split train_960 \
#            --teacher exp/hubert_iter2/final --exp exp/distilhubert --ngpu 1
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=2
data=                       # directory with cuts_<split>.jsonl.gz
train_split=train
teacher=                    # model dir (ours or HF), fairseq .pt
exp=exp/distilhubert
config=$root/conf/distill/distilhubert.yaml
distill_opts=""             # extra options, e.g. "--set student.num_layers=4" (no spaces in values)
profile_threads=2
seed=0

. "$(dirname "$0")/../lib/launch.sh"   # the launch options (--ngpu, --nnodes ...) and run_training
. "$(dirname "$0")/../lib/stages.sh"
require data teacher

if stage_in 1; then
  log "Stage 1: distillation of $teacher ($config) -> $exp/final"
  # shellcheck disable=SC2086
  run_training distill "$exp" --config "$config" --set "teacher=$teacher" \
    --set "data.train=[$data/cuts_${train_split}.jsonl.gz]" --set "trainer.seed=$seed" $distill_opts
fi

if stage_in 2; then
  log "Stage 2: profile teacher vs student -> $exp/profile"
  speechssl profile "$teacher" "$exp/final" --names teacher "$(basename "$exp")" --threads "$profile_threads" \
    --out "$exp/profile"
fi
