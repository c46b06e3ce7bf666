"""``speechssl pretrain``: self-supervised pretraining (wav2vec2, HuBERT, WavLM, BEST-RQ) with the trainer."""
from __future__ import annotations

import argparse

from speechssl.cli.common import add_experiment_command, experiment_config

EXAMPLES = """examples:
  # HuBERT iteration 1 on MFCC k-means units (labels from `speechssl label`)
  speechssl pretrain --config conf/pretrain/hubert_base_iter1.yaml --out exp/hubert_iter1 \\
      --set data.train=[data/librispeech/cuts_train.jsonl.gz]
  # a short CPU run of the mini demo, overriding steps and batch size
  speechssl pretrain --config conf/pretrain/mini_wav2vec2.yaml --out exp/wav2vec2 \\
      --set trainer.max_steps=50 --set data.max_duration=60
  # as many updates as fit in 20 minutes on this machine (timed before training; recorded in EXP/config.yaml)
  speechssl pretrain --config conf/pretrain/small_hubert.yaml --out exp/small --minutes 20 \
      --set data.train=[exp/small/data/cuts_train_mfcc.jsonl.gz]
  # continue exactly where the last checkpoint left off
  speechssl pretrain --config conf/pretrain/mini_wav2vec2.yaml --out exp/wav2vec2 --resume
  # 8 GPUs (or several nodes) through accelerate / torchrun
  accelerate launch --num_processes 8 -m speechssl.cli.main pretrain --config conf/pretrain/wavlm_base.yaml \\
      --out exp/wavlm --set trainer.precision=bf16

outputs: EXP/config.yaml, EXP/metrics.jsonl, EXP/checkpoints/step-N/, EXP/final/ (speechssl.load_pretrained)
"""


def register(subparsers) -> None:
    p = add_experiment_command(
        subparsers, "pretrain", run, examples=EXAMPLES,
        help="pretrain a speech encoder (wav2vec2 | hubert | wavlm | bestrq)",
        description="Pretrain a self-supervised speech encoder on Lhotse manifests or Shar shards with the "
                    "accelerate trainer (CPU, one GPU, DDP; bf16/fp16; exact --resume).")
    p.add_argument("--minutes", type=float, default=None,
                   help="budget: set trainer.max_steps to the updates that fit in this many minutes of wall time "
                        "on this machine (timed on the run's own batches before training; a --resume keeps the "
                        "steps recorded in OUT/config.yaml)")


def budget_steps(cfg, out: str, minutes: float, resume: bool) -> int:
    """The steps for a ``--minutes`` budget: timed now, or on ``--resume`` the ones the run started with."""
    from pathlib import Path

    import yaml

    from speechssl.train.pretrain import steps_for_budget

    saved = Path(out) / "config.yaml"
    if resume and saved.is_file():
        return int(yaml.safe_load(saved.read_text())["trainer"]["max_steps"])
    return steps_for_budget(cfg, minutes)


def run(args: argparse.Namespace) -> int:
    from speechssl.train.pretrain import PretrainConfig, run_pretrain

    cfg = experiment_config(PretrainConfig, args)
    if args.minutes is not None:
        cfg.trainer.max_steps = budget_steps(cfg, args.out, args.minutes, args.resume)
    logs = run_pretrain(cfg, args.out, resume=args.resume)
    keys = [k for k in ("step", "loss", "acc_masked", "acc", "valid_loss", "valid_acc_masked", "valid_acc") if k in logs]
    print(" ".join(f"{k}={logs[k]:.4g}" if isinstance(logs[k], float) else f"{k}={logs[k]}" for k in keys))
    return 0
