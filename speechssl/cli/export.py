"""``speechssl export MODEL OUT_DIR --format hf|speechssl``: convert any loadable encoder checkpoint."""
from __future__ import annotations

import logging

from speechssl.cli.common import add_command, exits_on
from speechssl.config import ConfigError

EXAMPLES = """examples:
  # a trained model to a Hugging Face directory (transformers.AutoModel.from_pretrained loads it)
  speechssl export exp/hubert_iter2/final exp/hubert_iter2/hf --format hf
  # a fairseq HuBERT checkpoint or an HF directory to a speechssl model directory
  speechssl export hubert_base_ls960.pt models/hubert_base --format speechssl
  speechssl export path/to/hf_wavlm_dir models/wavlm_base
"""

log = logging.getLogger("speechssl.export")


def register(subparsers) -> None:
    p = add_command(
        subparsers, "export", run, examples=EXAMPLES,
        help="convert an encoder checkpoint (speechssl, HF or fairseq) to HF or speechssl format",
        description="Load MODEL (speechssl model dir, experiment dir, Hugging Face dir or fairseq .pt) and write it "
                    "to OUT_DIR. Format 'hf' needs an unpruned CNN wav2vec2/hubert/wavlm encoder.")
    p.add_argument("model", metavar="MODEL", help="model directory or fairseq checkpoint")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    p.add_argument("--format", choices=["hf", "speechssl"], default="speechssl", help="output format")


@exits_on(ConfigError, FileNotFoundError)
def run(args) -> int:
    from speechssl.models.io import export_pretrained, read_checkpoint, _build_and_load

    cfg, sd, extra, meta = read_checkpoint(args.model)
    enc = _build_and_load(cfg, sd, str(args.model))
    parts = None
    if args.format == "speechssl" and extra:
        parts = {}
        for k, v in extra.items():
            head, _, rest = k.replace("/", ".").partition(".")
            parts.setdefault(head, {})[rest or head] = v
    export_pretrained(enc, args.out_dir, format=args.format, meta={**meta, "exported_from": str(args.model)},
                      parts=parts)
    n = sum(p.numel() for p in enc.parameters())
    log.info("wrote %s (%s format, %s, %d layers, %.1fM params)", args.out_dir, args.format, cfg.model_type,
             cfg.num_layers, n / 1e6)
    return 0
