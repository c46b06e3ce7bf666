"""WavLM: HuBERT's masked unit prediction on a waveform with another utterance mixed in (denoising).

With probability ``mix_prob`` an utterance (the primary) gets a segment of another utterance of the batch added:
the segment covers at most ``max_overlap`` (50%) of the primary's valid samples, and is scaled so that the
energy ratio primary : segment is uniform in ``energy_ratio_db`` ([-5, 5] dB). Targets stay the primary's clean
units, so the model must ignore the interfering speaker. Mixing is batched (gather, no per-sample Python loop)
and runs in training mode only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .hubert import HubertObjective

__all__ = ["WavLMObjective", "utterance_mix", "MixInfo"]


@dataclass
class MixInfo:
    """Which utterances were mixed and how, [B] each: ``mixed`` bool, ``source`` index of the other utterance,
    ``start`` / ``length`` of the mixed region in the primary, ``src_start`` in the source, ``ratio_db`` drawn
    energy ratio, ``scale`` applied to the source."""

    mixed: Tensor
    source: Tensor
    start: Tensor
    length: Tensor
    src_start: Tensor
    ratio_db: Tensor
    scale: Tensor


def utterance_mix(
    audio: Tensor,
    lengths: Tensor,
    *,
    mix_prob: float = 0.2,
    max_overlap: float = 0.5,
    energy_ratio_db: tuple[float, float] = (-5.0, 5.0),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, MixInfo]:
    """Mix a random segment of another batch utterance into each primary with probability ``mix_prob``.

    audio [B, T] float, lengths [B] valid samples. Returns (mixed audio [B, T], MixInfo). Padding stays zero;
    a batch of one utterance is returned unchanged.
    """
    B, T = audio.shape
    dev = audio.device
    lengths = lengths.to(dev).long()

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu" if generator is not None else dev).to(dev)

    mixed = (rand(B) < mix_prob) & (lengths > 1)
    if B < 2:
        mixed = torch.zeros_like(mixed)
    # source: another utterance, uniformly among the other B - 1
    source = (torch.arange(B, device=dev) + 1 + (rand(B) * max(B - 1, 1)).long().clamp_max(max(B - 2, 0))) % max(B, 1)
    src_len = lengths[source]
    max_len = torch.minimum((lengths.double() * max_overlap).floor().long(), src_len)
    length = (rand(B) * (max_len + 1).double()).long().clamp_max(max_len)
    mixed = mixed & (length > 0)
    start = (rand(B) * (lengths - length + 1).double()).long().clamp_max((lengths - length).clamp_min(0))
    src_start = (rand(B) * (src_len - length + 1).double()).long().clamp_max((src_len - length).clamp_min(0))
    lo, hi = energy_ratio_db
    ratio_db = lo + (hi - lo) * rand(B).double()

    t = torch.arange(T, device=dev)
    in_seg = (t >= start[:, None]) & (t < (start + length)[:, None]) & mixed[:, None]  # [B, T]
    src_idx = (t[None] - start[:, None] + src_start[:, None]).clamp(0, T - 1)
    seg = audio[source].gather(1, src_idx) * in_seg  # [B, T] source samples placed on the primary's timeline

    with torch.autocast(device_type=dev.type, enabled=False):
        valid = t[None] < lengths[:, None]
        p_energy = (audio.double() ** 2 * valid).sum(1) / lengths.clamp_min(1).double()
        s_energy = (seg.double() ** 2).sum(1) / length.clamp_min(1).double()
        # ratio_db = 10 log10(P_primary / (scale^2 P_segment))
        scale = torch.sqrt(p_energy / (s_energy.clamp_min(1e-12) * 10.0 ** (ratio_db / 10.0)))
        scale = torch.where(mixed & (s_energy > 1e-12) & (p_energy > 0), scale, torch.zeros_like(scale))
    out = audio + (seg.double() * scale[:, None]).to(audio.dtype)
    info = MixInfo(mixed=mixed & (scale > 0), source=source, start=start, length=length, src_start=src_start,
                   ratio_db=ratio_db, scale=scale)
    return out, info


class WavLMObjective(HubertObjective):
    """HuBERT objective + utterance mixing (``mix_prob``, ``max_overlap``, ``energy_ratio_db``) in training.

    Other arguments as :class:`HubertObjective` (mask 0.8 / 10, cosine logits, CE on masked frames).
    """

    name = "wavlm"

    def __init__(self, encoder: nn.Module, num_classes=100, *, mix_prob: float = 0.2, max_overlap: float = 0.5,
                 energy_ratio_db: tuple[float, float] = (-5.0, 5.0), **kwargs):
        super().__init__(encoder, num_classes, **kwargs)
        if not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"mix_prob must be in [0, 1], got {mix_prob}")
        if not 0.0 < max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be in (0, 1], got {max_overlap}")
        lo, hi = energy_ratio_db
        if lo > hi:
            raise ValueError(f"energy_ratio_db must be (low, high) with low <= high, got {energy_ratio_db}")
        self.mix_prob, self.max_overlap = float(mix_prob), float(max_overlap)
        self.energy_ratio_db = (float(lo), float(hi))
        self.last_mix: MixInfo | None = None

    def encoder_input(self, audio: Tensor, lens: Tensor) -> Tensor:
        if not self.training or self.mix_prob == 0.0:
            self.last_mix = None
            return audio
        out, self.last_mix = utterance_mix(audio, lens, mix_prob=self.mix_prob, max_overlap=self.max_overlap,
                                           energy_ratio_db=self.energy_ratio_db, generator=self._gen)
        return out
