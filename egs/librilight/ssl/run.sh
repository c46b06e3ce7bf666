#!/usr/bin/env bash
# HuBERT pretraining on Libri-Light (up to 60k h) streamed from Lhotse Shar shards, so no manifest is ever held
# in memory during training. K-means is fitted on a small sampled fraction of the manifest.
#   bash run.sh --corpus /data/librilight --parts small,medium --ngpu 8 --nnodes 4 --machine-rank R --main-ip HOST
#   (on each of the 4 machines; or --launcher "torchrun ..." for any other launcher)
# Stages: 0 prepare manifests (VAD segments, at most max_segment s); 1 combine the parts;
#         2 MFCC k-means + labels (hubert.sh 1-2); 3 Shar shards of the labelled cuts; 4 HuBERT iteration 1 from
#         Shar; 5 layer-6 k-means + labels (hubert.sh 4-5); 6 Shar shards; 7 HuBERT iteration 2 from Shar.
set -euo pipefail

stage=0
stop_stage=7
corpus=/data/librilight          # contains small/, medium/, large/
parts=small,medium,large
data=data/librilight
exp=exp/hubert
nj=32
max_segment=20
km_fraction=0.01                # 1% of 60k h is still 600 h of features: plenty for k-means
shard_size=2000
seed=0

. "$(dirname "$0")/../../../recipes/lib/launch.sh"   # --ngpu, --nnodes, --machine-rank, --main-ip ...
ngpu=8
. "$(dirname "$0")/../../../recipes/lib/stages.sh"   # parses the options above
cd "$(dirname "$0")"
hubert=../../../recipes/ssl/hubert.sh
common=(--data "$data" --train-split train --exp "$exp" --ngpu "$ngpu" --nnodes "$nnodes"
        --machine-rank "$machine_rank" --main-ip "$main_ip" --main-port "$main_port" --launcher "$launcher"
        --km-fraction "$km_fraction" --seed "$seed")

if stage_in 0; then
  log "Stage 0: Libri-Light manifests ($parts) from $corpus"
  speechssl prepare librilight "$corpus" "$data" --parts "$parts" --num-jobs "$nj" --max-segment "$max_segment"
fi

if stage_in 1; then
  log "Stage 1: combine the parts into cuts_train (lazy, streamed)"
  python - "$data" "$parts" <<'PY'
import sys
from lhotse import CutSet
d, parts = sys.argv[1], sys.argv[2].split(",")
CutSet.from_files([f"{d}/cuts_{p}.jsonl.gz" for p in parts]).to_file(f"{d}/cuts_train.jsonl.gz")
PY
fi

if stage_in 2; then
  log "Stage 2: MFCC k-means (K=100) on ${km_fraction} of the cuts and MFCC units on every cut"
  bash $hubert "${common[@]}" --stage 1 --stop-stage 2
fi

if stage_in 3; then
  log "Stage 3: Shar shards of the MFCC-labelled cuts -> $data/shar_mfcc"
  speechssl export-shar "$data/cuts_train_mfcc.jsonl.gz" "$data/shar_mfcc" --shard-size "$shard_size" \
    --fields mfcc --num-jobs "$nj"
fi

if stage_in 4; then
  log "Stage 4: HuBERT iteration 1 streamed from Shar -> $exp/iter1/final"
  bash $hubert "${common[@]}" --stage 3 --stop-stage 3 --iter1-opts "--set data.shar_dir=$data/shar_mfcc"
fi

if stage_in 5; then
  log "Stage 5: k-means (K=500) on layer 6 of iteration 1 and layer-6 units on every cut"
  bash $hubert "${common[@]}" --stage 4 --stop-stage 5
fi

if stage_in 6; then
  log "Stage 6: Shar shards of the layer-6-labelled cuts -> $data/shar_hubert_l6"
  speechssl export-shar "$data/cuts_train_hubert_l6.jsonl.gz" "$data/shar_hubert_l6" --shard-size "$shard_size" \
    --fields hubert_l6 --num-jobs "$nj"
fi

if stage_in 7; then
  log "Stage 7: HuBERT iteration 2 streamed from Shar -> $exp/iter2/final"
  bash $hubert "${common[@]}" --stage 6 --stop-stage 6 --iter2-opts "--set data.shar_dir=$data/shar_hubert_l6"
fi
