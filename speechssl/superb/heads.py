"""Downstream heads for the SUPERB tasks and the pieces they share (masked pooling, SpecAugment, AM-softmax).

All heads take features ``x`` [B, T, D] and valid frame counts ``lengths`` [B].
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SpecAugment", "CTCHead", "LinearCTCHead", "MeanPoolHead", "XVectorHead", "AMSoftmax",
           "frame_mask", "masked_mean"]


def frame_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[B] -> bool [B, T], True on valid frames."""
    return torch.arange(T, device=lengths.device)[None] < lengths[:, None]


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames: [B, T, D] -> [B, D]."""
    m = frame_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class SpecAugment(nn.Module):
    """Time and feature masking on [B, T, D] features in training mode (zeros, per utterance)."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2, time_width: int = 40,
                 time_ratio: float = 0.05):
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width, self.time_ratio = time_masks, time_width, time_ratio

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        x = x.clone()
        B, T, D = x.shape
        for b in range(B):
            L = int(lengths[b])
            for _ in range(self.freq_masks):
                w = int(torch.randint(0, min(self.freq_width, D) + 1, ()))
                f0 = int(torch.randint(0, D - w + 1, ()))
                x[b, :, f0:f0 + w] = 0
            max_t = max(0, min(self.time_width, int(self.time_ratio * L)))
            for _ in range(self.time_masks):
                w = int(torch.randint(0, max_t + 1, ()))
                t0 = int(torch.randint(0, max(1, L - w + 1), ()))
                x[b, t0:t0 + w] = 0
        return x


class CTCHead(nn.Module):
    """ASR: [stack ``stack`` adjacent frames] -> Linear(D -> proj) -> BiLSTM stack -> Linear(-> vocab); returns
    log-probs [B, ceil(T / stack), V] (:meth:`output_lengths` gives the valid frames).

    Stacking (s3prl's "concat" sampling) shortens the sequence the LSTM runs over, which is where a CPU spends
    its time, at the cost of a coarser output frame rate (it must stay above the label rate for CTC).
    """

    def __init__(self, in_dim: int, vocab_size: int, proj_dim: int = 1024, hidden: int = 1024,
                 num_layers: int = 2, dropout: float = 0.2, bidirectional: bool = True, stack: int = 1):
        super().__init__()
        if stack < 1:
            raise ValueError(f"CTCHead: stack must be >= 1, got {stack}")
        self.stack = stack
        self.proj = nn.Linear(in_dim * stack, proj_dim)
        self.rnn = nn.LSTM(proj_dim, hidden, num_layers=num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), vocab_size)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] input frames -> [B] output frames."""
        return torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.stack > 1:
            B, T, D = x.shape
            pad = (-T) % self.stack
            if pad:
                x = F.pad(x, (0, 0, 0, pad))  # padding frames are zero, as past each utterance's end
            x = x.reshape(B, (T + pad) // self.stack, self.stack * D)
            lengths = self.output_lengths(lengths)
        h = self.proj(x)
        packed = nn.utils.rnn.pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.rnn(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        return F.log_softmax(self.out(self.drop(h)), dim=-1)


class LinearCTCHead(nn.Module):
    """PR: Linear(D -> proj) -> Linear(-> vocab) per frame; returns log-probs [B, T, V]."""

    def __init__(self, in_dim: int, vocab_size: int, proj_dim: int = 256):
        super().__init__()
        self.proj = nn.Linear(in_dim, proj_dim)
        self.out = nn.Linear(proj_dim, vocab_size)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.out(self.proj(x)), dim=-1)


class MeanPoolHead(nn.Module):
    """SID / ER / KS: Linear(D -> proj) -> activation -> mean over valid frames -> Linear(-> classes); logits [B, C].

    The activation (ReLU by default, ``activation="none"`` for the strictly linear variant) matters: without it
    the head only sees the utterance mean of the features, which per-utterance CMVN (FBANK/MFCC) sets to zero.
    """

    def __init__(self, in_dim: int, num_classes: int, proj_dim: int = 256, activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "none"):
            raise ValueError(f"config key head.pool_activation must be relu or none, got {activation!r}")
        self.proj = nn.Linear(in_dim, proj_dim)
        self.act = nn.ReLU() if activation == "relu" else nn.Identity()
        self.out = nn.Linear(proj_dim, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.out(masked_mean(self.act(self.proj(x)), lengths))


class XVectorHead(nn.Module):
    """ASV: Linear(D -> proj) -> TDNN layers (dilated 1-D convs, ReLU, BatchNorm) -> statistics pooling
    (mean and standard deviation over valid frames) -> Linear(-> embed_dim). Returns embeddings [B, E].
    """

    def __init__(self, in_dim: int, proj_dim: int = 512, channels: Sequence[int] = (512, 512, 512, 512, 1500),
                 kernels: Sequence[int] = (5, 3, 3, 1, 1), dilations: Sequence[int] = (1, 2, 3, 1, 1),
                 embed_dim: int = 512):
        super().__init__()
        if not len(channels) == len(kernels) == len(dilations):
            raise ValueError("xvector: channels, kernels and dilations must have the same length")
        self.proj = nn.Linear(in_dim, proj_dim)
        layers, c_in = [], proj_dim
        for c, k, d in zip(channels, kernels, dilations):
            # 'same' padding keeps T so the frame mask stays valid for the pooling
            layers += [nn.Conv1d(c_in, c, k, dilation=d, padding=d * (k - 1) // 2), nn.ReLU(), nn.BatchNorm1d(c)]
            c_in = c
        self.tdnn = nn.Sequential(*layers)
        self.embed = nn.Linear(2 * c_in, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.tdnn(self.proj(x).transpose(1, 2)).transpose(1, 2)  # [B, T, C]
        m = frame_mask(lengths, h.shape[1]).unsqueeze(-1).to(h.dtype)
        n = m.sum(1).clamp(min=1)
        mean = (h * m).sum(1) / n
        var = (((h - mean[:, None]) * m) ** 2).sum(1) / n
        return self.embed(torch.cat([mean, torch.sqrt(var + 1e-5)], dim=-1))


class AMSoftmax(nn.Module):
    """Additive-margin softmax loss: ``s * (cos(theta_y) - m)`` for the true class, ``s * cos`` otherwise."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.scale, self.margin = scale, margin

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [B, C]."""
        return F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(loss, cosine logits [B, C])``."""
        cos = self.logits(emb)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        loss = F.cross_entropy(self.scale * (cos - self.margin * onehot), labels)
        return loss, cos
