#!/usr/bin/env bash
# SUPERB ASR and PR on LibriSpeech (train-clean-100 / dev-clean / test-clean). PR needs phones in supervision.custom.phones.
#   bash run.sh --corpus /path/to/librispeech --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0: prepare the manifests (speechssl prepare librispeech) unless they exist.
# Stage 1: score every upstream on: asr pr (reference configs conf/superb/TASK.yaml).
# Stage 2: the table and plots (exp/superb/report).
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=2
corpus=""                     # the downloaded corpus directory
data=data/librispeech
exp=exp/superb
upstreams="fbank"             # fbank | mfcc | model directories (space-separated)
tasks="asr pr"
lrs=""                        # e.g. "[1e-5,1e-4,1e-3]" for a learning-rate sweep
overrides=""                  # extra KEY=VALUE overrides, e.g. "optim.steps=20000 device=cuda"

. ../../../recipes/lib/stages.sh

if stage_in 0; then
  if [ -f "$data/cuts_train-clean-100.jsonl.gz" ]; then
    log "Stage 0: manifests already in $data"
  else
    [ -n "$corpus" ] || { log "Stage 0: pass --corpus /path/to/librispeech"; exit 1; }
    log "Stage 0: prepare librispeech -> $data"
    speechssl prepare librispeech "$corpus" "$data"
  fi
fi

if [ "$stop_stage" -ge 1 ]; then
  bash ../../../recipes/superb/run.sh --stage $(( stage > 1 ? stage : 1 )) --stop-stage "$stop_stage" \
    --upstreams "$upstreams" --tasks "$tasks" --data "$data" --exp "$exp" --lrs "$lrs" \
    --overrides "$overrides"
fi
