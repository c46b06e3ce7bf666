"""Mask sampling for masked prediction: span masking (wav2vec 2.0 / HuBERT / WavLM) and block masking (BEST-RQ).

Both samplers are batched and loop-free over utterances and frames: random keys for every candidate start are
drawn at once and the top-k keys give starts without replacement. They take per-utterance valid lengths and
never mask padding. Randomness comes from an optional ``torch.Generator`` so masks are reproducible.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_span_mask", "compute_block_mask", "expand_mask"]


def _as_lengths(shape: tuple[int, int], lengths: Tensor | None, device) -> Tensor:
    B, T = shape
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device).long()
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [{B}], got {list(lengths.shape)}")
    if (lengths > T).any() or (lengths < 0).any():
        raise ValueError(f"lengths must lie in [0, {T}], got {lengths.tolist()}")
    return lengths


def _check_args(shape: tuple[int, int], lengths: Tensor | None, mask_prob: float, length_name: str, length: int,
                generator: torch.Generator | None, device) -> tuple[torch.device, Tensor]:
    """Check a sampler's arguments -> (output device: ``device``, else the generator's, else CPU; lengths [B])."""
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if length < 1:
        raise ValueError(f"{length_name} must be >= 1, got {length}")
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    return device, _as_lengths(shape, lengths, device)


def _spans_to_mask(starts: Tensor, keep: Tensor, span_len: Tensor, T: int) -> Tensor:
    """Paint spans onto a [B, T] bool mask.

    starts: [B, S] long start frames; keep: [B, S] bool (which starts are real); span_len: [B] long span length
    per utterance. Spans are clipped at T. Returns [B, T] bool.
    """
    B, S = starts.shape
    L = int(span_len.max().item()) if span_len.numel() else 0
    if S == 0 or L == 0:
        return torch.zeros(B, T, dtype=torch.bool, device=starts.device)
    offs = torch.arange(L, device=starts.device)
    idx = starts.unsqueeze(-1) + offs  # [B, S, L]
    valid = keep.unsqueeze(-1) & (offs < span_len.view(B, 1, 1)) & (idx < T)
    # invalid entries go to a scratch column T that is dropped afterwards
    idx = torch.where(valid, idx, torch.full_like(idx, T)).view(B, -1)
    mask = torch.zeros(B, T + 1, dtype=torch.bool, device=starts.device)
    mask.scatter_(1, idx, True)
    return mask[:, :T]


def compute_span_mask(
    shape: tuple[int, int],
    lengths: Tensor | None,
    mask_prob: float,
    mask_length: int,
    *,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sample span masks with fairseq's ``compute_mask_indices`` semantics (static lengths), batched.

    For an utterance of ``T_b`` valid frames: ``n = max(min_masks, int(mask_prob * T_b / mask_length + U[0, 1)))``
    span starts are drawn uniformly *without replacement* from ``[0, T_b - mask_length)`` and each start masks
    ``mask_length`` frames; spans may overlap (0.65/10 masks about 49% of frames, 0.8/10 about 55%). When fewer
    than ``n + 1`` starts fit, the range widens to ``n + 1`` starts as in fairseq; spans are clipped at ``T_b``, so
    padded frames (``t >= T_b``) are never masked and a zero-length utterance gets no mask.

    Args:
        shape: (B, T) frames of the padded batch.
        lengths: [B] valid frames per utterance (None = all T).
        generator: seeds the draw (on the same device as the output).
    Returns:
        [B, T] bool, True = masked.
    """
    B, T = shape
    device, lens = _check_args(shape, lengths, mask_prob, "mask_length", mask_length, generator, device)
    if B == 0 or T == 0 or mask_prob == 0.0:
        return torch.zeros(B, T, dtype=torch.bool, device=device)

    u = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
    num = (mask_prob * lens.double() / mask_length + u).long().clamp_min(min_masks)
    # fairseq: starts come from [0, T_b - mask_length); when that leaves no more than n candidates the range
    # widens to n + 1 starts and spans are clipped at T_b
    cand = lens - mask_length
    cand = torch.where(cand <= num, num + 1, cand)
    cand = torch.minimum(cand, lens)
    num = torch.minimum(num, cand)
    span = torch.full_like(lens, mask_length)

    C = int(cand.max().item())
    S = int(num.max().item())
    if C == 0 or S == 0:
        return torch.zeros(B, T, dtype=torch.bool, device=device)
    # uniform keys, invalid candidates pushed to -1: the S largest keys give a uniform sample w/o replacement
    keys = torch.rand(B, C, generator=generator, device=device)
    keys = keys.masked_fill(torch.arange(C, device=device) >= cand.unsqueeze(1), -1.0)
    starts = keys.topk(S, dim=1).indices  # [B, S]
    keep = torch.arange(S, device=device) < num.unsqueeze(1)
    mask = _spans_to_mask(starts, keep, span, T)
    return mask & (torch.arange(T, device=device) < lens.unsqueeze(1))


def compute_block_mask(
    shape: tuple[int, int],
    lengths: Tensor | None,
    mask_prob: float,
    block_length: int,
    *,
    min_blocks: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """BEST-RQ block masking: every valid frame starts a block of ``block_length`` frames with probability
    ``mask_prob`` (independent Bernoulli draws), at least ``min_blocks`` blocks per non-empty utterance.

    Blocks may overlap and are clipped at the utterance's valid length. Use it on input feature frames (e.g.
    10 ms fbank with ``block_length=40`` for 400 ms), or on encoder frames and expand with :func:`expand_mask`.

    Returns:
        [B, T] bool, True = masked.
    """
    B, T = shape
    device, lens = _check_args(shape, lengths, mask_prob, "block_length", block_length, generator, device)
    if B == 0 or T == 0:
        return torch.zeros(B, T, dtype=torch.bool, device=device)
    ar = torch.arange(T, device=device)
    valid = ar < lens.unsqueeze(1)
    # start candidates: a block may start anywhere it still fits (or at 0 for utterances shorter than a block)
    cand = (lens - block_length + 1).clamp_min(1)
    cand = torch.where(lens > 0, cand, torch.zeros_like(cand))
    in_cand = ar < cand.unsqueeze(1)
    keys = torch.rand(B, T, generator=generator, device=device)
    starts = (keys < mask_prob) & in_cand
    if min_blocks > 0:
        # guarantee min_blocks starts: force the min_blocks highest-key candidates on
        k = min(min_blocks, T)
        forced = keys.masked_fill(~in_cand, -1.0).topk(k, dim=1)
        force = torch.zeros_like(starts)
        force.scatter_(1, forced.indices, forced.values >= 0)
        need = starts.sum(1, keepdim=True) < torch.minimum(cand, torch.full_like(cand, min_blocks)).unsqueeze(1)
        starts = starts | (force & need)
    # a frame is masked if a block started within the last block_length frames: a windowed OR via cumsum
    c = torch.nn.functional.pad(starts.long().cumsum(1), (block_length, 0))
    covered = (c[:, block_length:] - c[:, :-block_length]) > 0
    return covered & valid


def expand_mask(mask: Tensor, factor: int, length: int | None = None) -> Tensor:
    """Upsample a frame mask [B, T] to [B, T * factor] (or cropped/padded to ``length``) by repetition; used to
    carry an encoder-frame mask onto the input feature frames it was computed from."""
    out = mask.repeat_interleave(factor, dim=1)
    if length is not None:
        if out.shape[1] >= length:
            out = out[:, :length]
        else:
            out = torch.nn.functional.pad(out, (0, length - out.shape[1]), value=False)
    return out
