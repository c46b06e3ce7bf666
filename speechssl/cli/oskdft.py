"""``speechssl oskdft``: one-step distillation and speaker fine-tuning of a teacher (OS-KDFT)."""
from __future__ import annotations

from speechssl.cli.common import add_experiment_command, experiment_config

EXAMPLES = """examples:
  # the mini demo: 2 distilled + 1 speaker-tuned layers of a mini HuBERT, x-vector head, AAM-softmax
  speechssl oskdft --config conf/oskdft/mini.yaml --out exp/oskdft --set teacher=exp/hubert_iter2/final
  # VoxCeleb1 dev with a HuBERT Base teacher
  speechssl oskdft --config conf/oskdft/voxceleb1.yaml --out exp/oskdft_vox1 --set teacher=/models/hubert-base-ls960
  # score the exported model on ASV trials (cosine, EER)
  python -m speechssl.superb.embeddings --model exp/oskdft/final --cuts data/mini/cuts_asv_test.jsonl.gz \\
      --trials data/mini/asv_trials.txt --out exp/oskdft/asv

Writes EXP/config.yaml, EXP/metrics.jsonl (loss, kd_loss, ft_loss, spk_acc, ft_weight), EXP/checkpoints/ and
EXP/final/ (the student encoder as a model directory plus speaker_head.safetensors: a speaker embedding extractor).
"""


def register(subparsers) -> None:
    add_experiment_command(
        subparsers, "oskdft", run, examples=EXAMPLES,
        help="distil a teacher and fine-tune it for speaker verification in one run (OS-KDFT)",
        description="OS-KDFT: the student's lower layers are distilled from a frozen teacher while its upper "
                    "layers and an x-vector head train on speaker labels with AAM-softmax.")


def run(args) -> int:
    from speechssl.compress.oskdft import OskdftConfig, run_oskdft

    cfg = experiment_config(OskdftConfig, args)
    logs = run_oskdft(cfg, args.out, resume=args.resume)
    print(f"oskdft: done, last loss {logs.get('loss', float('nan')):.4f}; model in {args.out}/final")
    return 0
