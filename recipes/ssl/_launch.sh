# Shared by recipes/ssl/*.sh (source it): run a speechssl training command on 1 process or many.
#   launch pretrain --config ... --out ...
# ngpu <= 1: plain `speechssl`; ngpu > 1: torchrun --standalone with ngpu processes (DDP via accelerate);
# launcher="...": any launcher prefix for multi-node runs, e.g.
#   --launcher "torchrun --nnodes 4 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint host:29500 --nproc-per-node 8"
#   --launcher "accelerate launch --config_file multinode.yaml"
# It must accept `-m speechssl.cli.main ARGS`.
launch() {
  if [ -n "${launcher:-}" ]; then
    # shellcheck disable=SC2086
    $launcher -m speechssl.cli.main "$@"
  elif [ "${ngpu:-0}" -gt 1 ]; then
    torchrun --standalone --nproc-per-node "$ngpu" -m speechssl.cli.main "$@"
  else
    speechssl "$@"
  fi
}

# grad_accum so that world_size x grad_accum matches the reference number of GPUs (same global batch).
accum_for() {  # accum_for REF_GPUS WORLD_SIZE
  local ref=$1 world=$2
  [ "$world" -ge 1 ] || world=1
  echo $(( (ref + world - 1) / world ))
}
