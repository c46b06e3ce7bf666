#!/usr/bin/env bash
# The mini recipe: a synthetic eSpeak NG corpus taken through every capability on a laptop CPU in minutes.
#   bash egs/mini/run.sh                       # everything
#   bash egs/mini/run.sh --stage 3 --stop-stage 5
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
ngpu=0
minutes=6          # size of the synthetic corpus
seed=0
nj=2
data=data
exp=exp

. ../../recipes/lib/stages.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if stage_in 0; then
  log "Stage 0: synthesise the mini corpus with eSpeak NG (${minutes} min) and write its manifests"
  speechssl prepare mini "$data/mini" --minutes "$minutes" --seed "$seed"
fi

# STAGE-BLOCKS: each capability adds its stages below, in order.
