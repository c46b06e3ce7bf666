"""Encoder speed and memory against transformers, same config and same weights, measured in the same run.

For each model (HuBERT Base, WavLM Base by default) a random-init transformers model is saved once and loaded
by both implementations (ours through ``speechssl.load_pretrained``). Timing: forward+backward on a batch of
4 x 4 s in train mode (layer-drop off on both sides so both run every layer) and an eval forward, iterations of
the two implementations interleaved in one process, median reported. Memory: one forward+backward per
implementation in a fresh subprocess (CPU: ru_maxrss growth above the loaded model; CUDA: max_memory_allocated).
Also checks that both gave the same eval output, prints ours/HF ratios, and names the scaled_dot_product_attention
backend each side's attention dispatched to (flash, memory-efficient, cuDNN or math) in one fwd+bwd.

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


def load_model(impl: str, ckpt: str, dev):
    if impl == "hf":
        import transformers

        return transformers.AutoModel.from_pretrained(ckpt).to(dev)
    from speechssl import load_pretrained

    return load_pretrained(ckpt).to(dev)


def make_steps(model, wav, dev, dtype: str):
    import torch

    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16"
           else torch.autocast(dev.type, enabled=False))

    def fwd_bwd():
        model.train()
        with amp:
            out = model(wav)
        out.last_hidden_state.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    def fwd():
        model.eval()
        with torch.no_grad(), amp:
            return model(wav).last_hidden_state

    return fwd_bwd, fwd


def batch_wav(args, dev):
    import torch

    from speechssl.constants import SAMPLE_RATE

    g = torch.Generator().manual_seed(0)
    return (0.1 * torch.randn(args.batch, int(args.seconds * SAMPLE_RATE), generator=g)).to(dev)


def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
            "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
            "aten::_scaled_dot_product_attention_math": "math",
            "aten::_scaled_dot_product_fused_attention_overrideable": "fused (backend-specific)"}


def attention_kernels(step) -> str:
    """Which scaled_dot_product_attention backends one call of ``step`` dispatched to (aten op names seen by
    the profiler); 'none' when attention never went through SDPA."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seen = {}
    for ev in prof.events():
        if ev.name in SDPA_OPS:
            seen[SDPA_OPS[ev.name]] = seen.get(SDPA_OPS[ev.name], 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())) or "none"


def child_memory(args) -> None:
    """One implementation alone in a fresh process: peak memory of one fwd+bwd above the loaded model."""
    import torch

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    model = load_model(args.impl, args.ckpt, dev)
    wav = batch_wav(args, dev)
    fwd_bwd, _ = make_steps(model, wav, dev, args.dtype)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # Linux: reset the peak-RSS mark (VmHWM) after loading so that loading's own peak does not hide the step's
    hwm_reset = _reset_peak_rss()
    rss0 = _status_kib("VmRSS") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd_bwd()
    sync(dev)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        after = _status_kib("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = (after - rss0) / 1024  # KiB -> MiB
    json.dump({"peak_mib": peak}, open(args.out, "w"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def time_pair(args, ckpt: Path) -> dict:
    """Both implementations in this process, iterations interleaved (HF, ours, ours, HF, ...) so that a
    changing machine load hits both alike; the median per-iteration time is reported."""
    import statistics

    import torch

    dev = torch.device(args.device)
    wav = batch_wav(args, dev)
    steps = {impl: make_steps(load_model(impl, str(ckpt), dev), wav, dev, args.dtype) for impl in ("hf", "ours")}
    times = {impl: {"train": [], "eval": []} for impl in steps}
    outs = {}
    for it in range(args.warmup + args.iters):
        order = ("hf", "ours") if it % 2 == 0 else ("ours", "hf")
        for impl in order:
            fwd_bwd, fwd = steps[impl]
            t0 = time.perf_counter()
            fwd_bwd()
            sync(dev)
            t1 = time.perf_counter()
            outs[impl] = fwd()
            sync(dev)
            t2 = time.perf_counter()
            if it >= args.warmup:
                times[impl]["train"].append(t1 - t0)
                times[impl]["eval"].append(t2 - t1)
    res = {impl: {k: statistics.median(v) for k, v in times[impl].items()} for impl in times}
    res["diff"] = (outs["hf"].float() - outs["ours"].float()).abs().max().item()
    for impl, (fwd_bwd, _) in steps.items():
        res[impl]["sdpa"] = attention_kernels(fwd_bwd)
    return res


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
        return child_memory(args)
    if args.quick:
        args.iters, args.warmup = 1, 1
    import torch

    torch.set_num_threads(args.threads)
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(args.threads)}
    print(f"encoder bench: batch {args.batch} x {args.seconds:g} s, {args.threads} threads, device {args.device}, "
          f"{args.dtype}, median of {args.iters} interleaved iters (+{args.warmup} warm-up), train-mode fwd+bwd "
          f"(layer-drop off) and eval fwd; peak memory of one fwd+bwd in a fresh process per implementation")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.models:
            ckpt = Path(tmp) / preset
            make_checkpoint(preset, ckpt)
            res = time_pair(args, ckpt)
            for impl in ("hf", "ours"):
                out = str(Path(tmp) / f"{preset}.{impl}.json")
                cmd = [sys.executable, __file__, "--impl", impl, "--ckpt", str(ckpt), "--out", out,
                       "--batch", str(args.batch), "--seconds", str(args.seconds), "--threads", str(args.threads),
                       "--device", args.device, "--dtype", args.dtype]
                subprocess.run(cmd, check=True, env=env)
                res[impl].update(json.load(open(out)))
            rows.append((preset, res))
    print(f"{'model':<12} {'impl':<5} {'fwd+bwd s':>10} {'eval fwd s':>10} {'peak MiB':>9}")
    for preset, res in rows:
        for impl in ("hf", "ours"):
            r = res[impl]
            print(f"{preset:<12} {impl:<5} {r['train']:>10.3f} {r['eval']:>10.3f} {r['peak_mib']:>9.0f}")
    for preset, res in rows:
        r_train = res["ours"]["train"] / res["hf"]["train"]
        r_eval = res["ours"]["eval"] / res["hf"]["eval"]
        r_mem = res["ours"]["peak_mib"] / max(res["hf"]["peak_mib"], 1e-9)
        target = TARGETS.get(preset) if args.device == "cpu" else None
        verdict = "" if target is None else f" (target <= {target}: {'met' if r_train <= target else 'NOT met'})"
        print(f"{preset}: ratio ours/HF fwd+bwd time {r_train:.2f}{verdict}, eval fwd time {r_eval:.2f}, "
              f"peak memory {r_mem:.2f}; max |diff| of eval outputs {res['diff']:.2e}")
        print(f"{preset}: attention kernels in one fwd+bwd: ours {res['ours']['sdpa']}; HF {res['hf']['sdpa']}")


if __name__ == "__main__":
    main()
