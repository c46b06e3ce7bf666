#!/usr/bin/env bash
# ML-SUPERB language identification (lid) and multilingual ASR (mlasr, CER per language and averaged) on the
# ML-SUPERB release the user downloaded (speechssl prepare mlsuperb reads its SOURCE/LANG/transcript_* layout).
#   bash run.sh --corpus /path/to/ml_superb/eng_lang_data --upstreams "fbank ../../../exp/hubert_iter2/final"
#   bash run.sh ... --overrides "data.train_split=ml_train_10min"     # the 10-minute setting
# Stage 0 prepares the manifests unless they exist; stage 1 scores every upstream on lid and mlasr with
# conf/superb/{lid,mlasr}.yaml; stage 2 writes the table and plots (exp/superb/report).
# Every option of recipes/superb/run.sh applies; later options override these defaults.
set -euo pipefail
cd "$(dirname "$0")"
exec bash ../../../recipes/superb/run.sh --stage 0 --corpus-name mlsuperb --prepared cuts_ml_train_1h.jsonl.gz \
  --data data/mlsuperb --tasks "lid mlasr" --exp exp/superb "$@"
