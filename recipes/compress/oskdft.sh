#!/usr/bin/env bash
# OS-KDFT: one-step distillation and speaker fine-tuning of any pretrained teacher, then cosine-scored ASV.
#   stage 1: speechssl oskdft -> $exp/final  (resumes automatically when $exp has checkpoints)
#   stage 2: EER / minDCF of the exported embedding extractor on $data's ASV trials -> $exp/asv/results.json
# Example: recipes/compress/oskdft.sh --data data/voxceleb1 --train-split dev --test-split test \
#            --trials data/voxceleb1/trials.txt --teacher /models/hubert-base-ls960 --exp exp/oskdft --ngpu 1
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=2
data=                       # directory with cuts_<split>.jsonl.gz (cuts with a speaker supervision)
train_split=asv_train
test_split=asv_test
trials=                     # '1|0 ENROLL TEST' per line (default: $data/asv_trials.txt)
teacher=                    # model dir (ours or HF), fairseq .pt
exp=exp/oskdft
config=$root/conf/oskdft/voxceleb1.yaml
oskdft_opts=""              # extra options, e.g. "--set student.kd_layers=2" (no spaces in values)
seed=0

. "$(dirname "$0")/../lib/launch.sh"   # the launch options (--ngpu, --nnodes ...) and run_training
. "$(dirname "$0")/../lib/stages.sh"
require data teacher
trials=${trials:-$data/asv_trials.txt}

if stage_in 1; then
  log "Stage 1: OS-KDFT of $teacher ($config) on $data/cuts_${train_split} -> $exp/final"
  # shellcheck disable=SC2086
  run_training oskdft "$exp" --config "$config" --set "teacher=$teacher" \
    --set "data.train=[$data/cuts_${train_split}.jsonl.gz]" --set "trainer.seed=$seed" $oskdft_opts
fi

if stage_in 2; then
  log "Stage 2: cosine EER of $exp/final on $trials -> $exp/asv"
  speechssl score-embeddings --model "$exp/final" --name "$(basename "$exp")" \
    --cuts "$data/cuts_${test_split}.jsonl.gz" --trials "$trials" --out "$exp/asv"
fi
