#!/usr/bin/env bash
# Self-supervised pretraining on LibriSpeech 960 h with the reference Base hyper-parameters (conf/pretrain/).
#   bash run.sh --corpus /data/LibriSpeech --ngpu 8                      # everything
#   bash run.sh --stage 2 --stop-stage 2 --ngpu 8 --hubert-stage 3       # resume HuBERT from its stage 3
# Stages: 0 prepare manifests; 1 combine train-960 and validate; 2 HuBERT iterations 1+2 (recipes/ssl/hubert.sh);
#         3 wav2vec 2.0 Base; 4 WavLM Base (units: layer 9 of HuBERT iteration 2); 5 BEST-RQ; 6 training curves.
# Fewer GPUs than the references (32 / 64) keep the global batch through gradient accumulation; multi-node
# (accelerate launch; run the same command on every machine with its own rank):
#   --ngpu 8 --nnodes 4 --machine-rank R --main-ip HOST [--main-port 29500]
# or any launcher: --launcher "torchrun --nnodes 4 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 --nproc-per-node 8"
set -euo pipefail

stage=0
stop_stage=6
corpus=/data/LibriSpeech        # contains train-clean-100/, train-clean-360/, train-other-500/, dev-clean/ ...
data=data/librispeech
exp=exp
nj=16
hubert_stage=1                  # sub-stages of recipes/ssl/hubert.sh run by stage 2
hubert_stop_stage=6
km_fraction=0.1
seed=0

. "$(dirname "$0")/../../../recipes/lib/launch.sh"   # --ngpu, --nnodes, --machine-rank, --main-ip ...
ngpu=8
. "$(dirname "$0")/../../../recipes/lib/stages.sh"   # parses the options above
cd "$(dirname "$0")"
recipes=../../../recipes/ssl
common=(--data "$data" --train-split train_960 --valid-split dev-clean --ngpu "$ngpu" --nnodes "$nnodes"
        --machine-rank "$machine_rank" --main-ip "$main_ip" --main-port "$main_port"
        --launcher "$launcher" --seed "$seed")

if stage_in 0; then
  log "Stage 0: LibriSpeech manifests from $corpus"
  speechssl prepare librispeech "$corpus" "$data" --num-jobs "$nj" \
    --parts train-clean-100,train-clean-360,train-other-500,dev-clean,dev-other,test-clean,test-other
fi

if stage_in 1; then
  log "Stage 1: combine the training parts into cuts_train_960 and validate the manifests"
  python - "$data" <<'PY'
import sys
from lhotse import CutSet
d = sys.argv[1]
parts = [f"{d}/cuts_{p}.jsonl.gz" for p in ("train-clean-100", "train-clean-360", "train-other-500")]
CutSet.from_files(parts).to_file(f"{d}/cuts_train_960.jsonl.gz")
PY
  speechssl prepare validate "$data"
fi

if stage_in 2; then
  log "Stage 2: HuBERT Base, iterations 1 (MFCC, K=100) and 2 (layer 6, K=500) -> $exp/hubert/iter2/final"
  bash $recipes/hubert.sh "${common[@]}" --stage "$hubert_stage" --stop-stage "$hubert_stop_stage" \
    --exp "$exp/hubert" --km-fraction "$km_fraction"
fi

if stage_in 3; then
  log "Stage 3: wav2vec 2.0 Base -> $exp/wav2vec2/final"
  bash $recipes/wav2vec2.sh "${common[@]}" --exp "$exp/wav2vec2"
fi

if stage_in 4; then
  log "Stage 4: WavLM Base on K=500 units of layer 9 of HuBERT iteration 2 -> $exp/wavlm/final"
  bash $recipes/wavlm.sh "${common[@]}" --exp "$exp/wavlm" --km-model "$exp/hubert/iter2/final" --km-layer 9 \
    --km-k 500 --km-fraction "$km_fraction"
fi

if stage_in 5; then
  log "Stage 5: BEST-RQ -> $exp/bestrq/final"
  bash $recipes/bestrq.sh "${common[@]}" --exp "$exp/bestrq"
fi

if stage_in 6; then
  log "Stage 6: training curves -> $exp/pretrain_report"
  runs=()
  for d in "$exp/hubert/iter1" "$exp/hubert/iter2" "$exp/wav2vec2" "$exp/wavlm" "$exp/bestrq"; do
    [ -f "$d/metrics.jsonl" ] && runs+=("$d")
  done
  speechssl report "${runs[@]}" --out "$exp/pretrain_report"
fi
