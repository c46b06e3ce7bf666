"""``speechssl pretrain``: self-supervised pretraining (wav2vec2, HuBERT, WavLM, BEST-RQ) with the trainer."""
from __future__ import annotations

import argparse

from speechssl.cli.common import EXAMPLES_FORMATTER, add_experiment_args, experiment_config

EXAMPLES = """examples:
  # HuBERT iteration 1 on MFCC k-means units (labels from `speechssl label`)
  speechssl pretrain --config conf/pretrain/hubert_base_iter1.yaml --out exp/hubert_iter1 \\
      --set data.train=[data/librispeech/cuts_train.jsonl.gz]
  # a short CPU run of the mini demo, overriding steps and batch size
  speechssl pretrain --config conf/pretrain/mini_wav2vec2.yaml --out exp/wav2vec2 \\
      --set trainer.max_steps=50 --set data.max_duration=60
  # continue exactly where the last checkpoint left off
  speechssl pretrain --config conf/pretrain/mini_wav2vec2.yaml --out exp/wav2vec2 --resume
  # 8 GPUs (or several nodes) through accelerate / torchrun
  accelerate launch --num_processes 8 -m speechssl.cli.main pretrain --config conf/pretrain/wavlm_base.yaml \\
      --out exp/wavlm --set trainer.precision=bf16

outputs: EXP/config.yaml, EXP/metrics.jsonl, EXP/checkpoints/step-N/, EXP/final/ (speechssl.load_pretrained)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a speech encoder (wav2vec2 | hubert | wavlm | bestrq)",
        description="Pretrain a self-supervised speech encoder on Lhotse manifests or Shar shards with the "
                    "accelerate trainer (CPU, one GPU, DDP; bf16/fp16; exact --resume).",
        epilog=EXAMPLES, formatter_class=EXAMPLES_FORMATTER,
    )
    add_experiment_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechssl.train.pretrain import PretrainConfig, run_pretrain

    cfg = experiment_config(PretrainConfig, args)
    logs = run_pretrain(cfg, args.out, resume=args.resume)
    keys = [k for k in ("step", "loss", "acc_masked", "acc", "valid_loss", "valid_acc_masked", "valid_acc") if k in logs]
    print(" ".join(f"{k}={logs[k]:.4g}" if isinstance(logs[k], float) else f"{k}={logs[k]}" for k in keys))
    return 0
