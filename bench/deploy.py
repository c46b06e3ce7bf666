"""Deployment benchmark: CPU real-time factor of torch fp32, onnxruntime fp32, torch dynamic int8 and onnxruntime
dynamic int8, for a HuBERT Base-sized teacher and its 0.75-sparse pruned student.

The teacher has random weights (speed does not depend on them); the student is the one ``bench/compress.py``
materialises (HardConcrete gates on CNN channels, heads and FFN units, exactly counted sparsity): a pruned
student's shape is what sets its speed. Every path encodes the same batch-1 utterance of --seconds seconds with
its length given (the padded-batch graph a deployment runs), returning every hidden state, on --threads threads
(torch intra-op threads, onnxruntime intra-op threads). All eight (model, path) pairs are timed in alternation,
one forward each per round, so load changes on the machine hit them alike; the median of --repeats rounds is
reported.

    python bench/deploy.py                   # 10 s input, 2 threads, 5 rounds
    python bench/deploy.py --quick           # 4 s input, 1 round: a correctness check
    python bench/deploy.py --json out.json   # also write the figures
    python bench/deploy.py --clock cpu       # 1-thread process CPU time: robust on a shared machine
    python bench/deploy.py --superb-compare exp/superb/distilhubert=exp/deploy/superb/distilhubert_int8

The last form is the accuracy check of int8 (egs/mini stage): test accuracy of the int8 upstream against its fp32
self on the mini KS and SID tasks, at most 2 % relative loss.

Targets: the int8 student at least 2x faster than the fp32 student and 8x faster than the fp32 teacher (torch
fp32 is the reference for both). Each int8 path is judged on its own; where one is slower than its fp32 the
script says so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# bench/ is on the path from here on
from compress import add_teacher_student_args, sparse_student

TARGET_VS_STUDENT = 2.0
TARGET_VS_TEACHER = 8.0
MAX_SUPERB_LOSS = 0.02  # relative accuracy the int8 student may lose on the mini KS and SID tasks
PATHS = ("torch fp32", "onnxruntime fp32", "torch int8", "onnxruntime int8")


def build_paths(encoder, workdir: Path, threads: int) -> dict:
    """The four runnable forms of ``encoder``: name -> callable(wav [1, T], lengths [1])."""
    import torch

    from speechssl.deploy import OnnxEncoder, export_onnx, quantize_int8

    int8 = quantize_int8(encoder)
    export_onnx(encoder, workdir / "fp32")
    export_onnx(encoder, workdir / "int8", quantize="int8")
    ort_fp32, ort_int8 = OnnxEncoder(workdir / "fp32", threads), OnnxEncoder(workdir / "int8", threads)

    def torch_run(model):
        def run(wav, lens):
            with torch.inference_mode():
                return model(wav, lens).hidden_states
        return run

    return {"torch fp32": torch_run(encoder), "onnxruntime fp32": lambda w, n: ort_fp32(w.numpy(), n.numpy()),
            "torch int8": torch_run(int8), "onnxruntime int8": lambda w, n: ort_int8(w.numpy(), n.numpy())}


def time_alternating(runs: dict, wav, lens, warmup: int, repeats: int, clock=time.perf_counter) -> dict:
    """Median seconds of one forward per run name on ``clock``, timed round-robin."""
    for run in runs.values():
        for _ in range(warmup):
            run(wav, lens)
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = clock()
            run(wav, lens)
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def report(rtf: dict) -> list[str]:
    """Table lines and the target verdicts; ``rtf[(model, path)]``."""
    lines = ["| model | path | RTF | speed-up vs its torch fp32 | speed-up vs teacher torch fp32 |", "|---|---|---|---|---|"]
    teacher = rtf[("teacher", "torch fp32")]
    for (model, path), r in rtf.items():
        own = rtf[(model, "torch fp32")]
        lines.append(f"| {model} | {path} | {r:.4f} | {own / r:.2f}x | {teacher / r:.2f}x |")
    for model in ("teacher", "student"):
        for path in PATHS[1:]:
            if rtf[(model, path)] > rtf[(model, "torch fp32")]:
                lines.append(f"SLOWER: {model} {path} is slower than {model} torch fp32 "
                             f"({rtf[(model, path)]:.4f} vs {rtf[(model, 'torch fp32')]:.4f})")
    student_fp32 = rtf[("student", "torch fp32")]
    for path in ("torch int8", "onnxruntime int8"):
        r = rtf[("student", path)]
        a, b = student_fp32 / r, teacher / r
        lines.append(f"student {path}: {a:.2f}x vs fp32 student (target >= {TARGET_VS_STUDENT:g}x) "
                     f"{'PASS' if a >= TARGET_VS_STUDENT else 'FAIL'}; {b:.2f}x vs fp32 teacher (target >= "
                     f"{TARGET_VS_TEACHER:g}x) {'PASS' if b >= TARGET_VS_TEACHER else 'FAIL'}")
    return lines


def superb_compare(pairs: list[str], tasks: list[str]) -> int:
    """Print the int8-vs-fp32 SUPERB check: for each ``FP32_EXP=INT8_EXP`` pair (``speechssl superb`` output dirs)
    and task, the two test accuracies and the relative loss; exit 1 when one loses more than 2 %."""
    worst = float("-inf")  # a negative loss is a gain
    print("| fp32 upstream | int8 upstream | task | fp32 | int8 | relative loss |\n|---|---|---|---|---|---|")
    for pair in pairs:
        fp32_dir, int8_dir = (Path(p) for p in pair.split("=", 1))
        for task in tasks:
            fp32, int8 = (json.loads((d / task / "results.json").read_text()) for d in (fp32_dir, int8_dir))
            loss = (fp32["value"] - int8["value"]) / fp32["value"]  # accuracy: higher is better
            worst = max(worst, loss)
            print(f"| {fp32_dir.name} | {int8_dir.name} | {task} | {fp32['value']:.4f} ({fp32['scored']}) | "
                  f"{int8['value']:.4f} ({int8['scored']}) | {100 * loss:+.2f}% |")
    print(f"largest relative accuracy loss {100 * worst:.2f}% (target <= {100 * MAX_SUPERB_LOSS:g}%) "
          f"{'PASS' if worst <= MAX_SUPERB_LOSS else 'FAIL'}")
    return 0 if worst <= MAX_SUPERB_LOSS else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_student_args(ap, warmup=1)
    ap.add_argument("--quick", action="store_true", help="4 s input, 1 timed round")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time on --threads threads; cpu: process CPU time on 1 thread (torch and "
                         "onnxruntime), which waiting for a busy machine does not inflate")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--superb-compare", nargs="+", metavar="FP32_EXP=INT8_EXP", default=None,
                    help="instead of timing: compare the SUPERB test accuracy of int8 runs with their fp32 runs "
                         "(speechssl superb output dirs) on --tasks; exit 1 when one loses more than 2%%")
    ap.add_argument("--tasks", default="ks,sid", help="tasks for --superb-compare (accuracy metrics)")
    args = ap.parse_args(argv)
    if args.superb_compare:
        return superb_compare(args.superb_compare, args.tasks.split(","))
    if args.quick:
        args.seconds, args.repeats = 4.0, 1
    if args.clock == "cpu":
        args.threads = 1

    import torch

    from speechssl.models import build_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = build_encoder(args.teacher).eval()
    student = sparse_student(teacher, args.sparsity).eval()
    params = {m: sum(p.numel() for p in e.parameters()) for m, e in (("teacher", teacher), ("student", student))}
    print(f"teacher {args.teacher}: {params['teacher'] / 1e6:.1f}M params; student (sparsity {args.sparsity}): "
          f"{params['student'] / 1e6:.1f}M params, heads {student.prunable_units()['heads']}, "
          f"FFN {student.prunable_units()['ffn_units']}, CNN {student.prunable_units()['conv']}")
    wav = 0.1 * torch.randn(1, int(args.seconds * 16000), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([wav.shape[1]])
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, enc in (("teacher", teacher), ("student", student)):
            for path, run in build_paths(enc, Path(tmp) / model, args.threads).items():
                runs[(model, path)] = run
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        seconds = time_alternating(runs, wav, lens, args.warmup, args.repeats, clock)
    rtf = {key: s / args.seconds for key, s in seconds.items()}
    lines = report(rtf)
    print(f"{args.seconds:g} s audio, batch 1, {args.threads} threads, {args.clock} clock, median of {args.repeats} "
          f"alternating rounds")
    print("\n".join(lines))
    if args.quick:
        print("(--quick: one short timed round, a correctness check; judge the targets on a full run)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "seconds": args.seconds, "threads": args.threads, "clock": args.clock, "repeats": args.repeats,
            "params": params,
            "rtf": {f"{m} / {p}": r for (m, p), r in rtf.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
