"""Compression benchmark: a 0.75-sparsity DPHuBERT-style student of a HuBERT Base-sized teacher vs the teacher.

The teacher has random weights (speed and size do not depend on them). The student comes out of the real
machinery: HardConcrete gates on CNN channels, heads and FFN units get random scores, one global threshold is
searched so that the exact parameter count of the materialised model (``PruningGates.count_from_gates``) reaches
the target sparsity, the gates are set to keep exactly the units above it, and ``materialize`` builds the dense
pruned encoder. No training is needed to measure speed. Both run in the same process under the same protocol
(CPU, --threads threads, batch 1, --seconds of audio, warm-up, float32), timed in alternation (teacher, student,
teacher, ...) so that load changes hit both alike; the median of --repeats runs each is reported.

    python bench/compress.py                 # 10 s input, 2 threads, 5 timed runs
    python bench/compress.py --quick         # 4 s input, 1 timed run: a correctness check
Targets: student RTF at least 2.5x lower than the teacher's, student at most 26M parameters.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SPEEDUP = 2.5
TARGET_PARAMS = 26e6


def sparse_student(teacher, sparsity: float, seed: int = 0):
    """Materialise a student of ``teacher`` with exactly-counted sparsity >= ``sparsity`` (random unit choice)."""
    import torch

    from speechssl.compress.materialize import materialize
    from speechssl.compress.prune import PruningGates

    gates = PruningGates(teacher, groups=["conv", "heads", "ffn_units"])
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(p.shape, generator=g) for p in gates.log_alpha_parameters()]
    budget = (1.0 - sparsity) * gates.structure.total_params

    def set_threshold(tau: float):
        with torch.no_grad():
            for p, s in zip(gates.log_alpha_parameters(), scores):
                p.copy_(torch.where(s >= tau, torch.tensor(20.0), torch.tensor(-20.0)))
        gates.eval()
        hard = gates()
        return hard, PruningGates.count_from_gates(gates.structure, hard)

    lo, hi = 0.0, 1.0  # keep units with score >= tau: tau 0 keeps all, 1 drops all (but min_keep)
    for _ in range(40):
        mid = (lo + hi) / 2
        _, n = set_threshold(mid)
        lo, hi = (lo, mid) if n <= budget else (mid, hi)
    hard, n = set_threshold(hi)
    student = materialize(teacher, hard)
    assert sum(p.numel() for p in student.parameters()) == n  # the expected count is exact
    return student


def cpu_seconds(encoder, seconds: float, repeats: int) -> float:
    """Median process CPU time of one batch-1 forward on 1 thread (unaffected by waiting for a busy CPU)."""
    import time

    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wav = 0.1 * torch.randn(1, int(seconds * 16000), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            encoder(wav)
            times = []
            for _ in range(repeats):
                t0 = time.process_time()
                encoder(wav)
                times.append(time.process_time() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(prev)


def add_teacher_student_args(ap: argparse.ArgumentParser, *, warmup: int) -> None:
    """The options of the teacher, its sparse student and the timing protocol, shared by this benchmark and
    bench/deploy.py (``warmup``: forwards before timing, the default differs between the two)."""
    ap.add_argument("--teacher", default="hubert_base", help="preset name of the teacher (default hubert_base)")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--repeats", type=int, default=5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_student_args(ap, warmup=2)
    ap.add_argument("--quick", action="store_true", help="4 s input, 1 warm-up, 1 timed run")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.repeats = 4.0, 1, 1

    import torch

    from speechssl.compress.profile import format_table, measure_rtf, profile_models
    from speechssl.models import build_encoder

    torch.manual_seed(0)
    teacher = build_encoder(args.teacher).eval()
    student = sparse_student(teacher, args.sparsity)
    print(f"student heads per layer {student.prunable_units()['heads']}")
    print(f"student FFN units per layer {student.prunable_units()['ffn_units']}")
    print(f"student CNN channels {student.prunable_units()['conv']}")
    models = {f"teacher ({args.teacher})": teacher, f"student (sparsity {args.sparsity})": student}
    results = profile_models(models, seconds=args.seconds, timing=False)
    # time the two models in alternation, so a load change on the machine hits both alike
    for enc in models.values():
        measure_rtf(enc, args.seconds, args.threads, warmup=args.warmup, repeats=1)
    rounds: list[list[float]] = [[], []]
    for _ in range(args.repeats):
        for i, enc in enumerate(models.values()):
            rounds[i].append(measure_rtf(enc, args.seconds, args.threads, warmup=0, repeats=1))
    for r, times in zip(results, rounds):
        r.rtf, r.threads = statistics.median(times), args.threads
    print(format_table(results))
    t, s = results
    speedup = t.rtf / s.rtf
    print(f"RTF speed-up (teacher RTF / student RTF): {speedup:.2f}x (target >= {TARGET_SPEEDUP}x) "
          f"{'PASS' if speedup >= TARGET_SPEEDUP else 'FAIL'}")
    print(f"student params: {s.params / 1e6:.2f}M = {s.params / t.params:.3f} of the teacher "
          f"(target <= {TARGET_PARAMS / 1e6:.0f}M) {'PASS' if s.params <= TARGET_PARAMS else 'FAIL'}")
    print(f"MACs ratio student/teacher: {s.macs / t.macs:.3f}")
    # supplementary, robust to other processes on the machine: single-thread CPU seconds per forward
    cpu = [cpu_seconds(enc, args.seconds, max(1, args.repeats)) for enc in models.values()]
    print(f"single-thread CPU time per {args.seconds:g} s forward: teacher {cpu[0]:.3f} s, student {cpu[1]:.3f} s, "
          f"ratio {cpu[0] / cpu[1]:.2f}x")
    if args.quick:
        print("(--quick: one short timed run each, a correctness check; judge the speed target on a full run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
