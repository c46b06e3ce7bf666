#!/usr/bin/env bash
# SUPERB ASR and PR on LibriSpeech (train-clean-100 / dev-clean / test-clean).
#   bash run.sh --corpus /path/to/LibriSpeech --upstreams "fbank ../../../exp/hubert_iter2/final"
# Stage 0 prepares the manifests (speechssl prepare librispeech) unless they exist, with phones for PR
# (supervision.custom.phones) from a pronunciation lexicon: --lexicon PATH, default CORPUS/librispeech-lexicon.txt.
# Nothing downloads it: get librispeech-lexicon.txt from OpenSLR resource 11 (https://www.openslr.org/11/) and put
# it there (or pass --lexicon; several files: --lexicon "a.txt b.txt", the first pronunciation wins; --lexicon none
# prepares text only, enough for ASR). Cuts with words missing from the lexicon are skipped and counted
# (DATA/lexicon_report.json). Stage 1 scores every upstream on asr pr with the reference configs
# conf/superb/TASK.yaml; stage 2 writes the table and plots (exp/superb/report).
# Every option of recipes/superb/run.sh applies; later options override these defaults.
set -euo pipefail
cd "$(dirname "$0")"
corpus=""
lexicon=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --lexicon) [ $# -ge 2 ] || { echo "$0: option --lexicon needs a value" >&2; exit 1; }
               lexicon="$2"; shift 2 ;;
    --lexicon=*) lexicon="${1#*=}"; shift ;;
    --corpus) [ $# -ge 2 ] || { echo "$0: option --corpus needs a value" >&2; exit 1; }
              corpus="$2"; args+=("$1" "$2"); shift 2 ;;
    --corpus=*) corpus="${1#*=}"; args+=("$1"); shift ;;
    --help|-h) echo "  --lexicon (default: CORPUS/librispeech-lexicon.txt; 'none' = no phones)" >&2; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
lexicon=${lexicon:-${corpus:+$corpus/librispeech-lexicon.txt}}
prepare_opts=""
if [ -n "$lexicon" ] && [ "$lexicon" != none ]; then
  for f in $lexicon; do prepare_opts+=" --lexicon $f"; done
fi
exec bash ../../../recipes/superb/run.sh --stage 0 --corpus-name librispeech --prepared cuts_train-clean-100.jsonl.gz \
  --data data/librispeech --tasks "asr pr" --exp exp/superb --prepare-opts "$prepare_opts" ${args[@]+"${args[@]}"}
