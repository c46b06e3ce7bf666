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

``--frontends`` compares front ends instead: the same transformer (hidden size, layers, heads, FFN of
``--preset``, default ``tiny_hubert``) behind the preset's waveform CNN and behind the fbank front end (80-dim
log-mel in torch + ``--fbank-conv`` strided convs, default one [256, 3, 2] layer: 20 ms frames like the CNN),
both through ``Trainer`` + ``HubertObjective`` on the same batch. Each side runs in its own subprocess, the two
alternating (CNN, fbank, fbank, CNN, ...) over ``--repeats`` rounds so that load from other processes falls on
both alike; throughput is the median over rounds of each round's median step rate.

    python bench/pretrain.py --frontends --quick           # short check, tiny_hubert transformer
    python bench/pretrain.py --frontends                   # tiny_hubert, 2 x 4 s per step, CPU
    python bench/pretrain.py --frontends --preset hubert_base --device cuda --precision bf16 --batch 8
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


def run_ours(args, encoder_config=None) -> dict:
    """Trainer + HubertObjective steps on one fixed batch; ``encoder_config`` defaults to ``_encoder_config``."""
    import torch

    from speechssl.models import build_encoder
    from speechssl.models.objectives import build_objective
    from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig
    from speechssl.train.runtime import peak_memory_mb

    torch.manual_seed(0)
    enc = build_encoder(encoder_config or _encoder_config(args))
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
            "loss": recs[-1]["loss"], "params": sum(p.numel() for p in enc.parameters()),
            "frame_ms": 1000 * enc.downsample_rate / SR}


