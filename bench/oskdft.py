"""OS-KDFT against teacher-plus-head on the mini ASV trials: EER of cosine scores and embedding time.

For each seed, two runs of ``speechssl oskdft`` on conf/oskdft/mini.yaml from the same teacher and steps:
  * ``oskdft``: the config as is (1 distilled + 1 speaker-tuned layer, x-vector head);
  * ``teacher_head``: every teacher layer kept and fine-tuned with the same head and AAM-softmax
    (kd_layers 1 + ft_layers = the rest, kd_weight 0, ft_lower_grad 1): the system OS-KDFT must match.
Each final/ model embeds the ASV test cuts and is scored on the trials; its embedding time is the model's
(1 thread, best of ``--repeats``, audio read beforehand).
The target: student EER within 10 % relative of teacher_head at under half its embedding time.

    python bench/oskdft.py --teacher egs/mini/exp/hubert_small/final --data egs/mini/data/mini --out /tmp/osk_bench
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def train(name: str, args, seed: int, extra: list[str]) -> Path:
    from speechssl.cli.main import main

    out = Path(args.out) / f"{name}_s{seed}"
    if not (out / "final").exists():
        rc = main(["oskdft", "--config", args.config, "--out", str(out), "--overwrite", "--set",
                   f"teacher={args.teacher}", "--set", f"data.train=[{args.data}/cuts_asv_train.jsonl.gz]",
                   "--set", f"trainer.seed={seed}", "--set", "trainer.progress=false", *extra])
        if rc != 0:
            raise SystemExit(f"{name} seed {seed}: speechssl oskdft failed with exit code {rc}")
    return out / "final"


def score(model_dir: Path, args) -> dict:
    from speechssl.data.loader import open_cuts
    from speechssl.superb.embeddings import embed_cuts, model_extractor, score_trials
    from speechssl.superb.tasks import read_trials

    extract, n_params = model_extractor(str(model_dir))
    trials = read_trials(f"{args.data}/asv_trials.txt")
    needed = {u for _, a, b in trials for u in (a, b)}
    cuts = [c for c in open_cuts(f"{args.data}/cuts_asv_test.jsonl.gz", "cuts") if c.id in needed]
    emb = embed_cuts(extract, cuts)
    return {"eer": score_trials(emb, trials)["eer"], "embed_seconds": model_seconds(extract, cuts, args.repeats),
            "params": n_params}


@torch.no_grad()
def model_seconds(extract, cuts, repeats: int) -> float:
    """Best-of-``repeats`` seconds the extractor takes over all ``cuts`` in batches of 8, audio read beforehand
    (reading files is the same for every system and is not timed)."""
    from speechssl.data.audio import load_cut_audio
    from speechssl.data.dataset import pad_waves

    cuts = sorted(cuts, key=lambda c: c.duration)
    batches = [pad_waves([load_cut_audio(c) for c in cuts[i:i + 8]]) for i in range(0, len(cuts), 8)]
    extract(*batches[0])  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for audio, lens in batches:
            extract(audio, lens)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True, help="directory with cuts_asv_{train,test}.jsonl.gz and asv_trials.txt")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "conf/oskdft/mini.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from speechssl.models.io import load_pretrained

    n_teacher = load_pretrained(args.teacher).num_layers
    baseline = ["--set", "student.kd_layers=1", "--set", f"student.ft_layers={n_teacher - 1}",
                "--set", "loss.kd_weight=0", "--set", "loss.ft_lower_grad=1"]
    rows = {"oskdft": [], "teacher_head": []}
    for seed in args.seeds:
        for name, extra in (("oskdft", []), ("teacher_head", baseline)):
            model_dir = train(name, args, seed, extra)
            torch.set_num_threads(1)  # timing on one thread, the same for both systems
            rows[name].append({"seed": seed, **score(model_dir, args)})
            print(name, rows[name][-1], flush=True)
    summary = {k: {m: statistics.mean(r[m] for r in v) for m in ("eer", "embed_seconds", "params")}
               for k, v in rows.items()}
    s, t = summary["oskdft"], summary["teacher_head"]
    summary["eer_rel_gap"] = (s["eer"] - t["eer"]) / max(t["eer"], 1e-9)
    summary["time_ratio"] = s["embed_seconds"] / t["embed_seconds"]
    summary["target_met"] = summary["eer_rel_gap"] <= 0.10 and summary["time_ratio"] < 0.5
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
