#!/usr/bin/env bash
# Generic SUPERB recipe: score upstreams on a list of tasks, then write the table and layer-weight plots.
#   bash recipes/superb/run.sh --upstreams "fbank exp/hubert/final" --tasks "sid ks" --data data/voxceleb1
# Stage 0: `speechssl prepare CORPUS_NAME CORPUS DATA` unless DATA/PREPARED exists (per-corpus egs start here).
# Stage 1: `speechssl superb` per upstream (all tasks in one process) -> EXP/NAME/TASK/results.json (NAME:
#          fbank, or the model directory's name; ".../final" takes its parent's name; random:X is named
#          random_NAME). Model paths that do not exist are skipped with a log line.
# Stage 2: `speechssl report EXP/* --out EXP/report` (Markdown + CSV table, PNG plots).
set -euo pipefail

stage=1
stop_stage=2
corpus_name=""         # stage 0: librispeech | voxceleb1 | iemocap | speechcommands ...
corpus=""              # stage 0: the downloaded corpus directory
prepared=""            # stage 0: a manifest under --data whose presence means the corpus is prepared
prepare_opts=""        # stage 0: more options for `speechssl prepare`, e.g. "--lexicon /path/librispeech-lexicon.txt"
upstreams="fbank"      # space-separated: fbank | mfcc | model dirs / fairseq .pt | random:PRESET_OR_MODEL (fresh weights)
tasks="asr pr sid asv er ks"
conf_dir=""            # default: <repo>/conf/superb
conf_prefix=""         # "mini_" selects conf/superb/mini_TASK.yaml
data=""                # manifest directory (overrides data.manifest_dir when set)
trials=""              # ASV trial list (overrides data.trials when set)
exp=exp/superb
mode=frozen            # frozen | finetune | adapter | lora
lrs=""                 # learning-rate sweep, e.g. "[1e-4,1e-3,1e-2]" (no spaces)
overrides=""           # more space-separated KEY=VALUE overrides for every run, e.g. "trainer.max_steps=2000"
resume=false           # true: reuse the finished trials in EXP/NAME; false: score again (--overwrite clears an earlier run)

. "$(dirname "$0")/../lib/stages.sh"
root="$(cd "$(dirname "$0")/../.." && pwd)"
conf_dir=${conf_dir:-$root/conf/superb}

name_of() {
  case "$1" in
    fbank|mfcc) echo "$1" ;;
    random:*) n="$(name_of "${1#random:}")"; n="${n%.yaml}"; echo "random_${n%.yml}" ;;
    */final|*/final/) d="${1%/}"; basename "$(dirname "$d")" ;;
    *) d="${1%/}"; b="$(basename "$d")"; echo "${b%.pt}" ;;
  esac
}

# fbank/mfcc and presets always exist; a model path (also behind random:) must be there. A random: target
# without "/" or a .yaml/.yml/.pt ending is a preset name: a misspelt one fails in `speechssl superb`, loudly.
upstream_exists() {
  case "$1" in
    fbank|mfcc) return 0 ;;
    random:*/*|random:*.yaml|random:*.yml|random:*.pt) [ -e "${1#random:}" ] ;;
    random:*) return 0 ;;
    *) [ -e "$1" ] ;;
  esac
}

if stage_in 0; then
  if [ -n "$prepared" ] && [ -f "$data/$prepared" ]; then
    log "Stage 0: manifests already in $data"
  else
    [ -n "$corpus" ] && [ -n "$corpus_name" ] && [ -n "$data" ] || {
      log "Stage 0: pass --corpus /path/to/${corpus_name:-CORPUS} (with --corpus-name and --data)"; exit 1; }
    log "Stage 0: prepare $corpus_name -> $data"
    # shellcheck disable=SC2086  # prepare_opts is a list of words
    speechssl prepare "$corpus_name" "$corpus" "$data" $prepare_opts
  fi
fi

if stage_in 1; then
  for up in $upstreams; do
    if ! upstream_exists "$up"; then
      log "Stage 1: upstream $up does not exist (was its stage skipped?); not scoring it"
      continue
    fi
    name=$(name_of "$up")
    # one process per upstream: the model loads once and utterances shared by tasks are encoded once
    args=(--out "$exp/$name" --set "upstream=$up" --set "upstream_mode=$mode")
    n=0
    for task in $tasks; do
      conf="$conf_dir/${conf_prefix}${task}.yaml"
      [ -f "$conf" ] || { log "Stage 1: no config $conf"; exit 1; }
      args+=(--config "$conf")
      n=$((n + 1))
    done
    [ "$n" -gt 1 ] || args[1]="$exp/$name/$tasks"   # a single config writes straight into --out
    [ -n "$data" ] && args+=(--set "data.manifest_dir=$data")
    [ -n "$trials" ] && args+=(--set "data.trials=$trials")
    [ -n "$lrs" ] && args+=(--set "sweep.lrs=$lrs")
    for o in $overrides; do args+=(--set "$o"); done
    if [ "$resume" = true ]; then args+=(--resume); else args+=(--overwrite); fi
    log "Stage 1: SUPERB ($tasks) on $name"
    speechssl superb "${args[@]}"
  done
fi

if stage_in 2; then
  log "Stage 2: SUPERB table and plots -> $exp/report"
  dirs=()
  for d in "$exp"/*/; do
    case "$(basename "$d")" in report|cache) ;; *) dirs+=("${d%/}") ;; esac
  done
  [ ${#dirs[@]} -gt 0 ] || { log "Stage 2: nothing under $exp"; exit 1; }
  speechssl report "${dirs[@]}" --out "$exp/report"
fi
