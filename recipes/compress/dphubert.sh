#!/usr/bin/env bash
# DPHuBERT: joint distillation + structured pruning of any pretrained teacher (wav2vec2, HuBERT, WavLM), then a
# profile.
#   stage 1: prune (stage-1 gates -> materialise -> stage-2 distillation) -> $exp/final (resumes automatically)
#   stage 2: profile teacher vs pruned model (+ kept heads / FFN units per layer PNG) -> $exp/profile
# Example: recipes/compress/dphubert.sh --data data/librispeech --train-split train_960 \
#            --teacher exp/hubert_iter2/final --exp exp/dphubert --target 0.75
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=2
data=                       # directory with cuts_<split>.jsonl.gz
train_split=train
teacher=                    # model dir (ours or HF), fairseq .pt
exp=exp/dphubert
target=0.75                 # sparsity 1 - params / teacher params
ngpu=1
nnodes=1
launcher=""
config=$root/conf/prune/dphubert.yaml
prune_opts=""               # extra options, e.g. "--set prune.warmup_steps=2000" (no spaces in values)
profile_threads=2
seed=0

. "$(dirname "$0")/../lib/stages.sh"
. "$root/recipes/ssl/_launch.sh"
[ -n "$data" ] || { echo "$0: --data DIR is required" >&2; exit 1; }
[ -n "$teacher" ] || { echo "$0: --teacher MODEL is required" >&2; exit 1; }

if stage_in 1; then
  log "Stage 1: DPHuBERT pruning of $teacher to sparsity $target ($config) -> $exp/final"
  extra=()
  if [ -d "$exp/pruned" ] || ls -d "$exp"/stage1/checkpoints/step-* >/dev/null 2>&1; then extra+=(--resume); fi
  # shellcheck disable=SC2086
  launch prune --config "$config" --out "$exp" --set "teacher=$teacher" --set "prune.target=$target" \
    --set "data.train=[$data/cuts_${train_split}.jsonl.gz]" --set "trainer.seed=$seed" "${extra[@]}" $prune_opts
fi

if stage_in 2; then
  log "Stage 2: profile teacher vs pruned model -> $exp/profile"
  speechssl profile "$teacher" "$exp/final" --names teacher dphubert --threads "$profile_threads" --out "$exp/profile"
fi
