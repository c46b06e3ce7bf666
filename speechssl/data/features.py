"""Kaldi-style features from waveforms with Lhotse's torch-native extractors (no torchaudio).

- 80-dim log-mel filterbank (the SUPERB FBANK upstream, fbank front ends),
- 39-dim MFCC = 13 cepstra + deltas + delta-deltas (HuBERT iteration-1 k-means features),
both with a 25 ms window and a 10 ms shift (100 frames per second). Frames follow Lhotse's
``snip_edges=False`` convention: an utterance of ``n`` samples has ``(n + 80) // 160`` frames, one frame per
10 ms centred on the shift grid, so frame ``t`` covers time ``t * 10 ms``; padded batch items are computed
per item so their last frames never see the padding.
"""
from __future__ import annotations

import functools

import torch

from speechssl.constants import SAMPLE_RATE

FRAME_SHIFT = 0.01
FRAME_LENGTH = 0.025
HOP = int(SAMPLE_RATE * FRAME_SHIFT)
WIN = int(SAMPLE_RATE * FRAME_LENGTH)


@functools.lru_cache(maxsize=4)
def _fbank_module(num_mel_bins: int, snip_edges: bool = False):
    import warnings

    from lhotse.features.kaldi.layers import Wav2LogFilterBank

    with warnings.catch_warnings():  # Lhotse warns about snip_edges for stored features; ours are on the fly
        warnings.simplefilter("ignore")
        return Wav2LogFilterBank(sampling_rate=SAMPLE_RATE, frame_length=FRAME_LENGTH, frame_shift=FRAME_SHIFT,
                                 num_filters=num_mel_bins, snip_edges=snip_edges).eval()


@functools.lru_cache(maxsize=4)
def _mfcc_module(num_ceps: int, snip_edges: bool = False):
    import warnings

    from lhotse.features.kaldi.layers import Wav2MFCC

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Wav2MFCC(sampling_rate=SAMPLE_RATE, frame_length=FRAME_LENGTH, frame_shift=FRAME_SHIFT,
                        num_ceps=num_ceps, snip_edges=snip_edges).eval()


def num_feature_frames(lengths: torch.Tensor, snip_edges: bool = False) -> torch.Tensor:
    """Feature frames for ``lengths`` samples (LongTensor [B] -> [B]) at a 10 ms shift."""
    if snip_edges:
        return (torch.div(lengths - WIN, HOP, rounding_mode="floor") + 1).clamp(min=0)
    return torch.div(lengths + HOP // 2, HOP, rounding_mode="floor")


def _apply(module, wav: torch.Tensor, lengths: torch.Tensor | None, snip_edges: bool = False):
    squeeze = wav.dim() == 1
    if squeeze:
        wav = wav[None]
    wav = wav.float()
    B, T = wav.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=wav.device)
    lengths = lengths.to(wav.device).long()
    min_len = WIN if snip_edges else 1
    if (lengths < min_len).any():
        raise ValueError(f"compute features: every length must be >= {min_len} samples, got {lengths.tolist()}")
    module = module.to(wav.device)
    n_frames = num_feature_frames(lengths, snip_edges)
    with torch.no_grad():
        if bool((lengths == T).all()):
            feats = module(wav)
        else:  # per item: the reflect padding at the end must use the item's own samples, not batch padding
            items = [module(wav[i : i + 1, : int(lengths[i])])[0] for i in range(B)]
            feats = wav.new_zeros(B, int(n_frames.max()), items[0].shape[-1])
            for i, f in enumerate(items):
                feats[i, : f.shape[0]] = f
    if squeeze:
        return feats[0], n_frames[0]
    return feats, n_frames


def compute_fbank(wav: torch.Tensor, lengths: torch.Tensor | None = None, num_mel_bins: int = 80,
                  snip_edges: bool = False):
    """80-dim log-mel fbank. ``wav`` [B, T] (or [T]) at 16 kHz, ``lengths`` [B] valid samples.

    Returns ``(feats [B, F, 80], feats_lens [B])``; frames past an item's length are zero.
    """
    return _apply(_fbank_module(num_mel_bins, snip_edges), wav, lengths, snip_edges)


def add_deltas(x: torch.Tensor, window: int = 2) -> torch.Tensor:
    """Append deltas and delta-deltas along time: ``[..., T, D] -> [..., T, 3D]``.

    The regression formula of Kaldi/HTK (``window`` 2 = 5 frames) with edge frames repeated, as
    ``torchaudio.functional.compute_deltas`` and fairseq's HuBERT MFCC features do.
    """

    def delta(c: torch.Tensor) -> torch.Tensor:
        T = c.shape[-2]
        idx = torch.arange(T, device=c.device)
        denom = 2 * sum(n * n for n in range(1, window + 1))
        out = torch.zeros_like(c)
        for n in range(1, window + 1):
            fwd = c.index_select(-2, (idx + n).clamp(max=T - 1))
            bwd = c.index_select(-2, (idx - n).clamp(min=0))
            out = out + n * (fwd - bwd)
        return out / denom

    d1 = delta(x)
    return torch.cat([x, d1, delta(d1)], dim=-1)


def compute_mfcc(wav: torch.Tensor, lengths: torch.Tensor | None = None, num_ceps: int = 13, deltas: bool = True,
                 snip_edges: bool = False):
    """MFCC (13 cepstra, + deltas + delta-deltas = 39 dims). ``wav`` [B, T] (or [T]) at 16 kHz.

    Returns ``(feats [B, F, 39], feats_lens [B])``; deltas are computed per item over its valid frames.
    """
    feats, n = _apply(_mfcc_module(num_ceps, snip_edges), wav, lengths, snip_edges)
    if not deltas:
        return feats, n
    if feats.dim() == 2:
        return add_deltas(feats), n
    out = feats.new_zeros(*feats.shape[:-1], feats.shape[-1] * 3)
    for i in range(feats.shape[0]):
        L = int(n[i])
        out[i, :L] = add_deltas(feats[i, :L])
    return out, n
