#!/usr/bin/env bash
# SUPERB SID and ASV on VoxCeleb1 (identification split; voxceleb1_test_v2 trials, EER + minDCF).
#   bash run.sh --corpus /path/to/voxceleb1 --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0: prepare the manifests (speechssl prepare voxceleb1) unless they exist.
# Stage 1: score every upstream on: sid asv (reference configs conf/superb/TASK.yaml).
# Stage 2: the table and plots (exp/superb/report).
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=2
corpus=""                     # the downloaded corpus directory
data=data/voxceleb1
exp=exp/superb
upstreams="fbank"             # fbank | mfcc | model directories (space-separated)
tasks="sid asv"
lrs=""                        # e.g. "[1e-5,1e-4,1e-3]" for a learning-rate sweep
overrides=""                  # extra KEY=VALUE overrides, e.g. "optim.steps=20000 device=cuda"

. ../../../recipes/lib/stages.sh

if stage_in 0; then
  if [ -f "$data/cuts_asv_train.jsonl.gz" ]; then
    log "Stage 0: manifests already in $data"
  else
    [ -n "$corpus" ] || { log "Stage 0: pass --corpus /path/to/voxceleb1"; exit 1; }
    log "Stage 0: prepare voxceleb1 -> $data"
    speechssl prepare voxceleb1 "$corpus" "$data"
  fi
fi

if [ "$stop_stage" -ge 1 ]; then
  bash ../../../recipes/superb/run.sh --stage $(( stage > 1 ? stage : 1 )) --stop-stage "$stop_stage" \
    --upstreams "$upstreams" --tasks "$tasks" --data "$data" --exp "$exp" --lrs "$lrs" \
    --overrides "$overrides" --trials "$data/asv_trials.txt"
fi
