#!/usr/bin/env python
"""Data loader throughput: audio seconds delivered per wall-clock second (x real time).

Writes its own synthetic manifest (speech-like audio, 2-16 s cuts, with 50 Hz unit labels), then times the
speechssl loader (``speechssl.data.loader.build_loader``: the lazy manifest, DynamicBucketingSampler and
SpeechDataset through ResumableLoader) for raw waveform batches and 80-dim fbank batches with 0 and 2 workers.
Target: >= 1000x real time with 2 workers on raw waveforms.

    python bench/dataloader.py            # ~30 min of audio, two passes per setting
    python bench/dataloader.py --quick    # a few minutes of audio, one pass
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_once(manifest: Path, mode: str, workers: int, max_duration: float, units: bool) -> tuple[float, float, int]:
    from speechssl.data.loader import DataConfig, build_dataset, build_loader
    from speechssl.models import build_encoder

    cfg = DataConfig(train=[str(manifest)], max_duration=max_duration, num_buckets=4, features=mode,
                     units=["kmeans"] if units else [], crop_to_shortest=False, max_crop_seconds=None)
    encoder = build_encoder("tiny_hubert", num_layers=1)  # its frame-count function aligns the labels
    dataset = build_dataset(cfg, num_frames=encoder.num_frames, downsample_rate=encoder.downsample_rate, seed=0,
                            train=True)
    loader = build_loader(cfg, dataset, seed=0, num_workers=workers)
    t0 = time.perf_counter()
    audio_s, n = 0.0, 0
    for batch in loader:
        audio_s += float(batch["audio_lens"].sum()) / 16000
        n += 1
    return audio_s, time.perf_counter() - t0, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small manifest, one pass per setting")
    ap.add_argument("--num-cuts", type=int, default=None, help="cuts in the synthetic manifest")
    ap.add_argument("--max-duration", type=float, default=120.0, help="padded seconds per batch")
    ap.add_argument("--format", default="flac", choices=("flac", "wav"), help="audio file format")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    n_cuts = args.num_cuts or (30 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 2)

    import torch

    from speechssl.data.synthetic import write_synthetic_cuts

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="bench_dl_") as tmp:
        t0 = time.perf_counter()
        cuts = write_synthetic_cuts(tmp, n_cuts, 2.0, 16.0, seed=0, units={"kmeans": 0.02}, fmt=args.format)
        manifest = Path(tmp) / "cuts.jsonl.gz"
        cuts.to_file(manifest)
        total = sum(c.duration for c in cuts)
        print(f"manifest: {len(cuts)} cuts, {total / 60:.1f} min of {args.format} audio "
              f"(written in {time.perf_counter() - t0:.1f} s); max_duration {args.max_duration} s/batch")
        results = {}
        for mode in ("waveform", "fbank"):
            for w in args.workers:
                best = None
                for _ in range(repeats):
                    a, dt, n = run_once(manifest, mode, w, args.max_duration, units=True)
                    rt = a / dt
                    best = rt if best is None else max(best, rt)
                results[(mode, w)] = best
                print(f"{mode:>8} batches, {w} workers: {best:8.0f}x real time ({n} batches, {a:.0f} s audio)")
        base = results.get(("waveform", args.workers[0]))
        for (mode, w), rt in results.items():
            if w != args.workers[0]:
                ratio = rt / results[(mode, args.workers[0])]
                print(f"ratio {mode} {w} workers / {args.workers[0]} workers: {ratio:.2f}")
        if ("waveform", 2) in results:
            rt = results[("waveform", 2)]
            print(f"target raw waveform, 2 workers >= 1000x real time: {rt:.0f}x -> {'PASS' if rt >= 1000 else 'FAIL'}")
        if base:
            print(f"ratio fbank / waveform at {args.workers[0]} workers: "
                  f"{results[('fbank', args.workers[0])] / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
