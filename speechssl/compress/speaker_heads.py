"""Speaker heads for speaker verification on top of encoder frames: an x-vector TDNN and AAM-softmax.

* ``XVectorHead``: frame-level TDNN (dilated 1-D convolutions, ReLU, batch norm), statistics pooling (mean and
  standard deviation over valid frames), then a linear embedding layer (Snyder et al., 2018).
* ``AAMSoftmax``: additive angular margin softmax (ArcFace): the target logit is ``s * cos(theta + m)``, the others
  ``s * cos(theta)``, theta being the angle between the L2-normalised embedding and the class weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.models.objectives.dino import stats_pool

__all__ = ["XVectorHead", "AAMSoftmax"]


class XVectorHead(nn.Module):
    """x-vector: frames [B, T', D] and padding mask [B, T'] (True = pad) -> embeddings [B, embed_dim].

    ``channels`` TDNN width; the three frame layers use kernel 5/3/3 with dilation 1/2/3 and keep the frame count
    (same padding), so the padding mask still marks the valid frames after them.
    """

    def __init__(self, in_dim: int, embed_dim: int = 192, channels: int = 256):
        super().__init__()
        self.frames = nn.ModuleList(
            nn.Sequential(nn.Conv1d(i, channels, k, dilation=d, padding=d * (k - 1) // 2), nn.ReLU(),
                          nn.BatchNorm1d(channels))
            for i, k, d in ((in_dim, 5, 1), (channels, 3, 2), (channels, 3, 3)))
        self.embed = nn.Linear(2 * channels, embed_dim)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        h = x.transpose(1, 2)  # [B, D, T']
        for layer in self.frames:
            # padded frames are zeroed before each convolution so they never leak into valid ones
            h = layer(h.masked_fill(padding_mask[:, None, :], 0.0))
        return self.embed(stats_pool(h.transpose(1, 2), padding_mask))


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax: ``forward(emb [B, E], labels [B]) -> (loss, accuracy)``.

    ``margin`` m in radians (0.2 in ECAPA-TDNN recipes) and ``scale`` s (30). Where theta + m would pass pi the
    target logit falls back to ``cos(theta) - m * sin(m)`` so it stays monotonic in theta (ArcFace's easy margin off).
    """

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_normal_(self.weight)
        self.margin, self.scale = margin, scale

    def logits(self, emb: Tensor, labels: Tensor) -> Tensor:
        """[B, C] scaled logits with the margin applied to each row's target class."""
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float())).clamp(-1 + 1e-7, 1 - 1e-7)
        m = self.margin
        sin = (1.0 - cos.pow(2)).sqrt()
        with_margin = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        with_margin = torch.where(cos > math.cos(math.pi - m), with_margin, cos - m * math.sin(m))
        target = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(target, with_margin, cos)

    def forward(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(emb, labels)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, acc.detach()
