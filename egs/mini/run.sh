#!/usr/bin/env bash
# The mini recipe: a synthetic eSpeak NG corpus taken through every capability on a laptop CPU in minutes.
#   bash egs/mini/run.sh                       # everything
#   bash egs/mini/run.sh --stage 3 --stop-stage 5
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
ngpu=0
minutes=15         # size of the synthetic corpus: minutes of read sentences (+ emotion and keyword clips, and a
                   # pretraining pool of 3x this)
pretrain_steps=1000  # updates of the small-data HuBERT (about 5 minutes on 2 CPU cores)
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

if stage_in 1; then
  log "Stage 1: validate the mini manifests (audio present and complete, task fields) and report counts/hours per split"
  speechssl prepare validate "$data/mini"
fi

if stage_in 2; then
  log "Stage 2: k-means (K=100) on per-utterance normalised MFCC of the pretraining pool, units on every pool cut"
  bash ../../recipes/ssl/small.sh --stage 1 --stop-stage 2 --data "$data/mini" --train-split pretrain \
    --exp "$exp/hubert_small" --seed "$seed"
fi

if stage_in 3; then
  log "Stage 3: small-data HuBERT ($pretrain_steps updates, fbank front end, 4 x 256) -> $exp/hubert_small/final"
  bash ../../recipes/ssl/small.sh --stage 3 --stop-stage 3 --data "$data/mini" --train-split pretrain \
    --exp "$exp/hubert_small" --steps "$pretrain_steps" --seed "$seed"
fi

if stage_in 4; then
  log "Stage 4: k-means (K=100) on layer 3 of $exp/hubert_small/final, units on every pool cut (WavLM targets)"
  bash ../../recipes/ssl/wavlm.sh --stage 1 --stop-stage 2 --data "$data/mini" --train-split pretrain \
    --exp "$exp/wavlm" --km-model "$exp/hubert_small/final" --km-layer 3 --km-k 100 --km-fraction 0.3 --seed "$seed"
fi

if stage_in 5; then
  log "Stage 5: short wav2vec 2.0, WavLM and BEST-RQ runs; training curves -> $exp/pretrain_report"
  bash ../../recipes/ssl/wav2vec2.sh --data "$data/mini" --train-split pretrain --exp "$exp/wav2vec2" \
    --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" --config ../../conf/pretrain/mini_wav2vec2.yaml
  bash ../../recipes/ssl/wavlm.sh --stage 3 --stop-stage 3 --data "$data/mini" --train-split pretrain \
    --exp "$exp/wavlm" --units hubert_l3 --km-k 100 --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" \
    --config ../../conf/pretrain/mini_wavlm.yaml
  bash ../../recipes/ssl/bestrq.sh --data "$data/mini" --train-split pretrain --exp "$exp/bestrq" \
    --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" --config ../../conf/pretrain/mini_bestrq.yaml
  speechssl report "$exp/hubert_small" "$exp/wav2vec2" "$exp/wavlm" "$exp/bestrq" --out "$exp/pretrain_report"
fi

if stage_in 6; then
  log "Stage 6: DistilHuBERT: 2-layer student of $exp/hubert_small/final -> $exp/distilhubert/final"
  bash ../../recipes/compress/distilhubert.sh --stage 1 --stop-stage 1 --data "$data/mini" --train-split pretrain \
    --teacher "$exp/hubert_small/final" --exp "$exp/distilhubert" --ngpu "$ngpu" --seed "$seed" \
    --config ../../conf/distill/mini_distilhubert.yaml
fi

if stage_in 7; then
  log "Stage 7: DPHuBERT: prune $exp/hubert_small/final to 50% sparsity -> $exp/dphubert/final"
  bash ../../recipes/compress/dphubert.sh --stage 1 --stop-stage 1 --data "$data/mini" --train-split pretrain \
    --teacher "$exp/hubert_small/final" --exp "$exp/dphubert" --target 0.5 --ngpu "$ngpu" --seed "$seed" \
    --config ../../conf/prune/mini_dphubert.yaml
fi

if stage_in 8; then
  log "Stage 8: profile teacher vs students (params, MACs / 10 s, CPU RTF; kept heads/FFN PNG) -> $exp/compress_profile"
  speechssl profile "$exp/hubert_small/final" "$exp/distilhubert/final" "$exp/dphubert/final" \
    --names hubert_small distilhubert dphubert --threads 2 --repeats 3 --out "$exp/compress_profile"
fi

if stage_in 9; then
  log "Stage 9: SUPERB (asr pr sid asv er ks, mini configs) on fbank, a random-init control of the small HuBERT, it and its students -> $exp/superb"
  # the recipe skips, with a log line, an encoder whose directory is missing (its stage was not run)
  bash ../../recipes/superb/run.sh --stage 1 --stop-stage 1 --conf-prefix mini_ \
    --upstreams "fbank random:$exp/hubert_small/final $exp/hubert_small/final $exp/distilhubert/final $exp/dphubert/final" \
    --data "$data/mini" --trials "$data/mini/asv_trials.txt" --exp "$exp/superb" --overrides "trainer.progress=false"
fi

if stage_in 10; then
  log "Stage 10: SUPERB table (Markdown + CSV) and layer-weight plots -> $exp/superb/report"
  speechssl report $(ls -d "$exp"/superb/*/ | grep -v -e '/report/$' -e '/cache/$') --out "$exp/superb/report"
fi
