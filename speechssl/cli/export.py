"""``speechssl export MODEL OUT_DIR --format hf|speechssl|onnx [--quantize int8] [--layers 6,9]``: convert any
loadable encoder checkpoint, for interchange (hf), for speechssl (speechssl) or for deployment (onnx, int8)."""
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
  # deployment: ONNX (dynamic batch and length; all hidden states, or only layers 6 and 9), int8 ONNX,
  # and torch dynamic int8 in the speechssl format (load_pretrained and SUPERB load it)
  speechssl export exp/dphubert/final deploy/dphubert_onnx --format onnx
  speechssl export exp/dphubert/final deploy/dphubert_l6_9 --format onnx --layers 6,9 --quantize int8
  speechssl export exp/dphubert/final deploy/dphubert_int8 --format speechssl --quantize int8
"""

log = logging.getLogger("speechssl.export")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--layers takes comma-separated hidden-state indices such as 6,9, got {text!r}") from None


def register(subparsers) -> None:
    p = add_command(
        subparsers, "export", run, examples=EXAMPLES,
        help="convert an encoder checkpoint (speechssl, HF or fairseq) to HF, speechssl or ONNX, optionally int8",
        description="Load MODEL (speechssl model dir, experiment dir, Hugging Face dir or fairseq .pt) and write it "
                    "to OUT_DIR. Format 'hf' needs an unpruned CNN wav2vec2/hubert/wavlm encoder; 'onnx' takes "
                    "every encoder (needs the deploy extra: pip install onnx onnxruntime).")
    p.add_argument("model", metavar="MODEL", help="model directory or fairseq checkpoint")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    p.add_argument("--format", choices=["hf", "speechssl", "onnx"], default="speechssl", help="output format")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="dynamic int8 of the linear layers: onnxruntime's for --format onnx, torch's "
                        "(torch.ao.quantization.quantize_dynamic) for --format speechssl")
    p.add_argument("--layers", type=_layer_list, default=None, metavar="L1,L2",
                   help="--format onnx: hidden states to output (0 = input of the first layer, N = output of "
                        "layer N); default all")
    p.add_argument("--opset", type=int, default=None, help="--format onnx: ONNX opset (default 17)")


def _check_args(args) -> None:
    if args.quantize and args.format == "hf":
        raise ConfigError("--quantize int8 writes --format speechssl (torch int8) or --format onnx; transformers "
                          "has no loader for an int8 speechssl encoder")
    if args.format != "onnx" and (args.layers is not None or args.opset is not None):
        raise ConfigError("--layers and --opset are options of --format onnx")


@exits_on(ConfigError, FileNotFoundError, ValueError, ModuleNotFoundError)
def run(args) -> int:
    from speechssl.models.io import _build_and_load, export_pretrained, read_checkpoint

    _check_args(args)
    cfg, sd, extra, meta = read_checkpoint(args.model)
    enc = _build_and_load(cfg, sd, str(args.model)).eval()
    meta = {**meta, "exported_from": str(args.model)}
    if args.format == "onnx":
        from speechssl.deploy import export_onnx
        from speechssl.deploy.onnx_export import DEFAULT_OPSET

        export_onnx(enc, args.out_dir, layers=args.layers, quantize=args.quantize,
                    opset=args.opset or DEFAULT_OPSET, meta=meta)
    else:
        parts = None
        if args.format == "speechssl" and extra:
            parts = {}
            for k, v in extra.items():
                head, _, rest = k.replace("/", ".").partition(".")
                parts.setdefault(head, {})[rest or head] = v
        export_pretrained(enc, args.out_dir, format=args.format, meta=meta, parts=parts, quantize=args.quantize)
    n = sum(p.numel() for p in enc.parameters())
    log.info("wrote %s (%s format%s, %s, %d layers, %.1fM params)", args.out_dir, args.format,
             f", {args.quantize}" if args.quantize else "", cfg.model_type, cfg.num_layers, n / 1e6)
    return 0
