"""Benchmark: a HuBERT Base training step through speechssl's trainer vs a plain loop over transformers.

Both sides train the same architecture (HuBERT Base from ``speechssl.models.presets.hubert_base``, converted to
a ``transformers.HubertConfig``) on the same synthetic batch (same audio, same K=500 unit targets, same mask
statistics 0.8 x 10), with AdamW, gradient clipping at 10 and the same precision:

- ours: ``Trainer`` + ``HubertObjective`` (cosine logits as normalize(x) @ normalize(E).T / 0.1, fp32 head);
- baseline: ``transformers.HubertModel`` + Linear(768 -> 256) + label embeddings with fairseq's head (cosine of
  every masked frame against all K embeddings by broadcasting to [S, K, 256]), a plain PyTorch loop.

Each side runs in its own subprocess so peak memory is measured separately: CUDA max allocated on GPU, peak RSS
on CPU, reported as the increase over the footprint after building model + optimiser (activations, gradients,
optimiser state). Throughput is the median over timed steps of audio seconds per wall second.

    python bench/pretrain.py --quick                       # short check (4 layers, small batch), CPU
    python bench/pretrain.py                               # HuBERT Base, 2 x 4 s per step, CPU
    python bench/pretrain.py --device cuda --precision bf16 --batch 8 --seconds 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

K = 500
SR = 16000


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _encoder_config(args):
    from speechssl.models import get_preset

    cfg = get_preset("hubert_base")
    if args.layers:
        cfg.num_layers = args.layers
    return cfg


def _batch(args, num_frames):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    n = int(args.seconds * SR)
    t = np.arange(n) / SR
    audio = torch.tensor(np.stack([0.3 * np.sin(2 * np.pi * (110 + 20 * b) * t) + 0.05 * rng.standard_normal(n)
                                   for b in range(args.batch)]), dtype=torch.float32)
    lens = torch.full((args.batch,), n, dtype=torch.long)
    T = int(num_frames(lens)[0])
    units = torch.from_numpy(rng.integers(0, K, size=(args.batch, T))).long()
    return {"audio": audio, "audio_lens": lens, "units": {"kmeans": units}}


def run_ours(args) -> dict:
    import torch

    from speechssl.models import build_encoder
    from speechssl.models.objectives import build_objective
    from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig
    from speechssl.train.trainer import peak_memory_mb

    torch.manual_seed(0)
    enc = build_encoder(_encoder_config(args))
    model = build_objective("hubert", enc, num_classes={"kmeans": K}, final_dim=256)
    batch = _batch(args, enc.num_frames)

    class SameBatch:
        def __iter__(self):
            while True:
                yield batch

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainerConfig(max_steps=total, log_every=1, ckpt_every=10**9, ckpt_at_end=False, clip_norm=10.0,
                            precision=args.precision, device=args.device, progress=False, num_workers=0)
        tr = Trainer(cfg, model, out, optim=OptimConfig(lr=5e-4), schedule=ScheduleConfig(warmup_steps=32000),
                     make_train_loader=SameBatch)
        base = _rss_mb() if args.device == "cpu" else 0.0
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            model.cuda()
            base = torch.cuda.memory_allocated() / 2**20
        tr.fit()
        recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        peak = peak_memory_mb(torch.device(args.device))
    rates = [r["audio_sec_per_sec"] for r in recs[args.warmup:]]
    return {"audio_sec_per_sec": statistics.median(rates), "peak_mb": peak, "base_mb": base,
            "loss": recs[-1]["loss"]}


def run_hf(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import HubertConfig, HubertModel
    from transformers.models.hubert.modeling_hubert import _compute_mask_indices

    from speechssl.models.convert_hf import config_to_hf
    from speechssl.models.encoder import conv_out_frames

    torch.manual_seed(0)
    ecfg = _encoder_config(args)
    hf = config_to_hf(ecfg)
    hf.update(mask_time_prob=0.8, mask_time_length=10, mask_time_min_masks=2)
    hf.pop("model_type", None)
    hf.pop("architectures", None)
    model = HubertModel(HubertConfig(**hf))
    proj = torch.nn.Linear(ecfg.hidden_size, 256)
    emb = torch.nn.Parameter(torch.rand(K, 256))
    dev = torch.device(args.device)
    params = list(model.parameters()) + list(proj.parameters()) + [emb]
    model.to(dev).train()
    proj.to(dev)
    emb.data = emb.data.to(dev)
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    batch = _batch(args, lambda n: conv_out_frames(n, ecfg.conv_layers))
    audio, units = batch["audio"].to(dev), batch["units"]["kmeans"].to(dev)
    B, T = units.shape
    base = _rss_mb() if args.device == "cpu" else 0.0
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        mask = torch.from_numpy(_compute_mask_indices((B, T), 0.8, 10, min_masks=2)).to(dev)
        with autocast:
            h = model(audio, mask_time_indices=mask).last_hidden_state
            x = proj(h[mask])                                                  # [S, 256]
        # fairseq's head: cosine of each masked frame against every label embedding, [S, K, 256]
        logits = F.cosine_similarity(x.float()[:, None, :], emb.float()[None, :, :], dim=-1) / 0.1
        loss = F.cross_entropy(logits, units[mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    from speechssl.train.trainer import peak_memory_mb

    secs = B * args.seconds
    return {"audio_sec_per_sec": statistics.median(secs / t for t in times[args.warmup:]),
            "peak_mb": peak_memory_mb(dev), "base_mb": base, "loss": float(loss)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 layers, 2 x 2 s, 2 + 3 steps: a short correctness check")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--batch", type=int, default=None, help="utterances per step (default 2, GPU 8)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per utterance (default 4, GPU 10)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; GPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default 12, quick 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--variant", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "cuda"
    if args.quick:
        defaults = dict(batch=2, seconds=2.0, steps=3, warmup=2, layers=4)
    else:
        defaults = dict(batch=8 if gpu else 2, seconds=10.0 if gpu else 4.0, steps=10 if gpu else 8, warmup=3 if gpu
                        else 2, layers=None)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    if args.variant:  # child process: one side, JSON on the last line
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        res = run_ours(args) if args.variant == "ours" else run_hf(args)
        print(json.dumps(res))
        return 0

    print(f"HuBERT Base training step ({args.layers or 12} layers), batch {args.batch} x {args.seconds:g} s, "
          f"{args.device}, precision {args.precision}, {args.warmup} warm-up + {args.steps} timed steps")
    results = {}
    for variant in ("ours", "hf"):
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(f"{variant}: failed (exit {proc.returncode})")
            return 1
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'':10s} {'audio s/s':>10s} {'peak MB':>10s} {'step MB':>10s} {'loss':>8s}")
    for name, r in (("speechssl", results["ours"]), ("hf loop", results["hf"])):
        print(f"{name:10s} {r['audio_sec_per_sec']:10.2f} {r['peak_mb']:10.0f} {r['peak_mb'] - r['base_mb']:10.0f} "
              f"{r['loss']:8.3f}")
    o, h = results["ours"], results["hf"]
    thr = o["audio_sec_per_sec"] / h["audio_sec_per_sec"]
    mem = (o["peak_mb"] - o["base_mb"]) / max(1e-9, h["peak_mb"] - h["base_mb"])
    print(f"throughput ratio speechssl / transformers loop: {thr:.2f}x (target >= 1.3x)")
    print(f"step-memory ratio speechssl / transformers loop: {mem:.2f} (target <= 1.0)")
    if gpu:
        print(f"speechssl: {o['audio_sec_per_sec']:.1f} audio-hours per GPU-hour "
              f"(transformers loop {h['audio_sec_per_sec']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
