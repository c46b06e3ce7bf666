# Shared by the training recipes (source it BEFORE lib/stages.sh, which then parses the options below too): run a
# speechssl training command on 1 process or many, and continue a run that has started.
#   launch pretrain --config ... --out ...
#   run_training pretrain OUT --config ...       (launch with --out OUT, and --resume when OUT holds a started run)
# Options (a recipe may give other defaults by setting them after sourcing this file):
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

ngpu=1                      # processes per machine
nnodes=1                    # machines; with > 1 run the recipe on each with its --machine-rank
machine_rank=0
main_ip=""                  # address of machine rank 0 (required when nnodes > 1)
main_port=29500
launcher=""                 # a launcher prefix instead (see recipes/lib/launch.sh)
OPTION_FILES+=("${BASH_SOURCE[0]}")   # lib/stages.sh lists these options in --help

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

# True when DIR holds a run to continue: a step-N checkpoint, or a prune run's stage-1 checkpoint or pruned model.
started_run() {
  local p
  for p in "$1"/checkpoints/step-* "$1"/stage1/checkpoints/step-* "$1/pruned"; do
    [ -e "$p" ] && return 0
  done
  return 1
}

# run_training COMMAND OUT ARGS...: launch COMMAND --out OUT ARGS, resuming when OUT holds a started run.
run_training() {
  local cmd=$1 out=$2
  shift 2
  local resume=()
  started_run "$out" && resume=(--resume)
  launch "$cmd" --out "$out" "${resume[@]}" "$@"
}
