"""Quantizers that turn continuous frames into discrete targets.

- :class:`GumbelVectorQuantizer` (wav2vec 2.0): G groups of V learned codewords chosen by a straight-through
  Gumbel softmax whose temperature decays with the training step; reports the perplexities the diversity loss uses.
- :class:`RandomProjectionQuantizer` (BEST-RQ): a frozen Xavier random projection and a frozen L2-normalised random
  codebook; the target is the nearest codeword by cosine. Nothing in it is trained.
- :class:`KMeansVectorQuantizer` (vq-wav2vec): G groups of V learned codewords chosen by the nearest Euclidean
  distance (online k-means), the straight-through estimator for the gradient, and the codebook and commitment
  terms of VQ-VAE as its loss.

The softmax, Gumbel noise, norms and cosine run in fp32 even under autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GumbelVectorQuantizer", "QuantizerOutput", "RandomProjectionQuantizer", "KMeansVectorQuantizer",
           "KMeansQuantizerOutput", "perplexity"]


def perplexity(probs: Tensor) -> Tensor:
    """exp(entropy) of each distribution in ``probs`` [..., V] summed over the leading groups: [G, V] -> scalar."""
    ent = -(probs * torch.log(probs + 1e-7)).sum(-1)
    return torch.exp(ent).sum()


@dataclass
class QuantizerOutput:
    x: Tensor                 # [N, vq_dim] or [B, T, vq_dim] quantized vectors
    codes: Tensor             # [..., G] long chosen codeword per group
    prob_perplexity: Tensor   # scalar: perplexity of the batch-averaged softmax (no noise), summed over groups
    code_perplexity: Tensor   # scalar: perplexity of the batch-averaged hard choices, summed over groups
    temp: float               # the Gumbel temperature used
    num_vars: int             # G * V: the maximum perplexity

    @property
    def diversity_loss(self) -> Tensor:
        """(G*V - prob_perplexity) / (G*V): 0 when every codeword is used equally, near 1 when one is used."""
        return (self.num_vars - self.prob_perplexity) / self.num_vars


class GumbelVectorQuantizer(nn.Module):
    """Product quantizer with G groups x V entries (wav2vec 2.0 Base: 2 x 320, codewords 128 each -> 256).

    ``temp=(max, min, decay)``: the temperature is ``max(max * decay**step, min)``, set with :meth:`set_step`.
    In training the codeword is chosen by a hard straight-through Gumbel softmax (one-hot forward, soft backward);
    in eval by argmax of the logits.
    """

    def __init__(
        self,
        input_dim: int,
        num_vars: int = 320,
        groups: int = 2,
        vq_dim: int = 256,
        temp: tuple[float, float, float] = (2.0, 0.5, 0.999995),
        combine_groups: bool = False,
    ):
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"vq_dim ({vq_dim}) must be divisible by groups ({groups})")
        if len(temp) != 3:
            raise ValueError(f"temp must be (max, min, decay), got {temp}")
        self.input_dim, self.num_vars, self.groups, self.vq_dim = input_dim, num_vars, groups, vq_dim
        self.combine_groups = combine_groups
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in temp)
        self.curr_temp = self.max_temp
        var_dim = vq_dim // groups
        # combine_groups shares one codebook across groups (fairseq option)
        self.codevectors = nn.Parameter(torch.empty(1, (1 if combine_groups else groups) * num_vars, var_dim))
        self.weight_proj = nn.Linear(input_dim, groups * num_vars)
        nn.init.uniform_(self.codevectors)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)

    def set_step(self, step: int) -> None:
        self.curr_temp = max(self.max_temp * self.temp_decay ** int(step), self.min_temp)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` [B, T, C] (or [N, C]); ``mask`` [B, T] bool selects the frames that count towards the
        perplexities (all frames are quantized). Returns vectors of x's leading shape + [vq_dim]."""
        lead = x.shape[:-1]
        G, V = self.groups, self.num_vars
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).float()
            logits = F.linear(flat, self.weight_proj.weight.float(), self.weight_proj.bias.float())
            logits = logits.view(-1, G, V)  # [N, G, V]
            sel = logits if mask is None else logits[mask.reshape(-1)]
            codes = logits.argmax(-1)  # [N, G]
            hard = F.one_hot(codes, V).float()
            if sel.shape[0] > 0:
                hard_sel = hard if mask is None else hard[mask.reshape(-1)]
                code_ppl = perplexity(hard_sel.mean(0))
                prob_ppl = perplexity(torch.softmax(sel, dim=-1).mean(0))
            else:
                code_ppl = prob_ppl = logits.new_zeros(())
            if self.training:
                # hard straight-through Gumbel: one-hot forward, softmax((logits + g) / tau) gradient
                u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
                soft = torch.softmax((logits - torch.log(-torch.log(u))) / self.curr_temp, dim=-1)
                codes = soft.argmax(-1)
                onehot = F.one_hot(codes, V).to(soft.dtype)
                weights = onehot - soft.detach() + soft
            else:
                weights = hard
            cv = self.codevectors.float()
            if self.combine_groups:
                cv = cv.repeat(1, G, 1)
            cv = cv.view(G, V, -1)  # [G, V, var_dim]
            q = torch.einsum("ngv,gvd->ngd", weights, cv).reshape(*lead, self.vq_dim)
        return QuantizerOutput(
            x=q, codes=codes.view(*lead, G), prob_perplexity=prob_ppl, code_perplexity=code_ppl,
            temp=self.curr_temp, num_vars=G * V,
        )


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ targets: ``argmax_k cos(x @ P, c_k)`` with P [input_dim, code_dim] Xavier-initialised and the
    codebook [num_codebooks, codebook_size, code_dim] L2-normalised, all frozen buffers (saved, never trained).

    ``seed`` makes the projection and codebook reproducible, independent of the global RNG.
    """

    def __init__(self, input_dim: int, code_dim: int = 16, codebook_size: int = 8192,
                 num_codebooks: int = 1, seed: int = 0):
        super().__init__()
        if min(input_dim, code_dim, codebook_size, num_codebooks) < 1:
            raise ValueError("input_dim, code_dim, codebook_size and num_codebooks must be >= 1")
        self.input_dim, self.code_dim = input_dim, code_dim
        self.codebook_size, self.num_codebooks = codebook_size, num_codebooks
        g = torch.Generator().manual_seed(int(seed))
        bound = math.sqrt(6.0 / (input_dim + code_dim))  # Xavier uniform
        proj = (torch.rand(num_codebooks, input_dim, code_dim, generator=g) * 2 - 1) * bound
        codebook = F.normalize(torch.randn(num_codebooks, codebook_size, code_dim, generator=g), dim=-1)
        self.register_buffer("projection", proj)
        self.register_buffer("codebook", codebook)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """x [..., input_dim] -> codes [..., num_codebooks] long."""
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"RandomProjectionQuantizer expects {self.input_dim}-dim input, got {x.shape[-1]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.reshape(-1, self.input_dim).float()
            z = F.normalize(torch.einsum("nd,kde->kne", flat, self.projection.float()), dim=-1)  # [K, N, e]
            codes = torch.einsum("kne,kce->knc", z, self.codebook.float()).argmax(-1)  # [K, N]
        return codes.t().reshape(*x.shape[:-1], self.num_codebooks)


@dataclass
class KMeansQuantizerOutput:
    x: Tensor                 # [..., vq_dim] quantized vectors; forward value = codewords, gradient = straight-through
    codes: Tensor             # [..., G] long nearest codeword per group
    code_perplexity: Tensor   # scalar: perplexity of the batch-averaged hard choices, summed over groups
    loss: Tensor              # scalar: codebook term + gamma * commitment term (mean squared errors)
    num_vars: int             # G * V: the maximum perplexity


class KMeansVectorQuantizer(nn.Module):
    """Online k-means product quantizer (vq-wav2vec): G groups x V codewords of ``vq_dim / G`` dims.

    The input [..., input_dim] is projected (Linear, no bias) to ``vq_dim`` and split into G groups, each
    normalised over its dims per frame (LayerNorm without affine: the scale the codebook sees cannot drift or
    collapse; fairseq normalises each group over the utterance's frames, the per-frame form keeps a frame's code
    independent of its neighbours and of padding). Each group picks its nearest codeword by Euclidean distance.

    Gradient: the straight-through estimator, ``x = z + sg(q - z)``: the forward value is the codeword, the
    gradient reaching ``z`` is the gradient at ``x``. The codewords learn from the loss
    ``||sg(z) - q||^2 + gamma * ||z - sg(q)||^2`` (means over elements): the first term moves codewords towards
    the frames assigned to them (the k-means update), the second, the commitment term, keeps the projection's
    output close to its codeword. vq-wav2vec: V = 320, G = 2, gamma = 0.25. ``combine_groups`` shares one codebook
    across the groups. The distances, the loss and the perplexity run in fp32 even under autocast.
    """

    def __init__(self, input_dim: int, num_vars: int = 320, groups: int = 2, vq_dim: int = 512, gamma: float = 0.25,
                 combine_groups: bool = False):
        super().__init__()
        if min(input_dim, num_vars, groups, vq_dim) < 1:
            raise ValueError("input_dim, num_vars, groups and vq_dim must be >= 1")
        if vq_dim % groups:
            raise ValueError(f"vq_dim ({vq_dim}) must be divisible by groups ({groups})")
        if gamma < 0:
            raise ValueError(f"gamma (the commitment weight) must be >= 0, got {gamma}")
        self.input_dim, self.num_vars, self.groups, self.vq_dim = input_dim, num_vars, groups, vq_dim
        self.gamma, self.combine_groups = float(gamma), bool(combine_groups)
        self.var_dim = vq_dim // groups
        self.projection = nn.Linear(input_dim, vq_dim, bias=False)
        # unit-variance groups against codewords drawn N(0, 1): every codeword starts within reach of the data
        self.codebook = nn.Parameter(torch.randn(1 if combine_groups else groups, num_vars, self.var_dim))

    def project(self, x: Tensor) -> Tensor:
        """x [..., input_dim] -> the grouped, normalised vectors z [..., G, vq_dim / G] that are quantized."""
        z = self.projection(x).view(*x.shape[:-1], self.groups, self.var_dim)
        return F.layer_norm(z.float(), (self.var_dim,))

    def nearest(self, z: Tensor) -> Tensor:
        """Nearest codeword per group: z [N, G, d] -> codes [N, G] long."""
        cb = self.codebook.float().expand(self.groups, -1, -1)  # [G, V, d]
        d2 = (z.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("ngd,gvd->ngv", z, cb)
              + cb.pow(2).sum(-1).unsqueeze(0))  # [N, G, V] squared distances
        return d2.argmin(-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> KMeansQuantizerOutput:
        """Quantize ``x`` [B, T, C] (or [N, C]); ``mask`` [B, T] bool selects the frames that count towards the
        loss and the perplexity (all frames are quantized). Returns vectors of x's leading shape + [vq_dim]."""
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"KMeansVectorQuantizer expects {self.input_dim}-dim input, got {x.shape[-1]}")
        lead = x.shape[:-1]
        G, V = self.groups, self.num_vars
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.project(x.float()).reshape(-1, G, self.var_dim)  # [N, G, d]
            codes = self.nearest(z.detach())
            cb = self.codebook.float().expand(G, -1, -1)
            q = cb[torch.arange(G, device=z.device)[None], codes]  # [N, G, d]
            sel = slice(None) if mask is None else mask.reshape(-1)
            zs, qs = z[sel], q[sel]
            if zs.shape[0] > 0:
                loss = F.mse_loss(qs, zs.detach()) + self.gamma * F.mse_loss(zs, qs.detach())
                code_ppl = perplexity(F.one_hot(codes[sel], V).float().mean(0))
            else:
                loss = code_ppl = z.new_zeros(())
            out = z + (q - z).detach()  # straight-through: the codeword forward, the identity backward
        return KMeansQuantizerOutput(x=out.reshape(*lead, self.vq_dim), codes=codes.view(*lead, G),
                                     code_perplexity=code_ppl, loss=loss, num_vars=G * V)
