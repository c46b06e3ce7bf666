"""``speechssl analyze``: what each layer knows (phone probe, speaker probe, k-means unit quality), for several
models on one plot."""
from __future__ import annotations

import logging
from pathlib import Path

from speechssl.cli.common import add_command, check_model_path, exits_on
from speechssl.config import ExperimentError

EXAMPLES = """examples:
  # the mini corpus: the small HuBERT, its random-init control and FBANK as a reference line
  speechssl analyze --model exp/hubert_small/final --model random:exp/hubert_small/final --model fbank \\
      --cuts data/mini/cuts_sid_train.jsonl.gz --out exp/analyze --n-clusters 50
  # explicit held-out cuts, three seeds (k-means init, frame subsets, random-init weights), layers 3..6 only
  speechssl analyze --model exp/hubert/iter1/final --cuts data/ls/cuts_train_clean_100.jsonl.gz \\
      --eval-cuts data/ls/cuts_dev_clean.jsonl.gz --max-utts 1000 --seeds 0,1,2 --layers 3,4,5,6 --out exp/an
  # the layer with the highest PNMI, printed alone (the HuBERT recipe's --km2-layer auto)
  speechssl analyze --model exp/hubert/iter1/final --cuts ... --out exp/hubert/analyze_iter1 --select pnmi

Writes OUT/analysis.json (rows per model, seed and layer; a table of means over seeds; the best layer per
measure), OUT/analysis.md and OUT/analysis.png (one panel per measure over layers, one curve per model).
Phone measures need phone alignments on the cuts (supervision.alignment["phone"], as the mini corpus has);
the speaker probe needs supervision speakers with at least two utterances each.
"""

log = logging.getLogger("speechssl.analyze")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def register(subparsers) -> None:
    p = add_command(
        subparsers, "analyze", run, examples=EXAMPLES,
        help="per-layer phone/speaker probes and k-means unit quality (PNMI, purities)",
        description="For every hidden state of each model: a linear frame-level phone probe, a linear speaker probe "
                    "on mean-pooled states, and cluster purity, phone purity and PNMI (HuBERT paper) of k-means "
                    "units of the layer; fitted on training cuts, scored on held-out cuts.")
    p.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="model path, random:PRESET_OR_MODEL (fresh weights: the control) or fbank / mfcc "
                        "(a reference line); repeat for several models on one plot")
    p.add_argument("--cuts", required=True, help="cut manifest (jsonl.gz) with phone alignments and speakers")
    p.add_argument("--eval-cuts", default=None,
                   help="held-out cut manifest (default: --eval-fraction of each speaker's cuts of --cuts)")
    p.add_argument("--out", required=True, help="directory for analysis.json, analysis.md and analysis.png")
    p.add_argument("--n-clusters", type=int, default=100, help="k-means K per layer (default 100)")
    p.add_argument("--eval-fraction", type=float, default=0.25,
                   help="share of each speaker's cuts held out when there is no --eval-cuts (default 0.25)")
    p.add_argument("--max-utts", type=int, default=0, help="analyse a seeded random subset of this many cuts (with --eval-cuts: of each manifest; "
                        "0: all)")
    p.add_argument("--max-frames", type=int, default=50000,
                   help="training frames the phone probe and k-means are fitted on (default 50000)")
    p.add_argument("--layers", type=_ints, default=None, metavar="I,J,...",
                   help="hidden-state indices to analyse (default all; 0 = transformer input)")
    p.add_argument("--seeds", type=_ints, default=[0], metavar="S,T,...",
                   help="seeds: k-means init, frame subsets, random-init weights (default 0); the table and "
                        "plot show mean and std over them")
    p.add_argument("--l2", type=float, default=1.0, help="probe L2 penalty (scikit-learn C = 1 / l2)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--select", default=None, metavar="MEASURE",
                   help="print only the best layer of the (single) encoder by this measure (e.g. pnmi)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_models(specs: list[str]) -> None:
    from speechssl.cli.common import NOT_PATH_PREFIXES, NOT_PATHS

    for spec in specs:
        if spec not in NOT_PATHS and not spec.startswith(NOT_PATH_PREFIXES):
            check_model_path(spec, "--model", ExperimentError, also=", or fbank, mfcc, random:PRESET_OR_MODEL")


def markdown_table(report: dict) -> str:
    """The report's table (means over seeds) as Markdown, one row per model and layer."""
    from speechssl.analysis import MEASURES

    head = "| model | layer | " + " | ".join(MEASURES) + " |"
    lines = [head, "|" + "---|" * (len(MEASURES) + 2)]
    for e in report["table"]:
        vals = ["-" if e[m] is None else f"{e[m]:.3f}" for m in MEASURES]
        lines.append(f"| {e['model']} | {e['layer']} | " + " | ".join(vals) + " |")
    chance = [f"{m['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in m["chance"].items() if v is not None)
              for m in report["models"]]
    return "\n".join(lines) + "\n\nchance (most frequent training class): " + "; ".join(chance) + "\n"


@exits_on(ValueError, FileNotFoundError, KeyError)
def run(args) -> int:
    from speechssl.analysis import AnalyzeSettings, analyze, best_layer, plot_layers
    from speechssl.utils.io import atomic_write_json, atomic_write_text

    _check_models(args.model)
    if args.select is not None:
        from speechssl.analysis import MEASURES

        if args.select not in MEASURES:
            raise ValueError(f"--select {args.select}: choose one of {', '.join(MEASURES)}")
    settings = AnalyzeSettings(n_clusters=args.n_clusters, eval_fraction=args.eval_fraction, max_utts=args.max_utts,
                               max_frames=args.max_frames, l2=args.l2, seeds=args.seeds, layers=args.layers,
                               device=args.device, progress=not args.no_progress)
    report = analyze(args.model, args.cuts, args.eval_cuts, settings)
    out = Path(args.out)
    atomic_write_json(out / "analysis.json", report)
    table = markdown_table(report)
    atomic_write_text(out / "analysis.md", table)
    png = plot_layers(report, out / "analysis.png")
    log.info("wrote %s, %s%s", out / "analysis.json", out / "analysis.md", f", {png}" if png else "")
    if args.select is not None:
        print(best_layer(report, args.select))
    else:
        print(table, end="")
    return 0
