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
ngpu=1
nnodes=1
launcher=""
config=$root/conf/distill/distilhubert.yaml
distill_opts=""             # extra options, e.g. "--set student.num_layers=4" (no spaces in values)
profile_threads=2
seed=0

. "$(dirname "$0")/../lib/stages.sh"
. "$root/recipes/ssl/_launch.sh"
[ -n "$data" ] || { echo "$0: --data DIR is required" >&2; exit 1; }
[ -n "$teacher" ] || { echo "$0: --teacher MODEL is required" >&2; exit 1; }

if stage_in 1; then
  log "Stage 1: DistilHuBERT distillation of $teacher ($config) -> $exp/final"
  extra=()
  ls -d "$exp"/checkpoints/step-* >/dev/null 2>&1 && extra+=(--resume)
  # shellcheck disable=SC2086
  launch distill --config "$config" --out "$exp" --set "teacher=$teacher" \
    --set "data.train=[$data/cuts_${train_split}.jsonl.gz]" --set "trainer.seed=$seed" "${extra[@]}" $distill_opts
fi

if stage_in 2; then
  log "Stage 2: profile teacher vs student -> $exp/profile"
  speechssl profile "$teacher" "$exp/final" --names teacher distilhubert --threads "$profile_threads" \
    --out "$exp/profile"
fi
