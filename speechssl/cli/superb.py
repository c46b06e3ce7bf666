"""``speechssl superb``: score an upstream on one SUPERB task (ASR, PR, SID, ASV, ER, KS)."""
from __future__ import annotations

import argparse

from speechssl.cli.common import EXAMPLES_FORMATTER, add_experiment_args, experiment_config

EXAMPLES = """examples:
  # speaker identification with a pretrained encoder (frozen, weighted sum of all layers)
  speechssl superb --config conf/superb/sid.yaml --out exp/superb/hubert/sid \\
      --set upstream=exp/hubert_iter2/final --set data.manifest_dir=data/voxceleb1
  # the FBANK baseline on keyword spotting, with a learning-rate sweep
  speechssl superb --config conf/superb/ks.yaml --out exp/superb/fbank/ks --set upstream=fbank \\
      --set "optim.lrs=[1e-4, 1e-3, 1e-2]"
  # ASR with LoRA inside the frozen encoder and prefix beam search at test time
  speechssl superb --config conf/superb/asr.yaml --out exp/superb/hubert_lora/asr \\
      --set upstream=exp/hubert_iter2/final --set upstream_mode=lora --set decoding.name=beam
  # the mini demo's emotion task on one layer only
  speechssl superb --config conf/superb/mini_er.yaml --out exp/superb/fbank/er --set layer=0

outputs: EXP/results.json (task, upstream, upstream_params, split, metric, value, best_lr, dev, layer_weights),
EXP/metrics.jsonl, EXP/config.yaml, EXP/trials/lr-LR/{best.safetensors,summary.json}
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "superb", help="score an upstream on a SUPERB task (asr | pr | sid | asv | er | ks)",
        description="Train a task head on the (frozen by default) upstream's weighted hidden states, pick the "
                    "best-dev checkpoint (and learning rate, with optim.lrs) and score it on the test split(s).",
        epilog=EXAMPLES, formatter_class=EXAMPLES_FORMATTER,
    )
    add_experiment_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechssl.superb.train import SuperbConfig, run_superb

    cfg = experiment_config(SuperbConfig, args)
    results = run_superb(cfg, args.out, resume=args.resume)
    for r in results if isinstance(results, list) else [results]:
        print(f"{r['task']} {r['split']} {r['metric']}={r['value']:.4f} upstream={r['upstream']} "
              f"best_lr={r['best_lr']:g}")
    return 0
