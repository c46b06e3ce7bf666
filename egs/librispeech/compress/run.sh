#!/usr/bin/env bash
# LibriSpeech 960 h compression with the reference hyperparameters (conf/distill/distilhubert.yaml,
# conf/prune/dphubert.yaml, conf/distill/recycle.yaml): DistilHuBERT, DPHuBERT and Recycle-and-Distill students of
# a HuBERT Base teacher, then a profile table.
#   bash egs/librispeech/compress/run.sh --corpus /corpora/LibriSpeech --teacher /models/hubert-base-ls960
#   bash egs/librispeech/compress/run.sh --stage 3 --stop-stage 3 --teacher exp/hubert_iter2/final --ngpu 4
# Stages: 1 prepare manifests; 2 DistilHuBERT (200k steps); 3 DPHuBERT (50k + 25k steps, sparsity 0.75);
#         4 Recycle-and-Distill (odd layers reuse the attention map of the layer before, masking distillation);
#         5 profile the teacher and the students (params, MACs for 10 s, CPU RTF, kept heads/FFN PNG).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../../.. && pwd)

stage=1
stop_stage=5
corpus=                     # LibriSpeech root (with train-clean-100, train-clean-360, train-other-500 ...)
data=data/librispeech
teacher=                    # HuBERT Base: HF dir (facebook/hubert-base-ls960 downloaded), fairseq .pt or ours
exp=exp
train_split=train_960
ngpu=1
nj=8
target=0.75
seed=0

. "$root/recipes/lib/stages.sh"
[ -n "$teacher" ] || { echo "$0: --teacher MODEL is required" >&2; exit 1; }

if stage_in 1; then
  [ -n "$corpus" ] || { echo "$0: --corpus DIR is required for stage 1" >&2; exit 1; }
  log "Stage 1: LibriSpeech manifests -> $data"
  speechssl prepare librispeech "$corpus" "$data" --num-jobs "$nj"
fi

if stage_in 2; then
  log "Stage 2: DistilHuBERT (2 layers, heads for teacher layers 4/8/12) -> $exp/distilhubert/final"
  bash "$root/recipes/compress/distilhubert.sh" --stage 1 --stop-stage 1 --data "$data" \
    --train-split "$train_split" --teacher "$teacher" --exp "$exp/distilhubert" --ngpu "$ngpu" --seed "$seed"
fi

if stage_in 3; then
  log "Stage 3: DPHuBERT to sparsity $target -> $exp/dphubert/final"
  bash "$root/recipes/compress/dphubert.sh" --stage 1 --stop-stage 1 --data "$data" --train-split "$train_split" \
    --teacher "$teacher" --exp "$exp/dphubert" --target "$target" --ngpu "$ngpu" --seed "$seed"
fi

if stage_in 4; then
  log "Stage 4: Recycle-and-Distill -> $exp/recycle/final"
  bash "$root/recipes/compress/recycle.sh" --stage 1 --stop-stage 1 --data "$data" --train-split "$train_split" \
    --teacher "$teacher" --exp "$exp/recycle" --ngpu "$ngpu" --seed "$seed"
fi

if stage_in 5; then
  log "Stage 5: profile -> $exp/compress_profile"
  speechssl profile "$teacher" "$exp/distilhubert/final" "$exp/dphubert/final" "$exp/recycle/final" \
    --names teacher distilhubert dphubert recycle --threads 2 --out "$exp/compress_profile"
fi
