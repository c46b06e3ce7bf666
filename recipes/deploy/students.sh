#!/usr/bin/env bash
# Deployment of compressed students: ONNX (fp32, int8) and torch int8 exports, then the int8 check on KS and SID.
#   For each student EXP/NAME/final: EXP/deploy/NAME_onnx, NAME_onnx_int8, NAME_int8. The check scores the int8
#   student's hidden states with the head the SUPERB stage trained on its fp32 hidden states (EXP/superb/NAME/TASK,
#   its best trial reused through --resume; trained here when missing), so the accuracy change is the
#   quantisation's alone. bench/deploy.py --superb-compare prints fp32 vs int8 and exits 1 when a task loses
#   more than 2 % relative accuracy.
# Example: recipes/deploy/students.sh --data data/mini --exp exp --students "distilhubert dphubert"
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)

data=                      # directory with cuts_<split>.jsonl.gz (the SUPERB mini tasks)
exp=exp
students="distilhubert dphubert"
tasks="ks sid"
conf_prefix=mini_

. "$(dirname "$0")/../lib/stages.sh"
require data

pairs=""
for m in $students; do
  if [ ! -d "$exp/$m/final" ]; then log "$exp/$m/final missing (its stage was not run): not exporting it"; continue; fi
  speechssl export "$exp/$m/final" "$exp/deploy/${m}_onnx" --format onnx
  speechssl export "$exp/$m/final" "$exp/deploy/${m}_onnx_int8" --format onnx --quantize int8
  speechssl export "$exp/$m/final" "$exp/deploy/${m}_int8" --format speechssl --quantize int8
  fp32="$exp/superb/$m"
  for task in $tasks; do
    [ -d "$fp32/$task/trials" ] || { fp32="$exp/deploy/superb/$m"; break; }
  done
  if [ "$fp32" = "$exp/deploy/superb/$m" ]; then   # no SUPERB heads for this student yet: train them here
    bash "$root/recipes/superb/run.sh" --stage 1 --stop-stage 1 --conf-prefix "$conf_prefix" --tasks "$tasks" \
      --upstreams "$exp/$m/final" --data "$data" --exp "$exp/deploy/superb" --overrides "trainer.progress=false"
  fi
  for q in int8 onnx_int8; do
    for task in $tasks; do
      out="$exp/deploy/superb/${m}_$q/$task"
      mkdir -p "$out" && cp -r "$fp32/$task/trials" "$out/"
      speechssl superb --config "$root/conf/superb/$conf_prefix$task.yaml" --out "$out" --resume \
        --set "upstream=$exp/deploy/${m}_$q" --set "data.manifest_dir=$data" --set trainer.progress=false
    done
    pairs="$pairs $fp32=$exp/deploy/superb/${m}_$q"
  done
done
# shellcheck disable=SC2086  # pairs is a list of words
[ -z "$pairs" ] || python "$root/bench/deploy.py" --superb-compare $pairs
