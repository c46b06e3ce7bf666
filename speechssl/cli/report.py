"""``speechssl report EXP_DIR ...``: training-curve PNGs, collapse diagnostics (PNG + the monitor's warnings) and,
for SUPERB experiments, the results table."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechssl.cli.common import EXAMPLES_FORMATTER

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  # curves of one pretraining run -> exp/hubert_iter1/curves.png (+ diagnostics.png when it logged diagnostics)
  speechssl report exp/hubert_iter1
  # several runs overlaid, plus the SUPERB table when a directory holds results.json files
  speechssl report exp/hubert_iter1 exp/hubert_iter2 exp/superb --out exp/report
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="training curves (PNG) and SUPERB result tables for experiment directories",
        description="Draw training curves from EXP/metrics.jsonl (one PNG per experiment and one overlay), the "
                    "collapse diagnostics of pretraining runs (per-layer temporal std / effective rank, masked vs "
                    "prior accuracy; warnings listed) and, when experiment directories hold SUPERB results.json "
                    "files, write the SUPERB table and plots.",
        epilog=EXAMPLES, formatter_class=EXAMPLES_FORMATTER,
    )
    p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="experiment directories")
    p.add_argument("--out", default=None,
                   help="output directory (default: the experiment itself for one, ./report for several)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechssl.train.plots import plot_diagnostics, plot_training_curves, summarize

    dirs = [Path(d) for d in args.exp_dirs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        print(f"speechssl report: not a directory: {', '.join(missing)}")
        return 2
    out = Path(args.out) if args.out else (dirs[0] if len(dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    trained = [d for d in dirs if (d / "metrics.jsonl").is_file()]
    with_results = [d for d in dirs if (d / "results.json").is_file() or any(d.rglob("results.json"))]
    if not trained and not with_results:
        print("speechssl report: no metrics.jsonl or results.json under " + ", ".join(map(str, dirs)))
        return 2
    rows = []
    for d in trained:
        png = plot_training_curves([d], (out if len(dirs) > 1 else d) / (
            f"{d.name}_curves.png" if len(dirs) > 1 else "curves.png"), title=str(d))
        print(f"curves: {png}")
        diag = plot_diagnostics(d, (out if len(dirs) > 1 else d) / (
            f"{d.name}_diagnostics.png" if len(dirs) > 1 else "diagnostics.png"), title=str(d))
        if diag is not None:
            print(f"diagnostics: {diag}")
        _print_warnings(d)
        rows.append(summarize(d))
    if len(trained) > 1:
        print(f"curves: {plot_training_curves(trained, out / 'training_curves.png')}")
    if rows:
        keys = ["exp", "step", "loss"] + sorted({k for r in rows for k in r if k.startswith(("acc", "valid_"))})
        if any("collapse_warnings" in r for r in rows):
            keys.append("collapse_warnings")
        print(" | ".join(keys))
        for r in rows:
            print(" | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys))
    if with_results:
        from speechssl.superb.report import make_report  # written by the SUPERB package; imported on use

        res = make_report([str(d) for d in with_results], str(out))
        if res is not None:
            print(f"SUPERB report: {res}")
    return 0


def _print_warnings(exp_dir: Path, show: int = 2) -> None:
    """The collapse monitor's warnings of a run: how many, and those of the first and last ``show`` evaluations
    that had any (a dead run repeats the same lines at every evaluation)."""
    from speechssl.train.plots import read_warnings

    warned = read_warnings(exp_dir)
    if not warned:
        return
    n = sum(len(w) for _, w in warned)
    print(f"collapse warnings in {exp_dir}: {n} at {len(warned)} evaluations (steps {warned[0][0]}..{warned[-1][0]})")
    picked = warned if len(warned) <= 2 * show else warned[:show] + warned[-show:]
    for i, (step, ws) in enumerate(picked):
        if len(warned) > 2 * show and i == show:
            print("  ...")
        for w in ws:
            print(f"  step {step}: {w}")
