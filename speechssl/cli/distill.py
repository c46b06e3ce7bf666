"""``speechssl distill``: DistilHuBERT / layer-to-layer distillation of a pretrained teacher."""
from __future__ import annotations

from speechssl.cli.common import add_experiment_command, experiment_config

EXAMPLES = """examples:
  # DistilHuBERT: 2 layers copied from the teacher, heads predicting teacher layers 4/8/12
  speechssl distill --config conf/distill/distilhubert.yaml --out exp/distilhubert \\
      --set teacher=exp/hubert_iter2/final
  # a Hugging Face or fairseq teacher, 4 student layers, layer-to-layer maps instead of heads
  speechssl distill --config conf/distill/distilhubert.yaml --out exp/distil4 --set teacher=/models/hubert-base-ls960 \\
      --set student.num_layers=4 --set loss.method=layers
  speechssl distill --config conf/distill/mini_distilhubert.yaml --out exp/distilhubert \\
      --set teacher=exp/hubert_iter2/final --resume

Writes EXP/config.yaml, EXP/metrics.jsonl (loss, l1_J, cos_J per target layer), EXP/checkpoints/ and
EXP/final/ (a model directory for speechssl.load_pretrained, usable as a SUPERB upstream).
"""


def register(subparsers) -> None:
    add_experiment_command(
        subparsers, "distill", run, examples=EXAMPLES,
        help="distil a teacher into a smaller student (DistilHuBERT, layer-to-layer)",
        description="Distil a frozen teacher (any load_pretrained path) into a student built from its front end "
                    "and first layers; L1 + cosine loss over valid frames.")


def run(args) -> int:
    from speechssl.compress.distill import DistillConfig, run_distill

    cfg = experiment_config(DistillConfig, args)
    logs = run_distill(cfg, args.out, resume=args.resume)
    print(f"distill: done, last loss {logs.get('loss', float('nan')):.4f}; model in {args.out}/final")
    return 0
