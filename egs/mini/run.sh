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
method_steps=100   # updates of each short run of the further objectives (stage 7)
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
  log "Stage 6: speechssl extract: layers 3 and 4 of $exp/hubert_small/final for the ASR train split (fp16), and its layer-3 k-means units de-duplicated with a 200-piece unit BPE -> $exp/extract"
  speechssl extract --model "$exp/hubert_small/final" --layers 3,4 --dtype fp16 \
    --cuts "$data/mini/cuts_asr_train.jsonl.gz" --out "$exp/extract/hubert_small_l3_l4" --no-progress
  speechssl extract --kmeans "$exp/wavlm/km_hubert_l3" --dedup --bpe "$exp/extract/unit_bpe_l3.model" --bpe-vocab 200 \
    --cuts "$data/mini/cuts_asr_train.jsonl.gz" --out "$exp/extract/units_l3" --no-progress
fi

if stage_in 7; then
  log "Stage 7: short runs ($method_steps updates) of TERA, vq-wav2vec, UniSpeech, MR-HuBERT, ContentVec and speaker DINO -> $exp/{tera,vq_wav2vec,unispeech,mr_hubert,contentvec,dino}/final"
  short="--set trainer.max_steps=$method_steps --set trainer.eval_every=0 --set trainer.ckpt_every=$method_steps --set trainer.progress=false"
  for m in tera vq_wav2vec; do
    bash ../../recipes/ssl/pretrain.sh --config "../../conf/pretrain/$m.yaml" --data "$data/mini" --train-split pretrain \
      --exp "$exp/$m" --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" --pretrain-opts "$short"
  done
  bash ../../recipes/ssl/pretrain.sh --config ../../conf/pretrain/unispeech.yaml --data "$data/mini" --train-split pretrain \
    --exp "$exp/unispeech" --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" \
    --pretrain-opts "--set data.labeled=[$data/mini/cuts_asr_train.jsonl.gz] $short"
  bash ../../recipes/ssl/pretrain.sh --config ../../conf/pretrain/mr_hubert.yaml --data "$exp/hubert_small/data" \
    --train-split pretrain_mfcc --exp "$exp/mr_hubert" --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" --pretrain-opts "$short"
  # ContentVec and DINO continue from the small HuBERT (the speaker-identity change and the crops are their part)
  from_small="--set model.init_from=$exp/hubert_small/final --set data.max_duration=12 $short"
  bash ../../recipes/ssl/pretrain.sh --config ../../conf/pretrain/contentvec.yaml --data "$exp/hubert_small/data" \
    --train-split pretrain_mfcc --exp "$exp/contentvec" --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" \
    --pretrain-opts "$from_small --set objective.kwargs.ctr_ramp_steps=$method_steps"
  bash ../../recipes/ssl/pretrain.sh --config ../../conf/pretrain/dino.yaml --data "$data/mini" --train-split pretrain \
    --exp "$exp/dino" --ngpu "$ngpu" --ref-gpus 1 --seed "$seed" --pretrain-opts "$from_small \
      --set objective.kwargs.short_crops=2 --set objective.kwargs.teacher_temp_warmup_steps=$((method_steps / 5)) \
      --set objective.kwargs.momentum_steps=$method_steps"
  log "Stage 7: label-free ASV: cosine EER of DINO embeddings and of mean FBANK -> $exp/superb/{dino,fbank_label_free}/asv"
  for m in "$exp/dino/final dino" "fbank fbank_label_free"; do
    set -- $m
    speechssl score-embeddings --model "$1" --name "$2" --cuts "$data/mini/cuts_asv_test.jsonl.gz" \
      --trials "$data/mini/asv_trials.txt" --out "$exp/superb/$2/asv"
  done
fi

if stage_in 8; then
  log "Stage 8: DistilHuBERT: 2-layer student of $exp/hubert_small/final -> $exp/distilhubert/final"
  bash ../../recipes/compress/distilhubert.sh --stage 1 --stop-stage 1 --data "$data/mini" --train-split pretrain \
    --teacher "$exp/hubert_small/final" --exp "$exp/distilhubert" --ngpu "$ngpu" --seed "$seed" \
    --config ../../conf/distill/mini_distilhubert.yaml
fi

if stage_in 9; then
  log "Stage 9: DPHuBERT: prune $exp/hubert_small/final to 50% sparsity -> $exp/dphubert/final"
  bash ../../recipes/compress/dphubert.sh --stage 1 --stop-stage 1 --data "$data/mini" --train-split pretrain \
    --teacher "$exp/hubert_small/final" --exp "$exp/dphubert" --target 0.5 --ngpu "$ngpu" --seed "$seed" \
    --config ../../conf/prune/mini_dphubert.yaml
fi

