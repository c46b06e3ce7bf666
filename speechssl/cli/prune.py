"""``speechssl prune``: DPHuBERT joint distillation + structured pruning, materialisation, final distillation."""
from __future__ import annotations

from speechssl.cli.common import add_experiment_command, experiment_config

EXAMPLES = """examples:
  speechssl prune --config conf/prune/dphubert.yaml --out exp/dphubert --set teacher=exp/hubert_iter2/final
  speechssl prune --config conf/prune/dphubert.yaml --out exp/dphubert_s80 --set teacher=/models/wavlm-base-plus \\
      --set prune.target=0.8 --set prune.groups=[heads,attn,ffn_units,ffn]
  speechssl prune --config conf/prune/mini_dphubert.yaml --out exp/dphubert --set teacher=exp/hubert_iter2/final --resume

Stage 1 (EXP/stage1/) trains HardConcrete gates on CNN channels, heads, attention blocks, FFN units and FFN
blocks with distillation + a Lagrangian sparsity term; the gates are then materialised into EXP/pruned/
(prune_summary.json lists kept heads and FFN units per layer); stage 2 distils the pruned model
(finetune.max_steps, EXP/metrics.jsonl, EXP/checkpoints/) and writes EXP/final/.
"""


def register(subparsers) -> None:
    add_experiment_command(
        subparsers, "prune", run, examples=EXAMPLES,
        help="structured pruning with distillation (DPHuBERT) into a smaller dense model",
        description="Jointly distil and prune a teacher to a target sparsity, materialise the kept units, "
                    "then distil the pruned model.")


def run(args) -> int:
    from speechssl.compress.prune import PruneConfig, run_prune

    cfg = experiment_config(PruneConfig, args)
    logs = run_prune(cfg, args.out, resume=args.resume)
    print(f"prune: done, {logs.get('pruned_params', 0) / 1e6:.2f}M params (sparsity "
          f"{logs.get('pruned_sparsity', float('nan')):.3f}); model in {args.out}/final")
    return 0