def run_hf(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import HubertConfig, HubertModel
    from transformers.models.hubert.modeling_hubert import _compute_mask_indices

    from speechssl.models.convert_hf import config_to_hf
    from speechssl.models.frames import num_frames

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
    batch = _batch(args, lambda n: num_frames(ecfg, n))
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
    from speechssl.train.runtime import peak_memory_mb

    secs = B * args.seconds
    return {"audio_sec_per_sec": statistics.median(secs / t for t in times[args.warmup:]),
            "peak_mb": peak_memory_mb(dev), "base_mb": base, "loss": float(loss)}


# ----------------------------------------------------------------------------------------------------------
# --frontends: fbank front end vs waveform CNN under the same transformer

FRONTENDS = ("cnn", "fbank")


def _parse_conv(text: str) -> list[list[int]]:
    """``"256,3,2;256,3,2"`` -> [[256, 3, 2], [256, 3, 2]] (channels, kernel, stride per layer)."""
    try:
        layers = [[int(v) for v in part.split(",")] for part in text.split(";") if part.strip()]
    except ValueError:
        layers = []
    if not layers or any(len(l) != 3 or min(l) < 1 for l in layers):
        raise SystemExit(f"--fbank-conv {text!r}: expected 'C,K,S' layers separated by ';', e.g. '256,3,2'")
    return layers


def _frontend_configs(args) -> dict:
    """{"cnn": the preset as is, "fbank": the same transformer behind the fbank front end} (EncoderConfigs)."""
    from speechssl.models import EncoderConfig, get_preset

    try:
        cnn = get_preset(args.preset)
    except KeyError as e:
        raise SystemExit(f"--preset: {e.args[0]}") from None
    if cnn.frontend != "cnn":
        raise SystemExit(f"--preset {args.preset} has the {cnn.frontend} front end; --frontends needs a waveform "
                         f"CNN preset to compare against (tiny_hubert, hubert_base, ...)")
    if args.layers:
        cnn.num_layers = args.layers
    # only the front end changes: hidden size, layers, heads, FFN, dropouts and positional conv stay the preset's
    fbank = EncoderConfig.from_dict({**cnn.to_dict(), "frontend": "fbank", "conv_layers": _parse_conv(args.fbank_conv)})
    return {"cnn": cnn, "fbank": fbank}


def _child(args, variant: str) -> dict:
    """Run one side in a fresh process (separate peak memory); its JSON is the last line of stdout."""
    cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"{variant}: failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_frontends(args) -> int:
    """Alternate CNN and fbank runs over ``args.repeats`` rounds; print rates, memory and the throughput ratio."""
    cfgs = _frontend_configs(args)
    t = cfgs["cnn"]
    print(f"front ends under the {args.preset} transformer ({t.num_layers} layers, {t.hidden_size} dims, "
          f"{t.num_heads} heads, FFN {t.ffn_dim}): CNN {t.conv_layers} vs fbank 80 x {cfgs['fbank'].conv_layers}; "
          f"batch {args.batch} x {args.seconds:g} s, {args.device}, precision {args.precision}, "
          f"{args.repeats} round(s) of {args.warmup} warm-up + {args.steps} timed steps per side")
    runs: dict[str, list[dict]] = {v: [] for v in FRONTENDS}
    for i in range(args.repeats):
        # ABBA order: a drift in machine load (other jobs) does not favour the side that always goes first
        for variant in (FRONTENDS if i % 2 == 0 else FRONTENDS[::-1]):
            try:
                runs[variant].append(_child(args, variant))
            except RuntimeError as e:
                print(e)
                return 1
    print(f"{'':12s} {'audio s/s':>10s} {'rounds':>20s} {'frame ms':>9s} {'params M':>9s} {'peak MB':>9s} "
          f"{'step MB':>9s} {'loss':>7s}")
    rate = {}
    for v in FRONTENDS:
        rs = runs[v]
        rate[v] = statistics.median(r["audio_sec_per_sec"] for r in rs)
        last = rs[-1]
        rounds = "/".join(f"{r['audio_sec_per_sec']:.1f}" for r in rs)
        print(f"{v + ' front end':12s} {rate[v]:10.2f} {rounds:>20s} {last['frame_ms']:9.0f} "
              f"{last['params'] / 1e6:9.2f} {max(r['peak_mb'] for r in rs):9.0f} "
              f"{max(r['peak_mb'] - r['base_mb'] for r in rs):9.0f} {last['loss']:7.3f}")
    print("loss: includes HubertObjective's feature penalty (10 x mean square of the front-end output), which "
          "differs between front ends")
    if runs["cnn"][-1]["frame_ms"] != runs["fbank"][-1]["frame_ms"]:
        print("note: the two sides have different frame rates, so the transformer costs differ too")
    print(f"throughput ratio fbank / CNN front end: {rate['fbank'] / rate['cnn']:.2f}x "
          f"(target >= 3x on CPU; Fast-HuBERT reports 5.2x on GPU)")
    return 0


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 layers, 2 x 2 s, 2 + 3 steps: a short correctness check")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=None, help="utterances per step (default 2, GPU 8)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per utterance (default 4, GPU 10)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; GPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default 12, quick 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--frontends", action="store_true",
                   help="compare the fbank front end with the waveform CNN under the same transformer instead")
    p.add_argument("--preset", default=None,
                   help="--frontends: the CNN preset whose transformer both sides share (default tiny_hubert)")
    p.add_argument("--fbank-conv", default="256,3,2",
                   help="--frontends: the fbank subsampler, 'C,K,S' layers joined by ';' (default 256,3,2: 20 ms)")
    p.add_argument("--repeats", type=int, default=None,
                   help="--frontends: alternating rounds per side (default 2, quick 1)")
    p.add_argument("--variant", choices=["ours", "hf", *FRONTENDS], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.preset and not args.frontends:
        p.error("--preset is for --frontends (the default comparison is HuBERT Base against transformers)")
    args.preset = args.preset or "tiny_hubert"
    gpu = args.device == "cuda"
    if args.quick:
        defaults = dict(batch=2, seconds=2.0, steps=3, warmup=2, layers=4, repeats=1)
    else:
        defaults = dict(batch=8 if gpu else 2, seconds=10.0 if gpu else 4.0, steps=10 if gpu else 8, warmup=3 if gpu
                        else 2, layers=None, repeats=2)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _run_variant(args: argparse.Namespace) -> int:
    """Child process: one side, its JSON result on the last line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant in FRONTENDS:
        res = run_ours(args, _frontend_configs(args)[args.variant])
    else:
        res = run_ours(args) if args.variant == "ours" else run_hf(args)
    print(json.dumps(res))
    return 0


def compare_hf(args: argparse.Namespace) -> int:
    """speechssl's Trainer against the transformers loop, each in its own subprocess."""
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
    if args.device == "cuda":
        print(f"speechssl: {o['audio_sec_per_sec']:.1f} audio-hours per GPU-hour "
              f"(transformers loop {h['audio_sec_per_sec']:.1f})")
    return 0


def main() -> int:
    args = _parse_args()
    if args.variant:
        return _run_variant(args)
    return compare_frontends(args) if args.frontends else compare_hf(args)


if __name__ == "__main__":
    sys.exit(main())
