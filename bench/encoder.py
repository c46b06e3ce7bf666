"""Encoder speed and memory against transformers, same config and same weights, measured in the same run.

For each model (HuBERT Base, WavLM Base by default) a random-init transformers model is saved once; then one
subprocess per implementation loads it (ours through ``speechssl.load_pretrained``), runs forward+backward on a
batch of 4 x 4 s in train mode (layer-drop off on both sides so both run every layer) and an eval forward, and
reports seconds per iteration and peak memory (CPU: ru_maxrss growth during the timed loop; CUDA:
max_memory_allocated). The parent checks both gave the same eval output and prints ours/HF ratios.

    python bench/encoder.py                       # CPU, 2 threads, HuBERT Base + WavLM Base
    python bench/encoder.py --quick               # 1 iteration, for a correctness check
    python bench/encoder.py --device cuda --dtype bf16 --batch 8
Targets (CPU, fwd+bwd time ratio): HuBERT Base <= 0.8, WavLM Base <= 0.6.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"hubert_base": 0.8, "wavlm_base": 0.6}


def make_checkpoint(preset: str, out: Path) -> None:
    import torch
    import transformers

    from speechssl.models import get_preset
    from speechssl.models.convert_hf import HF_MODEL_TYPES, config_to_hf

    hf_cfg = config_to_hf(get_preset(preset))
    hf_cfg["layerdrop"] = 0.0
    cls = getattr(transformers, HF_MODEL_TYPES[hf_cfg["model_type"]])
    cfg_cls = transformers.AutoConfig.for_model(hf_cfg["model_type"]).__class__
    torch.manual_seed(0)
    model = cls(cfg_cls(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")}))
    model.save_pretrained(out)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.impl == "hf":
        import transformers

        model = transformers.AutoModel.from_pretrained(args.ckpt)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from speechssl import load_pretrained

        model = load_pretrained(args.ckpt)
    model.to(dev)
    g = torch.Generator().manual_seed(0)
    n = int(args.seconds * 16000)
    wav = (0.1 * torch.randn(args.batch, n, generator=g)).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bf16" else torch.autocast(dev.type, enabled=False)

    def last(out):
        return out.last_hidden_state

    def fwd_bwd():
        model.train()
        with amp:
            out = model(wav)
        loss = last(out).float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def fwd():
        model.eval()
        with torch.no_grad(), amp:
            return last(model(wav))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        fwd_bwd()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fwd_bwd()
    sync()
    t_train = (time.perf_counter() - t0) / args.iters
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB -> MiB
    fwd()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        y = fwd()
    sync()
    t_eval = (time.perf_counter() - t0) / args.iters
    torch.save(y[:, :50].float().cpu(), args.out + ".pt")
    json.dump({"train_s": t_train, "eval_s": t_eval, "peak_mib": peak}, open(args.out, "w"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hubert_base", "wavlm_base"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 1 timed iteration (correctness check)")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return child(args)
    if args.quick:
        args.iters, args.warmup = 1, 1
    import torch

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
    print(f"encoder bench: batch {args.batch} x {args.seconds:g} s, {args.threads} threads, device {args.device}, "
          f"{args.dtype}, {args.iters} iters (+{args.warmup} warm-up), train mode fwd+bwd, layer-drop off")
    sys.path.insert(0, str(repo))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.models:
            ckpt = Path(tmp) / preset
            make_checkpoint(preset, ckpt)
            res = {}
            for impl in ("hf", "ours"):
                out = str(Path(tmp) / f"{preset}.{impl}.json")
                cmd = [sys.executable, __file__, "--impl", impl, "--ckpt", str(ckpt), "--out", out,
                       "--batch", str(args.batch), "--seconds", str(args.seconds), "--iters", str(args.iters),
                       "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
                       "--dtype", args.dtype]
                subprocess.run(cmd, check=True, env=env)
                res[impl] = json.load(open(out))
                res[impl]["y"] = torch.load(out + ".pt")
            diff = (res["hf"]["y"] - res["ours"]["y"]).abs().max().item()
            r_train = res["ours"]["train_s"] / res["hf"]["train_s"]
            r_eval = res["ours"]["eval_s"] / res["hf"]["eval_s"]
            r_mem = res["ours"]["peak_mib"] / max(res["hf"]["peak_mib"], 1e-9)
            rows.append((preset, res, r_train, r_eval, r_mem, diff))
    print(f"{'model':<12} {'impl':<5} {'fwd+bwd s':>10} {'eval fwd s':>10} {'peak MiB':>9}")
    for preset, res, *_ in rows:
        for impl in ("hf", "ours"):
            r = res[impl]
            print(f"{preset:<12} {impl:<5} {r['train_s']:>10.3f} {r['eval_s']:>10.3f} {r['peak_mib']:>9.0f}")
    for preset, _, r_train, r_eval, r_mem, diff in rows:
        target = TARGETS.get(preset)
        verdict = "" if target is None else f" (target <= {target}: {'met' if r_train <= target else 'NOT met'})"
        print(f"{preset}: ratio ours/HF fwd+bwd time {r_train:.2f}{verdict}, eval fwd time {r_eval:.2f}, "
              f"peak memory {r_mem:.2f}; max |diff| of eval outputs {diff:.2e}")


if __name__ == "__main__":
    main()
