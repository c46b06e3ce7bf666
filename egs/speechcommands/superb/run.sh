#!/usr/bin/env bash
# SUPERB KS on Speech Commands v0.01: 12 classes, class-balanced batches, accuracy.
#   bash run.sh --corpus /path/to/speechcommands --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0: prepare the manifests (speechssl prepare speechcommands) unless they exist.
# Stage 1: score every upstream on: ks (reference configs conf/superb/TASK.yaml).
# Stage 2: the table and plots (exp/superb/report).
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=2
corpus=""                     # the downloaded corpus directory
data=data/speechcommands
exp=exp/superb
upstreams="fbank"             # fbank | mfcc | model directories (space-separated)
tasks="ks"
lrs=""                        # e.g. "[1e-5,1e-4,1e-3]" for a learning-rate sweep
overrides=""                  # extra KEY=VALUE overrides, e.g. "optim.steps=20000 device=cuda"

. ../../../recipes/lib/stages.sh

if stage_in 0; then
  if [ -f "$data/cuts_ks_train.jsonl.gz" ]; then
    log "Stage 0: manifests already in $data"
  else
    [ -n "$corpus" ] || { log "Stage 0: pass --corpus /path/to/speechcommands"; exit 1; }
    log "Stage 0: prepare speechcommands -> $data"
    speechssl prepare speechcommands "$corpus" "$data"
  fi
fi

if [ "$stop_stage" -ge 1 ]; then
  bash ../../../recipes/superb/run.sh --stage $(( stage > 1 ? stage : 1 )) --stop-stage "$stop_stage" \
    --upstreams "$upstreams" --tasks "$tasks" --data "$data" --exp "$exp" --lrs "$lrs" \
    --overrides "$overrides"
fi
