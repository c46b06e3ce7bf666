#!/usr/bin/env bash
# HuBERT pretraining in two iterations on any Lhotse manifest directory (corpus-agnostic).
#   stage 1: k-means (K=km1_k) on MFCC of a sampled fraction of the training cuts
#   stage 2: label every training (and validation) cut with those units  -> $data/cuts_<split>_mfcc.jsonl.gz
#   stage 3: pretrain iteration 1                                      -> $iter1_dir/final
#   stage 4: k-means (K=km2_k) on layer km2_layer of the iteration-1 model; --km2-layer auto picks the layer:
#            `speechssl analyze` fits k-means (K=km2_k) on each layer of the iteration-1 model over
#            analyze_utts cuts of analyze_split (default: valid_split, else train_split), and the layer with
#            the highest PNMI against the cuts' phone alignments wins (ties: the lower layer). It needs cuts
#            with supervision.alignment["phone"] (the mini corpus has them; LibriSpeech manifests do not:
#            give a number there). The analysis and the chosen layer stay in $exp/analyze_iter1.
#   stage 5: label the cuts with the iteration-2 units                 -> $data/cuts_<split>_hubert_l<N>.jsonl.gz
#   stage 6: pretrain iteration 2                                      -> $iter2_dir/final
# Example (8 GPUs, LibriSpeech 960 prepared under data/librispeech):
#   recipes/ssl/hubert.sh --data data/librispeech --train-split train_960 --exp exp/hubert --ngpu 8
# Several machines (shared storage): k-means/label stages once on machine 0, training stages on every machine:
#   hubert.sh ... --stage 1 --stop-stage 2          # machine 0
#   hubert.sh ... --stage 3 --stop-stage 3 --ngpu 8 --nnodes 4 --machine-rank R --main-ip HOST0   # machines 0..3
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)   # the speechssl checkout (configs)

stage=1
stop_stage=6
data=                       # directory with cuts_<split>.jsonl.gz
train_split=train
valid_split=""              # optional, e.g. dev_clean
exp=exp/hubert               # k-means models; iterations in iter1_dir / iter2_dir
iter1_dir=""                # default $exp/iter1
iter2_dir=""                # default $exp/iter2
ref_gpus=32                 # reference global batch: 32 GPUs x 87.5 s (grad_accum fills the gap)
grad_accum=""               # default: ceil(ref_gpus / (ngpu * nnodes))
iter1_config=$root/conf/pretrain/hubert_base_iter1.yaml
iter2_config=$root/conf/pretrain/hubert_base_iter2.yaml
km1_k=100
km2_k=500
km2_layer=6                 # a hidden-state index, or auto (the highest PNMI, see stage 4)
analyze_split=""            # --km2-layer auto: cuts with phone alignments (default: valid_split, else train_split)
analyze_utts=500            # --km2-layer auto: at most this many of them
km_fraction=0.1             # share of training cuts the k-means is fitted on
km_opts=""                  # extra options for `speechssl kmeans`
iter1_opts=""               # extra options, e.g. "--set trainer.max_steps=1000" (no spaces in values)
iter2_opts=""
seed=0

. "$(dirname "$0")/../lib/launch.sh"   # the launch options (--ngpu, --nnodes ...) and run_training
. "$(dirname "$0")/../lib/stages.sh"
. "$(dirname "$0")/../lib/units.sh"
require data
[ -n "$iter1_dir" ] || iter1_dir=$exp/iter1
[ -n "$iter2_dir" ] || iter2_dir=$exp/iter2
[ -n "$grad_accum" ] || grad_accum=$(accum_for "$ref_gpus" $((ngpu * nnodes)))
splits="$train_split ${valid_split}"
mkdir -p "$exp"

pretrain_iter() {  # pretrain_iter CONFIG OUT UNIT_NAME [ARGS...]: resumes when OUT has checkpoints
  local config=$1 out=$2 unit=$3
  shift 3
  local extra=()
  [ -z "$valid_split" ] || extra+=(--set "data.valid=[$data/cuts_${valid_split}_${unit}.jsonl.gz]")
  run_training pretrain "$out" --config "$config" --set "data.train=[$data/cuts_${train_split}_${unit}.jsonl.gz]" \
    --set "trainer.grad_accum=$grad_accum" --set "trainer.seed=$seed" "${extra[@]}" "$@"
}

if stage_in 1; then
  log "Stage 1: k-means K=$km1_k on MFCC of ${km_fraction} of $data/cuts_${train_split}.jsonl.gz"
  # shellcheck disable=SC2086
  fit_units "$exp/km_mfcc" "$data/cuts_${train_split}.jsonl.gz" --feature mfcc --n-clusters "$km1_k" \
    --fraction "$km_fraction" --seed "$seed" $km_opts
fi

if stage_in 2; then
  log "Stage 2: MFCC units on every cut"
  # shellcheck disable=SC2086
  label_splits "$data" "$exp/km_mfcc" mfcc $splits
fi

if stage_in 3; then
  log "Stage 3: HuBERT iteration 1 ($iter1_config, $ngpu GPU(s) x $nnodes node(s), grad_accum $grad_accum)"
  # shellcheck disable=SC2086
  pretrain_iter "$iter1_config" "$iter1_dir" mfcc $iter1_opts
fi

# --km2-layer auto: the iteration-1 layer with the highest PNMI, chosen once (stage 4, or the first later stage
# that needs it) and then read back from $exp/analyze_iter1/km2_layer
pick_km2_layer() {
  local dir=$exp/analyze_iter1 split=${analyze_split:-${valid_split:-$train_split}} layer
  if [ ! -s "$dir/km2_layer" ]; then
    log "km2_layer auto: layer analysis of $iter1_dir/final on $analyze_utts cuts of $split (K=$km2_k)"
    layer=$(speechssl analyze --model "$iter1_dir/final" --cuts "$data/cuts_${split}.jsonl.gz" --out "$dir" \
      --n-clusters "$km2_k" --max-utts "$analyze_utts" --seeds "$seed" --select pnmi --no-progress)
    echo "$layer" > "$dir/km2_layer"
  fi
  km2_layer=$(cat "$dir/km2_layer")
  log "km2_layer auto: layer $km2_layer (highest PNMI in $dir/analysis.json)"
}
if [ "$km2_layer" = auto ] && { stage_in 4 || stage_in 5 || stage_in 6; }; then
  pick_km2_layer
fi

unit2=hubert_l${km2_layer}
if stage_in 4; then
  log "Stage 4: k-means K=$km2_k on layer $km2_layer of $iter1_dir/final"
  # shellcheck disable=SC2086
  fit_units "$exp/km_${unit2}" "$data/cuts_${train_split}.jsonl.gz" --feature "$iter1_dir/final" \
    --layer "$km2_layer" --n-clusters "$km2_k" --fraction "$km_fraction" --seed "$seed" $km_opts
fi

if stage_in 5; then
  log "Stage 5: layer-$km2_layer units on every cut"
  # shellcheck disable=SC2086
  label_splits "$data" "$exp/km_${unit2}" "$unit2" $splits
fi

if stage_in 6; then
  log "Stage 6: HuBERT iteration 2 ($iter2_config) -> $iter2_dir/final"
  # shellcheck disable=SC2086
  pretrain_iter "$iter2_config" "$iter2_dir" "$unit2" --set "objective.kwargs.num_classes={\"$unit2\":$km2_k}" \
    --set "data.units=[$unit2]" $iter2_opts
fi
