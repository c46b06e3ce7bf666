"""Benchmark: time to quality. Small-data HuBERT pretraining at several CPU budgets, scored SUPERB-style.

For each front end (the recipe's 20 ms fbank front end, and the raw-waveform CNN under the same transformer), each
budget in minutes and each pretraining seed, this runs the small-data recipe (``recipes/ssl/small.sh``: MFCC
k-means units once, then ``speechssl pretrain`` with ``conf/pretrain/small_hubert.yaml``) and scores the model on
the mini corpus's PR, KS, SID and ER tasks with the demo's head configs (``conf/superb/mini_*.yaml``). The same
tasks are scored on FBANK and on a random-init encoder of the same architecture (``random:MODEL``, one per
seed): the two baselines pretraining has to beat. Everything runs in the same invocation on the same machine.

The number of updates for a budget is timed once per front end (``speechssl pretrain --minutes``'s probe) and
then used for every seed, so seeds differ only in their randomness. Outputs in ``--out``: ``results.json``,
``quality.md`` (mean +- standard deviation over seeds) and ``quality.png`` (score against pretraining minutes,
FBANK and random init as horizontal lines).

    python bench/quality.py                                   # budgets 2 5 10 min, 3 seeds, both front ends
    python bench/quality.py --budgets 1 3 --seeds 0 1 2 --frontends fbank
    python bench/quality.py --quick                           # 0.3 min, one seed: checks that it runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWER_IS_BETTER = {"pr": True, "asr": True, "asv": True}
METRIC = {"pr": "PER%", "asr": "WER%", "ks": "acc%", "sid": "acc%", "er": "acc%", "asv": "EER%"}
# the CNN side: same transformer, the tiny raw-waveform CNN (20 ms frames) instead of the fbank front end, and
# the same loss less the input reconstruction
CNN_OVERRIDES = ["model.overrides.frontend=cnn", "model.overrides.conv_layers=[[128,10,5],[128,3,2],[128,3,2],"
                 "[128,3,2],[128,3,2],[128,2,2],[128,2,2]]", "model.overrides.conv_bias=false",
                 "model.overrides.input_norm=utterance", "objective.kwargs.feature_pen_weight=10.0",
                 # the input reconstruction reads the fbank front end's input frames: not available to the CNN
                 "objective.kwargs.recon_weight=0.0"]


def speechssl(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "speechssl.cli.main", *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def units(data: Path, split: str, out: Path, log: Path) -> Path:
    """MFCC k-means units on the pretraining split, once (stages 1-2 of recipes/ssl/small.sh)."""
    import os

    labelled = out / "data" / f"cuts_{split}_mfcc.jsonl.gz"
    if not labelled.exists():
        # the recipe calls `speechssl`: the one installed beside this interpreter
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        subprocess.run(["bash", str(ROOT / "recipes/ssl/small.sh"), "--stage", "1", "--stop-stage", "2",
                        "--data", str(data), "--train-split", split, "--exp", str(out)],
                       check=True, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)
    return labelled


def steps_for(labelled: Path, frontend: str, minutes: float) -> int:
    from speechssl.config import load_config
    from speechssl.train.pretrain import PretrainConfig, steps_for_budget

    over = [f"data.train=[{labelled}]", "trainer.num_workers=1"]
    over += CNN_OVERRIDES if frontend == "cnn" else []
    cfg = load_config(PretrainConfig, ROOT / "conf/pretrain/small_hubert.yaml", over)
    return steps_for_budget(cfg, minutes)


def done_steps(exp: Path) -> int | None:
    """The steps a finished run was given (its config.yaml), so a rerun reports what was trained."""
    import yaml

    cfg = exp / "config.yaml"
    if (exp / "final").exists() and cfg.is_file():
        return int(yaml.safe_load(cfg.read_text())["trainer"]["max_steps"])
    return None


def scores(results_dir: Path, tasks: list[str]) -> dict[str, float]:
    """{task: value in % } from the results.json files ``speechssl superb`` wrote."""
    out = {}
    for task in tasks:
        res = json.loads((results_dir / task / "results.json").read_text())
        rows = res if isinstance(res, list) else res.get("results", [res])
        out[task] = 100.0 * float(rows[0]["value"])
    return out


def superb(upstream: str, out: Path, tasks: list[str], data: Path, seed: int, log: Path) -> dict[str, float]:
    if not (out / tasks[-1] / "results.json").exists():
        args = ["superb", "--out", str(out), "--overwrite", "--set", f"upstream={upstream}", "--set",
                f"data.manifest_dir={data}", "--set", "trainer.progress=false", "--set",
                f"trainer.seed={seed}"]
        if "asv" in tasks:
            args += ["--set", f"data.trials={data / 'asv_trials.txt'}"]
        for t in tasks:
            args += ["--config", str(ROOT / "conf/superb" / f"mini_{t}.yaml")]
        speechssl(*args, log=log)
    return scores(out, tasks)


def summarize(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(res: dict, tasks: list[str]) -> str:
    head = "| upstream | minutes | steps | seeds | " + " | ".join(f"{t.upper()} {METRIC[t]}" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (4 + len(tasks))]
    for row in res["rows"]:
        cells = []
        for t in tasks:
            m, s = summarize([r[t] for r in row["scores"]])
            cells.append(f"{m:.1f} +- {s:.1f}")
        lines.append(f"| {row['name']} | {row.get('minutes', '')} | {row.get('steps', '')} | {len(row['scores'])} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append("mean +- standard deviation over the seeds (pretraining seed and head seed; the random-init control "
                 "draws its weights and head from the same seeds, FBANK its head). Lower is better for PR and ASV.")
    return "\n".join(lines)


def plot(res: dict, tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4))
    for ax, t in zip(axes, tasks):
        for row in res["rows"]:
            m, s = summarize([r[t] for r in row["scores"]])
            if row["kind"] == "baseline":  # FBANK black; each random-init control in its front end's colour
                color = {"fbank": "k", "random_fbank": "tab:blue", "random_cnn": "tab:orange"}.get(row["name"], "gray")
                ax.axhline(m, ls="--", color=color, label=row["name"])
                ax.axhspan(m - s, m + s, color=color, alpha=0.08)
        for fe in res["frontends"]:
            pts = [r for r in res["rows"] if r["kind"] == "pretrained" and r["frontend"] == fe]
            xs = [r["minutes"] for r in pts]
            ms = [summarize([x[t] for x in r["scores"]]) for r in pts]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                        color="tab:blue" if fe == "fbank" else "tab:orange", label=f"HuBERT, {fe} front end")
        ax.set_title(f"{t.upper()} ({METRIC[t]}, {'lower' if LOWER_IS_BETTER.get(t) else 'higher'} is better)")
        ax.set_xlabel("pretraining minutes (2 CPU cores)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "egs/mini/data/mini"), help="mini corpus (make demo writes it)")
    ap.add_argument("--train-split", default="pretrain")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="pretraining minutes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--frontends", nargs="+", default=["fbank", "cnn"], choices=["fbank", "cnn"])
    ap.add_argument("--cnn-seeds", type=int, nargs="+", default=None,
                    help="seeds for the CNN side (default: --seeds); it is the slower one")
    ap.add_argument("--tasks", nargs="+", default=["pr", "ks", "sid", "er"], choices=list(METRIC))
    ap.add_argument("--out", default=str(ROOT / "bench/out/quality"))
    ap.add_argument("--quick", action="store_true", help="one 0.3-minute budget, one seed, fbank only")
    args = ap.parse_args()
    if args.quick:
        args.budgets, args.seeds, args.frontends = [0.3], [0], ["fbank"]
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    if not (data / f"cuts_{args.train_split}.jsonl.gz").exists():
        sys.exit(f"bench/quality.py: no {data}/cuts_{args.train_split}.jsonl.gz: run `make demo` (or "
                 "`speechssl prepare mini egs/mini/data/mini`) first, or pass --data")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    t0 = time.time()
    labelled = units(data, args.train_split, out / "units", log)
    res = {"budgets": args.budgets, "seeds": args.seeds, "frontends": args.frontends, "tasks": args.tasks,
           "rows": []}
    fbank = [superb("fbank", out / f"fbank-s{s}", args.tasks, data, s, log) for s in args.seeds]
    res["rows"].append({"name": "fbank", "kind": "baseline", "scores": fbank})
    for fe in args.frontends:
        seeds = args.cnn_seeds if fe == "cnn" and args.cnn_seeds else args.seeds
        for minutes in sorted(args.budgets):
            steps = done_steps(out / f"{fe}-{minutes:g}min-s{seeds[0]}") or steps_for(labelled, fe, minutes)
            row = {"name": f"hubert_{fe}", "kind": "pretrained", "frontend": fe, "minutes": minutes,
                   "steps": steps, "seeds": seeds, "scores": []}
            for s in seeds:
                exp = out / f"{fe}-{minutes:g}min-s{s}"
                if not (exp / "final").exists():
                    speechssl("pretrain", "--config", str(ROOT / "conf/pretrain/small_hubert.yaml"), "--out",
                              str(exp), "--overwrite", "--set", f"data.train=[{labelled}]", "--set",
                              f"trainer.max_steps={steps}", "--set", f"trainer.seed={s}", "--set",
                              "trainer.progress=false", *[x for o in (CNN_OVERRIDES if fe == "cnn" else [])
                                                          for x in ("--set", o)], log=log)
                row["scores"].append(superb(str(exp / "final"), out / f"superb-{exp.name}", args.tasks, data, s,
                                            log))
                print(f"[{time.time() - t0:6.0f} s] {fe} {minutes:g} min seed {s}: {row['scores'][-1]}", flush=True)
            res["rows"].append(row)
        largest = out / f"{fe}-{max(args.budgets):g}min-s{seeds[0]}" / "final"
        rand = [superb(f"random:{largest}", out / f"random_{fe}-s{s}", args.tasks, data, s, log) for s in seeds]
        res["rows"].append({"name": f"random_{fe}", "kind": "baseline", "seeds": seeds, "scores": rand})
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = table(res, args.tasks)
    (out / "quality.md").write_text(md + "\n")
    plot(res, args.tasks, out / "quality.png")
    print(md)
    print(f"wrote {out}/quality.md, quality.png, results.json ({res['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
