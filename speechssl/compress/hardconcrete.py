"""HardConcrete gates (Louizos et al., 2018): stochastic, differentiable 0/1 masks for structured pruning.

A group of ``n`` gates ``z`` in [0, 1] is parameterised by ``log_alpha`` [n]. In training each forward draws one
sample per gate from the stretched and clipped binary-concrete distribution, so exact zeros and ones occur and the
expected L0 norm (the expected number of non-zero gates) is differentiable in ``log_alpha``. At evaluation the
gates are deterministic: the ``round(E[L0])`` gates with the largest keep probability take the distribution's
median (the noise-free value), all others are exactly 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HardConcrete"]


class HardConcrete(nn.Module):
    """``n`` HardConcrete gates.

    Args:
        n: number of gates (units in the group).
        init_drop: initial drop rate p; log_alpha starts around log((1 - p) / p), the concrete variable's
            odds before stretching (0.01 for most groups, 0.5 for FFN units in DPHuBERT); the stretch makes the
            actual P(z = 0) smaller (about 0.002 for p = 0.01, 0.17 for p = 0.5).
        temperature: concrete temperature beta (2/3).
        stretch: (l, r) interval the sigmoid is stretched to before clipping to [0, 1] ((-0.1, 1.1)).
        min_keep: the deterministic mask keeps at least this many gates (e.g. 1 for CNN channels, so a layer is
            never emptied).
    """

    def __init__(self, n: int, init_drop: float = 0.01, temperature: float = 2.0 / 3.0,
                 stretch: tuple[float, float] = (-0.1, 1.1), min_keep: int = 0, eps: float = 1e-6):
        super().__init__()
        if n <= 0:
            raise ValueError(f"HardConcrete needs n >= 1 gates, got {n}")
        if not 0.0 < init_drop < 1.0:
            raise ValueError(f"HardConcrete init_drop must lie in (0, 1), got {init_drop}")
        lo, hi = stretch
        if not (lo < 0.0 and hi > 1.0):
            raise ValueError(f"HardConcrete stretch must satisfy l < 0 < 1 < r, got {stretch}")
        self.n = n
        self.beta = float(temperature)
        self.lo, self.hi = float(lo), float(hi)
        self.min_keep = int(min_keep)
        self.eps = eps
        self.init_drop = float(init_drop)
        # log(-l / r) enters the closed-form probability of a non-zero gate.
        self.bias = -self.beta * math.log(-self.lo / self.hi)
        self.log_alpha = nn.Parameter(torch.empty(n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        mean = math.log(1.0 - self.init_drop) - math.log(self.init_drop)
        nn.init.normal_(self.log_alpha, mean=mean, std=1e-2)

    def extra_repr(self) -> str:
        return f"n={self.n}, temperature={self.beta:.3f}, stretch=({self.lo}, {self.hi})"

    def prob_nonzero(self) -> torch.Tensor:
        """P(z_i > 0) [n], differentiable in log_alpha."""
        return torch.sigmoid(self.log_alpha + self.bias)

    def l0_norm(self) -> torch.Tensor:
        """Expected number of non-zero gates (scalar tensor)."""
        return self.prob_nonzero().sum()

    def sample(self) -> torch.Tensor:
        """One stochastic sample [n] (reparameterised, so gradients reach log_alpha)."""
        u = torch.rand_like(self.log_alpha).clamp(self.eps, 1.0 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.hi - self.lo) + self.lo).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """Evaluation mask [n]: the round(E[L0]) most probable gates at their median value, the rest exactly 0."""
        k = max(self.min_keep, int(round(self.l0_norm().item())))
        k = min(k, self.n)
        median = (torch.sigmoid(self.log_alpha / self.beta) * (self.hi - self.lo) + self.lo).clamp(0.0, 1.0)
        if self.min_keep:  # a kept gate at median 0 would silently empty the group
            median = median.clamp(min=1e-3)
        out = torch.zeros_like(median)
        if k > 0:
            idx = torch.topk(self.log_alpha, k).indices
            out[idx] = median[idx]
        return out

    def forward(self) -> torch.Tensor:
        """Gate values [n]: a sample in training mode, the deterministic mask in eval mode."""
        return self.sample() if self.training else self.deterministic()
