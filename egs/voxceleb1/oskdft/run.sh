#!/usr/bin/env bash
# OS-KDFT on VoxCeleb1: a small speaker-verification model distilled and fine-tuned in one run from a pretrained
# teacher (conf/oskdft/voxceleb1.yaml), scored by cosine on the voxceleb1_test_v2 trials (EER + minDCF).
#   bash run.sh --corpus /path/to/voxceleb1 --teacher ../../../exp/hubert_iter2/final
# Stages: 1 prepare the manifests (speechssl prepare voxceleb1) unless they exist; 2 train and score
# (recipes/compress/oskdft.sh, its stages 1-2).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../../.. && pwd)

stage=1
stop_stage=2
corpus=                     # VoxCeleb1 root (wav/ and the identification split and trial lists)
data=data/voxceleb1
teacher=                    # the pretrained encoder: our model dir, an HF dir or a fairseq .pt
exp=exp/oskdft
ngpu=1
seed=0

. "$root/recipes/lib/stages.sh"
require teacher

if stage_in 1 && [ ! -f "$data/cuts_asv_train.jsonl.gz" ]; then
  [ -n "$corpus" ] || { log "Stage 1: pass --corpus /path/to/voxceleb1"; exit 1; }
  log "Stage 1: prepare voxceleb1 -> $data"
  speechssl prepare voxceleb1 "$corpus" "$data"
fi

if stage_in 2; then
  log "Stage 2: OS-KDFT of $teacher on $data/cuts_asv_train, cosine EER on the test trials -> $exp"
  bash "$root/recipes/compress/oskdft.sh" --stage 1 --stop-stage 2 --data "$data" --train-split asv_train \
    --test-split asv_test --teacher "$teacher" --exp "$exp" --ngpu "$ngpu" --seed "$seed" \
    --config "$root/conf/oskdft/voxceleb1.yaml"
fi
