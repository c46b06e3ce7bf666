"""MR-HuBERT's inference speed against a HuBERT of the same depth and width, measured in the same run.

Both encoders come from one preset (``hubert_base`` by default: 12 layers of 768); the MR-HuBERT one runs its
layers as ``--stacks`` (4-4-4: four at 20 ms, four at 40 ms, four at 20 ms), so it has the same transformer layers
plus the two resampling blocks. Timing: an eval forward (no grad) on a batch of ``--batch`` x ``--seconds`` s,
iterations of the two models alternating in one process after a warm-up of each; the medians of wall-clock time
and of process CPU time (all threads: on a shared machine the less disturbed of the two) with their MR/HuBERT
ratios, the parameter counts, and the forward FLOPs counted by ``torch.utils.flop_counter`` (a machine-independent
figure: the time ratios move with the load of a shared machine). The paper (Shi et al., ICLR 2024) reports faster inference for
MR-HuBERT Base than HuBERT Base from the 40 ms stack; this script measures it on the machine at hand.

    python bench/mr_hubert.py                            # CPU, 2 threads, Base, 2 x 10 s
    python bench/mr_hubert.py --quick                    # 1 iteration of a 4-layer tiny pair
    python bench/mr_hubert.py --device cuda --dtype bf16 --batch 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def build_pair(preset: str, stacks: list[int]):
    """(HuBERT encoder, MR encoder with ``stacks``) of the same preset, layer-drop and dropout off."""
    from speechssl.models import build_encoder
    from speechssl.models.mr_encoder import MREncoder

    over = {"num_layers": sum(stacks), "layerdrop": 0.0}
    hubert = build_encoder(preset, **over)
    return hubert.eval(), MREncoder(hubert.config, stacks).eval()


def time_pair(models: dict, wav, iters: int, dtype: str) -> dict[str, list[tuple[float, float]]]:
    """Per-model (wall, CPU) forward times in s, the models alternating every iteration after one warm-up call
    each."""
    import torch

    dev = wav.device
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16"
           else torch.autocast(dev.type, enabled=False))
    lens = torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long, device=dev)

    def once(model) -> tuple[float, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad(), amp:
            model(wav, lens)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    for m in models.values():
        once(m)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(iters):
        for name, m in models.items():
            times[name].append(once(m))
    return times


def forward_flops(model, wav) -> int:
    """FLOPs of one eval forward on ``wav`` [B, S] (matmuls and convolutions, as torch's flop counter counts)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(wav)
    return counter.get_total_flops()


def main(argv=None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="hubert_base")
    p.add_argument("--stacks", type=int, nargs=3, default=[4, 4, 4])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 iteration of a tiny 1-2-1 pair (a correctness check)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.stacks, args.iters, args.seconds = "tiny_hubert", [1, 2, 1], 1, 2.0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    hubert, mr = (m.to(dev) for m in build_pair(args.preset, args.stacks))
    wav = torch.randn(args.batch, int(args.seconds * 16000), device=dev)
    times = time_pair({"hubert": hubert, "mr_hubert": mr}, wav, args.iters, args.dtype)
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    result = {
        "preset": args.preset, "stacks": args.stacks, "batch": args.batch, "seconds": args.seconds,
        "device": args.device, "dtype": args.dtype, "threads": args.threads, "iters": args.iters,
        "params_m": {k: round(sum(x.numel() for x in m.parameters()) / 1e6, 2)
                     for k, m in (("hubert", hubert), ("mr_hubert", mr))},
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "mr_over_hubert": round(med["mr_hubert"] / med["hubert"], 3),
        "median_cpu_s": {k: round(v, 4) for k, v in cpu.items()},
        "mr_over_hubert_cpu": round(cpu["mr_hubert"] / cpu["hubert"], 3),
        "gflops": {k: round(forward_flops(m, wav) / 1e9, 2) for k, m in (("hubert", hubert), ("mr_hubert", mr))},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
