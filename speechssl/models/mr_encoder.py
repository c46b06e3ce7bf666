"""The multi-resolution encoder of MR-HuBERT (Shi et al., "Multi-resolution HuBERT", ICLR 2024).

The front end and transformer layers are those of :class:`~speechssl.models.encoder.Encoder` (this class is an
``Encoder``: same front end, projection, positional convolution, mask embedding, layer list and output type);
only the order in which the layers run differs. With ``stacks = (a, b, c)`` and ``a + b + c = num_layers``:

1. ``a`` layers at the front end's frame rate (20 ms for the waveform CNN);
2. :class:`Downsample` halves the frame rate (40 ms): a strided convolution with a strided skip;
3. ``b`` layers at 40 ms, with a residual connection around the whole stack;
4. :class:`Upsample` doubles it again: frames repeated twice, a convolution, and the repeated skip;
5. ``c`` layers at 20 ms, whose output gets the output of step 1 added (the skip connection across the
   low-resolution part, as in a U-Net).

MR-HuBERT Base is 4-4-4 over 12 layers of 768 (the public release also has 2-4-6, 5-2-5, 6-4-2). The middle
``b`` layers attend over half as many frames, which is where the faster inference comes from
(``bench/mr_hubert.py`` measures it against the same depth at one rate).

Outputs follow ``Encoder``: ``hidden_states[i]`` is layer ``i``'s output at the 20 ms rate, so the SUPERB
featurizer and every frame count (:meth:`num_frames`: 20 ms frames) work unchanged. The low-resolution layers'
outputs are repeated twice along time (and cropped) to get there; :meth:`low_resolution` takes the 40 ms stack's
output back (``hidden_states[a + b][:, ::2]``, exact). A 20 ms frame ``t`` maps to 40 ms frame ``t // 2``: a
batch of ``T`` frames has ``ceil(T / 2)`` low-resolution frames, an utterance of ``n`` valid frames
``ceil(n / 2)`` valid ones (:func:`low_res_frames`), and a 40 ms frame is masked when its first 20 ms frame is.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import Encoder, EncoderGates, _pick
from .encoder_config import EncoderConfig

__all__ = ["MREncoder", "Downsample", "Upsample", "low_res_frames", "RESIDUAL_SCALE"]

RESIDUAL_SCALE = math.sqrt(0.4)
"""Scale of (branch + skip) in the resampling blocks, as in the public MR-HuBERT code (keeps the sum's variance
near that of one input)."""


def low_res_frames(frames: Tensor) -> Tensor:
    """40 ms frames of ``frames`` 20 ms frames: ``ceil(frames / 2)`` ([B] long -> [B] long)."""
    return torch.div(torch.as_tensor(frames).long() + 1, 2, rounding_mode="floor")


class Downsample(nn.Module):
    """x [B, T, D] -> [B, ceil(T / 2), D]: ``(GELU(LayerNorm(conv_k,stride2(x))) + x[:, ::2]) * RESIDUAL_SCALE``.

    The convolution pads ``(k - 1) // 2`` frames on each side, so an odd kernel gives exactly ``ceil(T / 2)``
    frames, frame ``j`` centred on input frame ``2 j``."""

    def __init__(self, d: int, kernel: int = 1):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"MR encoder 'adapter_kernel' must be an odd number >= 1, got {kernel}")
        self.conv = nn.Conv1d(d, d, kernel, stride=2, padding=(kernel - 1) // 2, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return (F.gelu(self.norm(y)) + x[:, ::2]) * RESIDUAL_SCALE


class Upsample(nn.Module):
    """x [B, T2, D] -> [B, T, D] (``T`` <= 2 T2): each frame repeated twice and cropped to ``T``, then
    ``(GELU(LayerNorm(conv_k(r))) + r) * RESIDUAL_SCALE`` with ``r`` the repeated frames."""

    def __init__(self, d: int, kernel: int = 1):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"MR encoder 'adapter_kernel' must be an odd number >= 1, got {kernel}")
        self.conv = nn.Conv1d(d, d, kernel, padding=(kernel - 1) // 2, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, T: int) -> Tensor:
        r = x.repeat_interleave(2, dim=1)[:, :T]
        y = self.conv(r.transpose(1, 2)).transpose(1, 2)
        return (F.gelu(self.norm(y)) + r) * RESIDUAL_SCALE


def _to_high(x: Tensor, T: int) -> Tensor:
    """A 40 ms sequence [B, T2, D] on the 20 ms grid of ``T`` frames (each frame twice, cropped)."""
    return x.repeat_interleave(2, dim=1)[:, :T]


class MREncoder(Encoder):
    """An ``Encoder`` whose layers run at 20, 40, then 20 ms (see the module docstring).

    Args:
        config: the encoder config; ``num_layers`` must equal ``sum(stacks)``.
        stacks: layers (a, b, c) at 20 ms, 40 ms and 20 ms.
        adapter_kernel: odd kernel of the down- and upsampling convolutions (1, MR-HuBERT Base's).

    Attributes besides ``Encoder``'s: ``stacks``, ``adapter_kernel``, ``downsample``, ``upsample``.
    """

    def __init__(self, config: EncoderConfig, stacks: Sequence[int], adapter_kernel: int = 1):
        stacks = tuple(int(s) for s in stacks)
        if len(stacks) != 3 or min(stacks) < 1 or sum(stacks) != config.num_layers:
            raise ValueError(f"MR encoder 'stacks' must be three layer counts >= 1 (20 ms, 40 ms, 20 ms) summing to "
                             f"the encoder's num_layers {config.num_layers}, got {list(stacks)}")
        super().__init__(config)
        self.stacks, self.adapter_kernel = stacks, int(adapter_kernel)
        self.downsample = Downsample(self.hidden_size, self.adapter_kernel)
        self.upsample = Upsample(self.hidden_size, self.adapter_kernel)

    @classmethod
    def from_encoder(cls, encoder: Encoder, stacks: Sequence[int], adapter_kernel: int = 1) -> "MREncoder":
        """An MR encoder with ``encoder``'s config and weights (the resampling blocks newly initialised)."""
        mr = cls(encoder.config, stacks, adapter_kernel)
        missing, unexpected = mr.load_state_dict(encoder.state_dict(), strict=False)
        if unexpected or any(not k.startswith(("downsample.", "upsample.")) for k in missing):
            raise ValueError(f"MR encoder: the encoder's weights do not fit (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return mr.to(next(encoder.parameters()).device)

    def low_resolution(self, hidden_states: Sequence[Tensor]) -> Tensor:
        """The 40 ms stack's output [B, ceil(T / 2), D] from an output's ``hidden_states``."""
        a, b, _ = self.stacks
        return hidden_states[a + b][:, ::2]

    def _run_stack(self, h: Tensor, layers: range, drops: list[bool], key_mask: Optional[Tensor],
                   gates: Optional[EncoderGates], output_attentions: bool
                   ) -> tuple[Tensor, list[Tensor], list[Optional[Tensor]]]:
        """Layers ``layers`` (indices into ``self.layers``) on h [B, T, D] -> (output, each layer's output,
        attention probabilities [B, H, T, T] or None per layer)."""
        position_bias = self.rel_pos(h.shape[1]) if self.rel_pos is not None else None
        outs, probs_all = [], []
        for i in layers:
            probs = None
            if not drops[i]:  # a dropped layer's output is its input
                h, probs = self.layers[i](
                    h, key_mask, position_bias,
                    head_gate=_pick(gates, "heads", i), attn_gate=_pick(gates, "attn", i),
                    ffn_unit_gate=_pick(gates, "ffn_units", i), ffn_gate=_pick(gates, "ffn", i),
                    output_attentions=output_attentions,
                )
            outs.append(h)
            probs_all.append(probs)
        return h, outs, probs_all

    def _run_layers(self, h: Tensor, key_mask: Optional[Tensor], gates: Optional[EncoderGates],
                    output_attentions: bool) -> tuple[list[Tensor], Optional[list[Optional[Tensor]]]]:
        """h [B, T, D] (20 ms) -> (hidden states on the 20 ms grid: the input and every layer's output,
        attentions (40 ms layers: [B, H, T2, T2]))."""
        a, b, c = self.stacks
        T = h.shape[1]
        drops = list(self._layer_drops())
        low_mask = key_mask[:, ::2] if key_mask is not None else None
        high, outs1, att1 = self._run_stack(h, range(a), drops, key_mask, gates, output_attentions)
        x = self.downsample(high)
        y, outs2, att2 = self._run_stack(x, range(a, a + b), drops, low_mask, gates, output_attentions)
        y = x + y  # residual around the low-resolution stack
        outs2[-1] = y
        z, outs3, att3 = self._run_stack(self.upsample(y, T), range(a + b, a + b + c), drops, key_mask, gates,
                                         output_attentions)
        outs3[-1] = z + high  # skip connection across the low-resolution part
        hidden_states = [h, *outs1, *(_to_high(o, T) for o in outs2), *outs3]
        return hidden_states, (att1 + att2 + att3) if output_attentions else None
