"""``speechssl profile``: parameters, analytic MACs and CPU real-time factor of one or more models."""
from __future__ import annotations

from pathlib import Path

from speechssl.cli.common import EXAMPLES_FORMATTER

EXAMPLES = """examples:
  speechssl profile exp/hubert_iter2/final exp/distilhubert/final exp/dphubert/final --out exp/profile
  speechssl profile preset:hubert_base exp/dphubert/final --threads 4 --seconds 10
  speechssl profile /models/hubert-base-ls960 --no-timing          # params and MACs only

The first model is the reference for the ratio columns. Protocol for the real-time factor: CPU, --threads
threads, batch 1, --seconds of audio, --warmup untimed runs, median of --repeats timed runs, --dtype.
With --out: profile.md (table), profile.json and structure.png (kept heads and FFN units per layer).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="params, MACs and real-time factor of models (teacher vs students)",
        description="Profile encoders: backbone parameters, analytic MACs for a fixed duration, and CPU "
                    "real-time factor under a fixed protocol.",
        epilog=EXAMPLES, formatter_class=EXAMPLES_FORMATTER)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model directory, HF directory, fairseq .pt, or preset:NAME (random weights)")
    p.add_argument("--names", nargs="*", default=None, help="display names (default: the paths)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio duration for MACs and timing (default 10)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for timing (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up forwards (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards; the median is reported (default 5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights/input dtype")
    p.add_argument("--no-timing", action="store_true", help="skip the real-time factor")
    p.add_argument("--out", default=None, help="directory for profile.md, profile.json and structure.png")
    p.set_defaults(func=run)


def _model_name(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name == "final" else (p.name or path)


def run(args) -> int:
    from speechssl.compress.distill import load_teacher
    from speechssl.compress.profile import format_table, plot_structure, profile_models
    from speechssl.utils.io import atomic_write_json, atomic_write_text

    names = args.names or [_model_name(m) for m in args.models]
    if len(names) != len(args.models):
        raise SystemExit(f"speechssl profile: --names has {len(names)} entries for {len(args.models)} models")
    models = {n: load_teacher(m) for n, m in zip(names, args.models)}
    results = profile_models(models, seconds=args.seconds, threads=args.threads, warmup=args.warmup,
                             repeats=args.repeats, dtype=args.dtype, timing=not args.no_timing)
    table = format_table(results)
    print(table)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / "profile.md", table + "\n")
        atomic_write_json(out / "profile.json", [r.to_dict() for r in results])
        png = plot_structure(results, out / "structure.png")
        print(f"wrote {out / 'profile.md'}, {out / 'profile.json'}, {png}")
    return 0
