#!/usr/bin/env bash
# SUPERB SID and ASV on VoxCeleb1 (identification split; voxceleb1_test_v2 trials, EER + minDCF).
#   bash run.sh --corpus /path/to/voxceleb1 --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0 prepares the manifests (speechssl prepare voxceleb1) unless they exist; stage 1 scores every upstream on
# sid asv with the reference configs conf/superb/TASK.yaml; stage 2 writes the table and plots (exp/superb/report).
# Every option of recipes/superb/run.sh applies; later options override these defaults.
set -euo pipefail
cd "$(dirname "$0")"
exec bash ../../../recipes/superb/run.sh --stage 0 --corpus-name voxceleb1 --prepared cuts_asv_train.jsonl.gz \
  --data data/voxceleb1 --tasks "sid asv" --exp exp/superb --trials data/voxceleb1/asv_trials.txt "$@"
