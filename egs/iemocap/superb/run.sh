#!/usr/bin/env bash
# SUPERB ER on IEMOCAP: 4 classes, leave-one-session-out over 5 folds (dev = 20% of the training sessions), mean accuracy.
#   bash run.sh --corpus /path/to/iemocap --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0 prepares the manifests (speechssl prepare iemocap) unless they exist; stage 1 scores every upstream on
# er with the reference configs conf/superb/TASK.yaml; stage 2 writes the table and plots (exp/superb/report).
# Every option of recipes/superb/run.sh applies; later options override these defaults.
set -euo pipefail
cd "$(dirname "$0")"
exec bash ../../../recipes/superb/run.sh --stage 0 --corpus-name iemocap --prepared cuts_er_all.jsonl.gz \
  --data data/iemocap --tasks "er" --exp exp/superb "$@"
