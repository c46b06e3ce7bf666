"""Benchmark: SUPERB head training with and without the hidden-state cache (frozen upstream).

Trains the same SID-style head on a tiny random encoder over synthetic audio, for two learning rates (a sweep),
once running the upstream on every batch and once from the cache, and prints the wall-clock ratio, the cache's
own accounting (extraction time, passes served, time saved) and the difference between the two dev scores.

    python bench/superb_cache.py           # 48 utterances, 150 steps per trial
    python bench/superb_cache.py --quick   # a short check
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speechssl.constants import SAMPLE_RATE


def synthetic_examples(n: int, classes: int, seed: int):
    from speechssl.superb.cache import Example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = i % classes
        dur = rng.uniform(1.0, 2.0)
        t = np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE
        f0 = 110 + 40 * c
        wav = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * 0.2
        wav = (wav + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
        out.append(Example(id=f"b{seed}-{i}", num_samples=len(wav), label=f"c{c}", audio=wav))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few utterances and steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from speechssl.models.encoder import build_encoder
    from speechssl.superb.cache import FeatureSource
    from speechssl.superb.tasks import HeadConfig, build_task
    from speechssl.superb.train import SuperbConfig, train_trial
    from speechssl.superb.upstream import EncoderUpstream

    n, steps = (16, 20) if args.quick else (48, 150)
    train, dev = synthetic_examples(n, 4, 0), synthetic_examples(n // 4, 4, 1)
    cfg = SuperbConfig(task="sid")
    cfg.head = HeadConfig(proj_dim=64)
    cfg.trainer.progress, cfg.trainer.max_steps, cfg.trainer.eval_every = False, steps, max(1, steps // 3)
    cfg.data.max_duration = 8.0
    lrs = [1e-3, 5e-3]
    torch.manual_seed(0)
    upstream = EncoderUpstream(build_encoder("tiny_hubert").eval(), mode="frozen")
    # warm-up outside the timings: the first optimiser pulls in torch._dynamo, the first forward allocates
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    with torch.no_grad():
        upstream(torch.zeros(1, SAMPLE_RATE), torch.tensor([SAMPLE_RATE]))
    scores = {}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (False, True):
            task = build_task("sid", cfg.head)
            task.fit(train, Path(tmp) / "labels")
            source = FeatureSource(upstream, cache=cached, progress=False)
            t0 = time.perf_counter()
            best = []
            for lr in lrs:
                s, _ = train_trial(task, source, train, dev, cfg, lr, Path(tmp) / f"{cached}-{lr}", {"lr": lr})
                best.append(s["best_dev"])
            times[cached] = time.perf_counter() - t0
            scores[cached] = best
            if cached:
                stats = source.cache_stats()
    audio_s = sum(e.num_samples for e in train + dev) / SAMPLE_RATE
    print(f"superb cache bench: {len(train)} train + {len(dev)} dev utterances ({audio_s:.0f} s audio), "
          f"{steps} steps x {len(lrs)} learning rates, tiny_hubert upstream, {args.threads} threads")
    print(f"  no cache: {times[False]:.2f} s   cache: {times[True]:.2f} s   "
          f"speed-up: {times[False] / times[True]:.2f}x")
    print(f"  cache accounting: extraction {stats['extract_s']:.2f} s, reads {stats['load_s']:.2f} s, "
          f"{stats['passes']:.1f} passes served, saved {stats['saved_s']:.2f} s")
    diff = max(abs(a - b) for a, b in zip(scores[False], scores[True]))
    print(f"  dev accuracy per lr: no cache {scores[False]}, cache {scores[True]} (max |diff| {diff:.3f}; "
          f"the CNN's group norm sees batch padding, so batches of other sizes shift states slightly)")


if __name__ == "__main__":
    main()
