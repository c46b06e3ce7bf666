"""Benchmark: does ContentVec drop speaker information against HuBERT at the same steps, keeping phone recognition?

The claim (ContentVec, Qian et al. 2022): the speaker change, the speaker-conditioned predictor and the
contrastive loss remove speaker information from the representation while content stays. Measured on the mini
corpus (``egs/mini``): for each seed, HuBERT and ContentVec are trained with the same steps, data (the pool's
MFCC k-means units), masking, optimiser and starting point, then scored with the SUPERB mini tasks SID (speaker
identification accuracy: a pooled linear probe over the weighted layer sum) and PR (phone error rate, CTC). The
HuBERT side is ``conf/pretrain/small_hubert.yaml`` without its input reconstruction (ContentVec cannot use it), so
the two differ only by ContentVec's additions. Expected: SID accuracy drops, PER within 10% relative.

    python bench/contentvec.py                               # 1 seed, 150 updates each, from the demo's HuBERT
    python bench/contentvec.py --steps 40 --max-duration 12  # what fits a shared 2-core machine
    python bench/contentvec.py --seeds 0 1 2 --steps 300 --init none   # from scratch

Needs the demo's corpus and units (``egs/mini/run.sh`` stages 0-3). Writes ``--out/contentvec.json`` and prints a
table; the FBANK and random-init rows of the demo's SUPERB table (same task configs) are the reference points.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "egs" / "mini"
CONFIGS = {"hubert": ROOT / "conf/pretrain/small_hubert.yaml", "contentvec": ROOT / "conf/pretrain/contentvec.yaml"}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=MINI, check=True)


def pretrain(method: str, seed: int, args, out: Path) -> Path:
    """Train one model; returns its final/ directory (kept when it exists: re-running the bench resumes)."""
    exp = out / f"{method}_s{seed}"
    if (exp / "final" / "model.safetensors").is_file():
        return exp / "final"
    cmd = [sys.executable, "-m", "speechssl.cli.main", "pretrain", "--config", str(CONFIGS[method]), "--out", str(exp),
           "--set", f"data.train=[{args.units}]", "--set", f"trainer.max_steps={args.steps}",
           "--set", f"trainer.seed={seed}", "--set", "trainer.progress=false", "--set", "trainer.eval_every=0",
           "--set", f"trainer.ckpt_every={args.steps}", "--set", f"data.max_duration={args.max_duration}",
           "--overwrite"]
    if args.init != "none":
        cmd += ["--set", f"model.init_from={args.init}"]
    if method == "hubert":
        cmd += ["--set", "objective.kwargs.recon_weight=0.0"]
    else:
        cmd += ["--set", f"objective.kwargs.ctr_ramp_steps={args.steps}"]
    _run(cmd)
    return exp / "final"


def superb(model: Path, name: str, out: Path) -> dict[str, float]:
    """SUPERB mini SID accuracy and PR PER of ``model``."""
    exp = out / "superb" / name
    results = {t: exp / t / "results.json" for t in ("sid", "pr")}
    if not all(p.is_file() for p in results.values()):
        _run([sys.executable, "-m", "speechssl.cli.main", "superb", "--out", str(exp),
              "--config", str(ROOT / "conf/superb/mini_sid.yaml"), "--config", str(ROOT / "conf/superb/mini_pr.yaml"),
              "--set", f"upstream={model}", "--set", f"data.manifest_dir={MINI / 'data' / 'mini'}",
              "--set", "trainer.progress=false", "--overwrite"])
    return {t: json.loads(p.read_text())["value"] for t, p in results.items()}


def summarise(scores: dict[str, list[dict]]) -> dict:
    """Means over seeds and ContentVec's change against HuBERT (relative)."""
    mean = {m: {t: statistics.mean(s[t] for s in runs) for t in ("sid", "pr")} for m, runs in scores.items()}
    h, c = mean["hubert"], mean["contentvec"]
    return {"per_seed": scores, "mean": mean,
            "sid_drop_points": 100 * (h["sid"] - c["sid"]),
            "pr_relative_change": (c["pr"] - h["pr"]) / h["pr"],
            "speaker_drop": c["sid"] < h["sid"], "phones_within_10pct": (c["pr"] - h["pr"]) / h["pr"] <= 0.10}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--max-duration", type=float, default=24.0, help="seconds of audio per batch (data.max_duration)")
    p.add_argument("--init", default=str(MINI / "exp/hubert_small/final"),
                   help="starting encoder for both (a final/ directory), or 'none' for random init")
    p.add_argument("--units", default=str(MINI / "exp/hubert_small/data/cuts_pretrain_mfcc.jsonl.gz"))
    p.add_argument("--out", default=str(ROOT / "bench/out/contentvec"))
    args = p.parse_args()
    out = Path(args.out).resolve()
    scores: dict[str, list[dict]] = {"hubert": [], "contentvec": []}
    for seed in args.seeds:
        for method in scores:
            scores[method].append(superb(pretrain(method, seed, args, out), f"{method}_s{seed}", out))
    report = {"steps": args.steps, "max_duration": args.max_duration, "init": args.init, "seeds": args.seeds, **summarise(scores)}
    (out / "contentvec.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n| model | SID acc % | PR PER % |  ({args.steps} updates, seeds {args.seeds}, init {args.init})")
    print("|---|---|---|")
    for m, v in report["mean"].items():
        print(f"| {m} | {100 * v['sid']:.2f} | {100 * v['pr']:.2f} |")
    print(f"SID drop {report['sid_drop_points']:.2f} points; PER change {100 * report['pr_relative_change']:+.1f}% "
          f"relative -> speaker drop: {report['speaker_drop']}, phones within 10%: {report['phones_within_10pct']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
