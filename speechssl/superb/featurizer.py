"""Layer combination for SUPERB: a softmax-weighted sum over all hidden states, or a single chosen layer.

One learnable weight per hidden state, initialised to zero (so training starts from the plain average), trained
with the downstream's optimiser. Hidden states are first cut to the frame count their input length implies.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Featurizer", "expected_frames", "cut_to_frames"]


def expected_frames(num_samples: torch.Tensor, downsample_rate: int) -> torch.Tensor:
    """Frames implied by an input length: ``num_samples // downsample_rate`` ([B] -> [B], long)."""
    return torch.div(num_samples.long(), int(downsample_rate), rounding_mode="floor")


def cut_to_frames(states: Sequence[torch.Tensor], frames: torch.Tensor, tolerance: int = 3) -> list[torch.Tensor]:
    """Cut (or pad by repeating the last frame) each state [B, T, D] to ``T = frames.max()``.

    Convolutional front ends produce a frame or two fewer than ``samples // rate`` (receptive field); anything
    further off than ``tolerance`` frames means the downsample rate is wrong, which is an error, not padding.
    """
    target = int(frames.max())
    out = []
    for i, h in enumerate(states):
        T = h.shape[1]
        if T > target:
            h = h[:, :target]
        elif T < target:
            if target - T > tolerance:
                raise ValueError(
                    f"hidden state {i} has {T} frames but the input lengths imply {target}: "
                    f"check the upstream's downsample_rate")
            h = torch.cat([h, h[:, -1:].expand(-1, target - T, -1)], dim=1)
        out.append(h)
    return out


class Featurizer(nn.Module):
    """Combine ``num_states`` hidden states [B, T, D] into one [B, T, D].

    ``layer=None``: softmax-weighted sum with weights initialised to zero; ``layer=k``: state k only (no
    parameters). ``layer_norm=True`` normalises each state over D before the sum (off in SUPERB's default).
    """

    def __init__(self, num_states: int, layer: int | None = None, layer_norm: bool = False):
        super().__init__()
        if num_states < 1:
            raise ValueError(f"num_states must be >= 1, got {num_states}")
        if layer is not None and not -num_states <= layer < num_states:
            raise ValueError(f"config key 'layer' = {layer} is out of range for {num_states} hidden states")
        self.num_states, self.layer, self.layer_norm = num_states, layer, layer_norm
        self.weights = nn.Parameter(torch.zeros(num_states)) if layer is None else None

    def layer_weights(self) -> torch.Tensor:
        """[num_states] normalised weights (one-hot for a single layer)."""
        if self.weights is None:
            w = torch.zeros(self.num_states)
            w[self.layer] = 1.0
            return w
        return F.softmax(self.weights, dim=0)

    def forward(self, states: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """``states``: list of [B, T, D] (or a stacked [L, B, T, D]) -> [B, T, D]."""
        if len(states) != self.num_states:
            raise ValueError(f"expected {self.num_states} hidden states, got {len(states)}")
        if self.weights is None:
            h = states[self.layer]
            return F.layer_norm(h, h.shape[-1:]) if self.layer_norm else h
        stacked = torch.stack(list(states), 0) if not torch.is_tensor(states) else states
        if self.layer_norm:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])
        w = F.softmax(self.weights, dim=0).to(stacked.dtype)
        return torch.einsum("l,lbtd->btd", w, stacked)
