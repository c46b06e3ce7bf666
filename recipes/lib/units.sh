# Shared by the recipes that make k-means units (source it after lib/stages.sh, which defines log).

# True (with a log line) when KM_DIR already holds a fitted k-means: recipes reuse it instead of refitting.
km_done() { [ -f "$1/kmeans.json" ] && log "k-means in $1 exists; reusing it (delete it to refit)"; }

# fit_units KM_DIR CUTS ARGS...: `speechssl kmeans --cuts CUTS --out KM_DIR ARGS`, unless KM_DIR holds one already.
fit_units() {
  local km=$1 cuts=$2
  shift 2
  km_done "$km" || speechssl kmeans --cuts "$cuts" --out "$km" "$@"
}

# label_splits DATA KM_DIR NAME SPLIT...: units NAME from KM_DIR on DATA/cuts_SPLIT.jsonl.gz, written as
# DATA/cuts_SPLIT_NAME.jsonl.gz.
label_splits() {
  local data=$1 km=$2 name=$3 s
  shift 3
  for s in "$@"; do
    speechssl label --cuts "$data/cuts_${s}.jsonl.gz" --kmeans "$km" --out "$data/cuts_${s}_${name}.jsonl.gz" \
      --name "$name"
  done
}