if stage_in 10; then
  log "Stage 10: Recycle-and-Distill: layers 1 and 3 reuse the attention maps of layers 0 and 2, masking distillation from $exp/hubert_small/final -> $exp/recycle/final"
  bash ../../recipes/compress/recycle.sh --stage 1 --stop-stage 1 --data "$data/mini" --train-split pretrain \
    --teacher "$exp/hubert_small/final" --exp "$exp/recycle" --ngpu "$ngpu" --seed "$seed" \
    --config ../../conf/distill/mini_recycle.yaml
fi

if stage_in 11; then
  log "Stage 11: profile teacher vs students (params, MACs / 10 s, CPU RTF; kept heads/FFN PNG) -> $exp/compress_profile"
  speechssl profile "$exp/hubert_small/final" "$exp/distilhubert/final" "$exp/dphubert/final" "$exp/recycle/final" \
    --names hubert_small distilhubert dphubert recycle --threads 2 --repeats 3 --out "$exp/compress_profile"
fi

if stage_in 12; then
  log "Stage 12: OS-KDFT: 1 distilled + 1 speaker-tuned layer of $exp/hubert_small/final with an x-vector head -> $exp/oskdft/final; cosine ASV EER -> $exp/superb/oskdft/asv"
  bash ../../recipes/compress/oskdft.sh --stage 1 --stop-stage 1 --data "$data/mini" --train-split asv_train \
    --test-split asv_test --teacher "$exp/hubert_small/final" --exp "$exp/oskdft" --ngpu "$ngpu" --seed "$seed" \
    --config ../../conf/oskdft/mini.yaml
  speechssl score-embeddings --model "$exp/oskdft/final" --name oskdft --cuts "$data/mini/cuts_asv_test.jsonl.gz" \
    --trials "$data/mini/asv_trials.txt" --out "$exp/superb/oskdft/asv"
fi

if stage_in 13; then
  log "Stage 13: SUPERB (asr pr sid asv er ks, mini configs) on fbank, a random-init control of the small HuBERT, it and its students -> $exp/superb"
  # the recipe skips, with a log line, an encoder whose directory is missing (its stage was not run)
  bash ../../recipes/superb/run.sh --stage 1 --stop-stage 1 --conf-prefix mini_ \
    --upstreams "fbank random:$exp/hubert_small/final $exp/hubert_small/final $exp/distilhubert/final $exp/dphubert/final" \
    --data "$data/mini" --trials "$data/mini/asv_trials.txt" --exp "$exp/superb" --overrides "trainer.progress=false"
fi

if stage_in 14; then
  log "Stage 14: SUPERB (pr sid ks) on the short runs of stage 7 -> $exp/superb"
  bash ../../recipes/superb/run.sh --stage 1 --stop-stage 1 --conf-prefix mini_ --tasks "pr sid ks" \
    --upstreams "$exp/tera/final $exp/vq_wav2vec/final $exp/unispeech/final $exp/mr_hubert/final $exp/contentvec/final" \
    --data "$data/mini" --exp "$exp/superb" --overrides "trainer.progress=false"
fi

if stage_in 15; then
  log "Stage 15: ML-SUPERB mini: 12 languages synthesised with eSpeak NG; lid and mlasr (1-hour setting) on fbank, the random-init control and the small HuBERT -> $exp/mlsuperb"
  speechssl prepare mini-multilingual "$data/mini_multilingual" --minutes 4 --seed "$seed" --num-jobs "$nj"
  bash ../../recipes/superb/run.sh --stage 1 --stop-stage 1 --conf-prefix mini_ --tasks "lid mlasr" \
    --upstreams "fbank random:$exp/hubert_small/final $exp/hubert_small/final" \
    --data "$data/mini_multilingual" --exp "$exp/mlsuperb" --overrides "trainer.progress=false"
fi

if stage_in 16; then
  log "Stage 16: deploy: ONNX (fp32, int8) and torch int8 exports of the students; KS/SID of int8 vs fp32 with stage 13's heads -> $exp/deploy"
  bash ../../recipes/deploy/students.sh --data "$data/mini" --exp "$exp" --students "distilhubert dphubert"
fi

if stage_in 17; then
  log "Stage 17: what each layer knows: phone/speaker probes, K=50 PNMI and purities per layer of $exp/hubert_small/final, its random-init control and FBANK -> $exp/analyze/analysis.png"
  speechssl analyze --model "$exp/hubert_small/final" --model "random:$exp/hubert_small/final" --model fbank \
    --cuts "$data/mini/cuts_sid_train.jsonl.gz" --max-utts 160 --n-clusters 50 --max-frames 20000 --seeds "$seed" \
    --out "$exp/analyze" --no-progress
fi

if stage_in 18; then
  log "Stage 18: SUPERB table (Markdown + CSV) and layer-weight plots -> $exp/superb/report"
  speechssl report $(ls -d "$exp"/superb/*/ "$exp"/mlsuperb/*/ 2>/dev/null | grep -v -e '/report/$' -e '/cache/$') \
    --out "$exp/superb/report"
fi
