"""``speechssl superb``: score an upstream on SUPERB tasks (ASR, PR, SID, ASV, ER, KS)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from speechssl.cli.common import EXAMPLES_FORMATTER

EXAMPLES = """upstream specs (config key upstream): fbank | mfcc | a model path (speechssl, HF or fairseq .pt) |
random:PRESET_OR_MODEL (that architecture with freshly initialised weights, seeded by config key trainer.seed)

config sections besides the task's: optim (name, lr, betas, eps, weight_decay), sweep (lrs, upstream_lr_scale),
trainer (max_steps, eval_every, log_every, clip_norm, precision fp32|bf16|fp16, device auto|cpu|cuda, seed,
progress, num_threads)

examples:
  # speaker identification with a pretrained encoder (frozen, weighted sum of all layers)
  speechssl superb --config conf/superb/sid.yaml --out exp/superb/hubert/sid \\
      --set upstream=exp/hubert_iter2/final --set data.manifest_dir=data/voxceleb1
  # the FBANK baseline on keyword spotting, with a learning-rate sweep
  speechssl superb --config conf/superb/ks.yaml --out exp/superb/fbank/ks --set upstream=fbank \\
      --set "sweep.lrs=[1e-4, 1e-3, 1e-2]"
  # the random-init control row: the same architecture as exp/hubert_iter2/final with fresh weights drawn from
  # trainer.seed (reported as random_hubert_iter2; random:tiny_hubert or random:conf/model/X.yaml work too)
  speechssl superb --config conf/superb/sid.yaml --out exp/superb/random_hubert_iter2/sid \\
      --set upstream=random:exp/hubert_iter2/final --set data.manifest_dir=data/voxceleb1
  # ASR with LoRA inside the frozen encoder and prefix beam search at test time
  speechssl superb --config conf/superb/asr.yaml --out exp/superb/hubert_lora/asr \\
      --set upstream=exp/hubert_iter2/final --set upstream_mode=lora --set decoding.name=beam
  # bf16 autocast on a GPU, fewer steps
  speechssl superb --config conf/superb/ks.yaml --out exp/superb/hubert/ks --set upstream=exp/hubert_iter2/final \\
      --set trainer.precision=bf16 --set trainer.max_steps=20000
  # several tasks in one process (the upstream loads once, shared utterances are encoded once):
  # with more than one --config, each task writes to OUT/TASK
  speechssl superb --config conf/superb/mini_sid.yaml --config conf/superb/mini_ks.yaml \\
      --out exp/superb/fbank --set upstream=fbank

outputs: EXP/results.json (task, upstream, upstream_params, split, metric, value, best_lr, dev, layer_weights),
EXP/metrics.jsonl, EXP/config.yaml, EXP/trials/lr-LR/{best.safetensors,summary.json}
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "superb", help="score an upstream on a SUPERB task (asr | pr | sid | asv | er | ks)",
        description="Train a task head on the (frozen by default) upstream's weighted hidden states, pick the "
                    "best-dev checkpoint (and learning rate, with sweep.lrs) and score it on the test split(s).",
        epilog=EXAMPLES, formatter_class=EXAMPLES_FORMATTER,
    )
    p.add_argument("--config", required=True, action="append",
                   help="YAML config (conf/superb/TASK.yaml); repeat it to run several tasks, each into OUT/TASK")
    p.add_argument("--out", required=True, help="experiment directory to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every config, e.g. --set upstream=exp/x/final (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished learning-rate trials in --out (an earlier run there is refused without "
                        "--resume or --overwrite)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechssl.cli.common import check_inputs, claim_out, out_dir_for
    from speechssl.config import load_config
    from speechssl.superb.train import SuperbConfig, run_superb

    cfgs = [load_config(SuperbConfig, c, args.overrides) for c in args.config]  # all config errors up front
    for cfg in cfgs:
        check_inputs(cfg)  # upstream and manifest directory present, before any model loads
    main_rank = int(os.environ.get("RANK", "0")) == 0  # several processes (accelerate launch / torchrun)
    if not main_rank:
        logging.getLogger("speechssl").setLevel(logging.WARNING)
    tasks = [c.task for c in cfgs]
    if len(cfgs) > 1 and len(set(tasks)) != len(tasks):
        print(f"speechssl superb: several configs for the same task ({tasks}); run them separately")
        return 2
    outs = [Path(args.out) / c.task if len(cfgs) > 1 else Path(args.out) for c in cfgs]
    guards = [out_dir_for(args, out) for out in outs]  # every task directory checked before any is cleared
    claim_out(args)  # --out itself (with several configs: an earlier single-task run there)
    for guard in guards:
        guard.claim()
    pool: dict = {}
    for cfg, out in zip(cfgs, outs):
        results = run_superb(cfg, out, resume=args.resume, source_pool=pool)
        for r in (results if isinstance(results, list) else [results]) if main_rank else []:
            print(f"{r['task']} {r['split']} {r['metric']}={r['value']:.4f} upstream={r['upstream']} "
                  f"best_lr={r['best_lr']:g}")
    return 0
