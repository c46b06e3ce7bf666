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
config=$root/conf/prune/dphubert.yaml
prune_opts=""               # extra options, e.g. "--set prune.warmup_steps=2000" (no spaces in values)
profile_threads=2
seed=0

. "$(dirname "$0")/../lib/launch.sh"   # the launch options (--ngpu, --nnodes ...) and run_training
. "$(dirname "$0")/../lib/stages.sh"
require data teacher

if stage_in 1; then
  log "Stage 1: DPHuBERT pruning of $teacher to sparsity $target ($config) -> $exp/final"
  # shellcheck disable=SC2086
  run_training prune "$exp" --config "$config" --set "teacher=$teacher" --set "prune.target=$target" \
    --set "data.train=[$data/cuts_${train_split}.jsonl.gz]" --set "trainer.seed=$seed" $prune_opts
fi

if stage_in 2; then
  log "Stage 2: profile teacher vs pruned model -> $exp/profile"
  speechssl profile "$teacher" "$exp/final" --names teacher dphubert --threads "$profile_threads" --out "$exp/profile"
fi
