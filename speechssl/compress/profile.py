"""Measure encoders the three ways that disagree: parameters, analytic MACs, and CPU real-time factor.

* ``count_params(encoder)``: backbone parameters (the encoder only; no task or prediction heads).
* ``analytic_macs(encoder, seconds)``: multiply-accumulates of one forward over ``seconds`` of 16 kHz audio,
  computed from the layer shapes (CNN, feature projection, positional conv, q/k/v/out projections, attention
  scores and context, FFN), per-layer pruned sizes included. ``counted_macs`` counts the same with hooks on
  Linear/Conv modules over a real forward (a cross-check used by the tests).
* ``measure_rtf(encoder, ...)``: wall time / audio time under a fixed protocol (threads, batch 1, warm-up runs,
  dtype, median over repeats).
* ``profile_models`` / ``format_table`` / ``plot_structure``: the `speechssl profile` table and PNG.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from speechssl.constants import SAMPLE_RATE
from speechssl.models.frames import front_end_layer_frames
from speechssl.utils.io import atomic_write
from speechssl.utils.progress import progress_bar

__all__ = ["ProfileResult", "count_params", "analytic_macs", "counted_macs", "measure_rtf", "layer_sizes",
           "profile_models", "format_table", "plot_structure"]


def count_params(encoder: nn.Module) -> int:
    """Backbone parameter count."""
    return sum(p.numel() for p in encoder.parameters())


def layer_sizes(encoder: nn.Module) -> tuple[list[int], list[int]]:
    """(heads kept per layer, FFN units kept per layer); 0 where the block was removed."""
    units = encoder.prunable_units()
    return list(units["heads"]), list(units["ffn_units"])


def analytic_macs(encoder: nn.Module, seconds: float = 10.0) -> int:
    """MACs of one batch-1 forward over ``seconds`` of audio, from the layer shapes (per-layer pruned sizes).

    Counted: front-end convs, feature projection, positional conv, q/k/v/out projections, attention scores and
    context (2 T^2 H Dh), WavLM's gate projection, FFN. Not counted: norms, activations, softmax, the fbank
    FFT (all linear in T with small constants).
    """
    cfg = encoder.config
    n = int(round(seconds * SAMPLE_RATE))
    units = encoder.prunable_units()
    D = cfg.hidden_size
    chans = list(units["conv"])
    frames = [int(t) for t in front_end_layer_frames(cfg, n)]
    c_in = 1 if cfg.frontend == "cnn" else int(cfg.n_mels)  # waveform, or log-mel bins
    macs = 0
    for (_, k, _), c, t in zip(cfg.conv_layers, chans, frames):
        macs += t * c * c_in * k
        c_in = c
    T = frames[-1]
    macs += T * c_in * D  # feature projection
    macs += T * D * (D // cfg.conv_pos_groups) * cfg.conv_pos  # positional convolution
    dh = D // cfg.num_heads
    for i, (h, f) in enumerate(zip(units["heads"], units["ffn_units"])):
        if h:
            # a layer that reuses an earlier attention map (Recycle-and-Distill) has no q/k projections, no
            # scores and no WavLM gate: only v, map x v and the output projection
            own = cfg.reuses_attention(i) < 0
            macs += T * D * (3 if own else 1) * h * dh + (2 if own else 1) * T * T * h * dh + T * h * dh * D
            if cfg.relative_position and own:
                macs += T * h * dh * 2  # WavLM gate: Linear(Dh -> 8) folded to Dh -> 2 per head
        if f:
            macs += 2 * T * D * f
    return int(macs)


@torch.no_grad()
def counted_macs(encoder: nn.Module, seconds: float = 10.0, include_attention: bool = True) -> int:
    """MACs counted by forward hooks on Linear/Conv modules over a real forward (+ attention matmuls)."""
    n = int(round(seconds * SAMPLE_RATE))
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += out.numel() // mod.out_features * mod.in_features * mod.out_features
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            k = 1
            for s in mod.kernel_size:
                k *= s
            total[0] += out.numel() * (mod.in_channels // mod.groups) * k
        elif hasattr(mod, "weight_v") and hasattr(mod, "groups"):  # weight-normed positional conv (functional)
            total[0] += out.numel() * mod.weight_v.shape[1] * mod.weight_v.shape[2]

    handles = [m.register_forward_hook(hook) for m in encoder.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or hasattr(m, "weight_v")]
    was_training = encoder.training
    encoder.eval()
    try:
        out = encoder(torch.zeros(1, n), torch.tensor([n]))
    finally:
        for h in handles:
            h.remove()
        encoder.train(was_training)
    if include_attention:
        T = int(out.lengths[0])
        dh = encoder.config.hidden_size // encoder.config.num_heads
        for h in encoder.prunable_units()["heads"]:
            if h:  # score and context matmuls run inside SDPA; the WavLM gate is a functional linear
                total[0] += 2 * T * T * h * dh + (2 * T * h * dh if encoder.config.relative_position else 0)
    return total[0]


@torch.inference_mode()
def measure_rtf(encoder: nn.Module, seconds: float = 10.0, threads: int = 2, warmup: int = 2, repeats: int = 5,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> float:
    """Real-time factor (compute seconds per audio second) under a fixed protocol.

    Protocol: ``torch.set_num_threads(threads)``, batch 1, ``seconds`` of seeded random audio, ``warmup``
    untimed forwards, then the median over ``repeats`` timed forwards, in ``dtype`` on CPU, inference mode.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = encoder.to(dtype).eval()
        g = torch.Generator().manual_seed(seed)
        n = int(round(seconds * SAMPLE_RATE))
        wav = (0.1 * torch.randn(1, n, generator=g)).to(dtype)
        lens = torch.tensor([n])
        for _ in range(warmup):
            model(wav, lens)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(wav, lens)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / seconds
    finally:
        torch.set_num_threads(prev_threads)


