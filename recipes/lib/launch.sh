# Shared by recipes/ssl/*.sh (source it after lib/stages.sh): run a speechssl training command on 1 process or many.
#   launch pretrain --config ... --out ...
# Uses the recipe's options:
#   ngpu                       processes per machine
#   nnodes                     machines (accelerate's --num_machines)
#   machine_rank, main_ip,     this machine's rank (0 .. nnodes-1), the address and port of machine 0
#   main_port
#   launcher                   any launcher prefix instead (it must accept `-m speechssl.cli.main ARGS`), e.g.
#     --launcher "torchrun --nnodes 4 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint host:29500 --nproc-per-node 8"
# Resulting command:
#   launcher set  -> $launcher -m speechssl.cli.main ARGS
#   nnodes > 1    -> accelerate launch --multi_gpu --num_machines N --machine_rank R --main_process_ip IP
#                    --main_process_port P --num_processes ngpu*N -m speechssl.cli.main ARGS (run it on every machine)
#   ngpu > 1      -> torchrun --standalone --nproc-per-node ngpu -m speechssl.cli.main ARGS
#   otherwise     -> speechssl ARGS
# SPEECHSSL_LAUNCH_DRY_RUN=1 prints the command (one line) instead of running it.

# launch_argv ARGS...: the command as the array LAUNCH_ARGV (returns 1 with a message on bad options).
launch_argv() {
  local n=${nnodes:-1} g=${ngpu:-1} r=${machine_rank:-0}
  LAUNCH_ARGV=()
  if [ -n "${launcher:-}" ]; then
    # shellcheck disable=SC2206
    LAUNCH_ARGV=($launcher -m speechssl.cli.main "$@")
  elif [ "$n" -gt 1 ]; then
    if [ -z "${main_ip:-}" ]; then
      echo "launch: --nnodes $n needs --main-ip (the address of the machine with --machine-rank 0)" >&2
      return 1
    fi
    if [ "$r" -lt 0 ] || [ "$r" -ge "$n" ]; then
      echo "launch: --machine-rank must be in 0..$((n - 1)), got $r" >&2
      return 1
    fi
    [ "$g" -ge 1 ] || g=1
    LAUNCH_ARGV=(accelerate launch --multi_gpu --num_machines "$n" --machine_rank "$r"
                 --main_process_ip "$main_ip" --main_process_port "${main_port:-29500}"
                 --num_processes $((g * n)) -m speechssl.cli.main "$@")
  elif [ "$g" -gt 1 ]; then
    LAUNCH_ARGV=(torchrun --standalone --nproc-per-node "$g" -m speechssl.cli.main "$@")
  else
    LAUNCH_ARGV=(speechssl "$@")
  fi
}

launch() {
  launch_argv "$@" || return 1
  if [ "${SPEECHSSL_LAUNCH_DRY_RUN:-0}" = 1 ]; then
    echo "${LAUNCH_ARGV[*]}"
  else
    "${LAUNCH_ARGV[@]}"
  fi
}

# grad_accum so that world_size x grad_accum matches the reference number of GPUs (same global batch).
accum_for() {  # accum_for REF_GPUS WORLD_SIZE
  local ref=$1 world=$2
  [ "$world" -ge 1 ] || world=1
  echo $(( (ref + world - 1) / world ))
}
