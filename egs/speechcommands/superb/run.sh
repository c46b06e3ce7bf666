#!/usr/bin/env bash
# SUPERB KS on Speech Commands v0.01: 12 classes, class-balanced batches, accuracy.
#   bash run.sh --corpus /path/to/speechcommands --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0 prepares the manifests (speechssl prepare speechcommands) unless they exist; stage 1 scores every upstream on
# ks with the reference configs conf/superb/TASK.yaml; stage 2 writes the table and plots (exp/superb/report).
# Every option of recipes/superb/run.sh applies; later options override these defaults.
set -euo pipefail
cd "$(dirname "$0")"
exec bash ../../../recipes/superb/run.sh --stage 0 --corpus-name speechcommands --prepared cuts_ks_train.jsonl.gz \
  --data data/speechcommands --tasks "ks" --exp exp/superb "$@"
