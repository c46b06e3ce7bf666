#!/usr/bin/env bash
# SUPERB ASR and PR on LibriSpeech (train-clean-100 / dev-clean / test-clean). PR needs phones in supervision.custom.phones.
#   bash run.sh --corpus /path/to/librispeech --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0 prepares the manifests (speechssl prepare librispeech) unless they exist; stage 1 scores every upstream on
# asr pr with the reference configs conf/superb/TASK.yaml; stage 2 writes the table and plots (exp/superb/report).
# Every option of recipes/superb/run.sh applies; later options override these defaults.
set -euo pipefail
cd "$(dirname "$0")"
exec bash ../../../recipes/superb/run.sh --stage 0 --corpus-name librispeech --prepared cuts_train-clean-100.jsonl.gz \
  --data data/librispeech --tasks "asr pr" --exp exp/superb "$@"