@dataclass
class ProfileResult:
    name: str
    params: int
    macs: int                 # for `seconds` of audio
    rtf: float | None         # None when timing was skipped
    heads: list[int]          # per layer
    ffn_units: list[int]      # per layer
    seconds: float
    threads: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def profile_models(models: dict[str, nn.Module], seconds: float = 10.0, threads: int = 2, warmup: int = 2,
                   repeats: int = 5, dtype: str = "float32", timing: bool = True) -> list[ProfileResult]:
    """Profile each named encoder (params, MACs, RTF, per-layer sizes)."""
    td = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if dtype not in td:
        raise ValueError(f"dtype must be one of {sorted(td)}, got {dtype!r}")
    results = []
    for name, enc in progress_bar(models.items(), desc="profile", unit="model", disable=len(models) < 2):
        heads, ffn = layer_sizes(enc)
        rtf = measure_rtf(enc, seconds, threads, warmup, repeats, td[dtype]) if timing else None
        results.append(ProfileResult(name, count_params(enc), analytic_macs(enc, seconds), rtf, heads, ffn,
                                     seconds, threads, dtype))
    return results


def format_table(results: Sequence[ProfileResult]) -> str:
    """Markdown table; ratios are against the first row (the teacher/baseline)."""
    if not results:
        return ""
    base = results[0]
    s = results[0].seconds
    lines = [f"| model | params (M) | MACs / {s:g} s (G) | RTF | params ratio | MACs ratio | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rtf = f"{r.rtf:.4f}" if r.rtf is not None else "-"
        speed = f"{base.rtf / r.rtf:.2f}x" if (r.rtf and base.rtf) else "-"
        lines.append(f"| {r.name} | {r.params / 1e6:.2f} | {r.macs / 1e9:.2f} | {rtf} | "
                     f"{r.params / base.params:.3f} | {r.macs / base.macs:.3f} | {speed} |")
    r0 = results[0]
    lines.append(f"\nProtocol: CPU, {r0.threads} threads, batch 1, {r0.seconds:g} s input, {r0.dtype}, "
                 "median of timed forwards after warm-up.")
    return "\n".join(lines)


def plot_structure(results: Sequence[ProfileResult], path: str | Path) -> Path:
    """PNG with kept heads and FFN units per layer, one bar group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(results))
    for k, r in enumerate(results):
        for ax, vals in zip(axes, (r.heads, r.ffn_units)):
            xs = [i + 1 + (k - (len(results) - 1) / 2) * width for i in range(len(vals))]
            ax.bar(xs, vals, width=width, label=r.name)
    axes[0].set_title("attention heads kept per layer")
    axes[1].set_title("FFN units kept per layer")
    n_layers = max((len(r.heads) for r in results), default=0)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(range(1, n_layers + 1))
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(results)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
