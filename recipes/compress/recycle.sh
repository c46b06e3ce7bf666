#!/usr/bin/env bash
# Recycle-and-Distill (ARMHuBERT) of any pretrained teacher on any Lhotse manifest directory, then a profile: the
# distillation recipe (recipes/compress/distilhubert.sh, every option applies) with conf/distill/recycle.yaml.
#   stage 1: distil -> $exp/final  (resumes automatically when $exp has checkpoints)
#   stage 2: profile teacher vs student (params, MACs for 10 s, CPU real-time factor) -> $exp/profile
# Example: recipes/compress/recycle.sh --data data/librispeech --train-split train_960 \
#            --teacher exp/hubert_iter2/final --exp exp/recycle --ngpu 1
#          (--distill-opts "--set student.attn_reuse=[-1,0,-1,2]" picks the reusing layers)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec bash "$root/recipes/compress/distilhubert.sh" --config "$root/conf/distill/recycle.yaml" --exp exp/recycle "$@"
