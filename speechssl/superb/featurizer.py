"""Layer combination for SUPERB: a softmax-weighted sum over all hidden states, or a single chosen layer.

One learnable weight per hidden state, initialised to zero (so training starts from the plain average), trained
with the downstream's optimiser. Upstreams cut their hidden states to their own frame count (``cut_to_frames``
with the upstream's ``num_frames``) before the featurizer sees them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Featurizer", "cut_to_frames"]


def cut_to_frames(states: Sequence[torch.Tensor], frames: torch.Tensor) -> list[torch.Tensor]:
    """Each state [B, T, D] cut to ``T = frames.max()``, the upstream's own frame count for the batch's longest
    input. A state with fewer frames means the upstream's frame function disagrees with its output: an error."""
    target = int(frames.max())
    out = []
    for i, h in enumerate(states):
        if h.shape[1] < target:
            raise ValueError(f"hidden state {i} has {h.shape[1]} frames but the upstream's frame count for this "
                             f"batch is {target}: its num_frames does not match its output")
        out.append(h[:, :target])
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
