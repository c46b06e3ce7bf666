"""CTC decoders behind one small interface: greedy (best path) and prefix beam search, no k2.

A decoder is any callable ``decoder(log_probs, lengths) -> list[list[int]]`` taking log-probabilities
[B, T, V] and valid frame counts [B]; register new ones (e.g. an n-gram LM beam search) with
:func:`register_decoder` and select them by name in the task config (``decoding.name``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Protocol

import torch

__all__ = ["CTCDecoder", "GreedyCTCDecoder", "PrefixBeamSearchDecoder", "register_decoder", "build_decoder",
           "DECODERS"]


class CTCDecoder(Protocol):
    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]: ...


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


class GreedyCTCDecoder:
    """Best path: argmax per frame, merge repeats, drop blanks."""

    def __init__(self, blank: int = 0):
        self.blank = blank

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        best = log_probs.argmax(-1).cpu()
        out = []
        for b in range(best.shape[0]):
            seq, prev = [], None
            for tok in best[b, : int(lengths[b])].tolist():
                if tok != prev and tok != self.blank:
                    seq.append(tok)
                prev = tok
            out.append(seq)
        return out


class PrefixBeamSearchDecoder:
    """CTC prefix beam search (Hannun et al. 2014) in log space.

    Keeps, per prefix, the probability of ending in blank and in non-blank so that repeated tokens separated
    by a blank are told apart from merged repeats. ``token_prune`` keeps only the top tokens of each frame
    (speed); ``lm`` is an optional callable ``lm(prefix: tuple[int, ...], token: int) -> log-prob`` added with
    weight ``lm_weight`` whenever a prefix grows.
    """

    def __init__(self, beam_size: int = 10, blank: int = 0, token_prune: int | None = 20,
                 lm: Callable[[tuple, int], float] | None = None, lm_weight: float = 0.0):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.beam_size, self.blank, self.token_prune = beam_size, blank, token_prune
        self.lm, self.lm_weight = lm, lm_weight

    def _decode_one(self, lp: torch.Tensor) -> list[int]:
        """``lp``: [T, V] log-probabilities of one utterance."""
        ninf = -math.inf
        beams: dict[tuple, tuple[float, float]] = {(): (0.0, ninf)}  # prefix -> (log p_blank, log p_nonblank)
        V = lp.shape[-1]
        k = V if not self.token_prune else min(V, self.token_prune)
        rows = lp.tolist()
        for t in range(lp.shape[0]):
            row = rows[t]
            cand = range(V) if k == V else torch.topk(lp[t], k).indices.tolist()
            nxt: dict[tuple, list[float]] = defaultdict(lambda: [ninf, ninf])
            for prefix, (pb, pnb) in beams.items():
                total = _logsumexp(pb, pnb)
                for c in cand:
                    p = row[c]
                    if c == self.blank:
                        e = nxt[prefix]
                        e[0] = _logsumexp(e[0], total + p)
                        continue
                    last = prefix[-1] if prefix else None
                    new = prefix + (c,)
                    lm = self.lm_weight * self.lm(prefix, c) if self.lm is not None else 0.0
                    e = nxt[new]
                    if c == last:
                        # a repeat only extends the prefix after a blank; otherwise it merges into it
                        e[1] = _logsumexp(e[1], pb + p + lm)
                        same = nxt[prefix]
                        same[1] = _logsumexp(same[1], pnb + p)
                    else:
                        e[1] = _logsumexp(e[1], total + p + lm)
            ranked = sorted(nxt.items(), key=lambda kv: _logsumexp(*kv[1]), reverse=True)[: self.beam_size]
            beams = {pre: (v[0], v[1]) for pre, v in ranked}
        best = max(beams.items(), key=lambda kv: _logsumexp(*kv[1]))[0]
        return list(best)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        lp = log_probs.detach().float().cpu()
        return [self._decode_one(lp[b, : int(lengths[b])]) for b in range(lp.shape[0])]


DECODERS: dict[str, Callable[..., CTCDecoder]] = {"greedy": GreedyCTCDecoder, "beam": PrefixBeamSearchDecoder}


def register_decoder(name: str, factory: Callable[..., CTCDecoder]) -> None:
    DECODERS[name] = factory


def build_decoder(name: str = "greedy", blank: int = 0, **kwargs) -> CTCDecoder:
    if name not in DECODERS:
        raise ValueError(f"unknown decoder '{name}' (config key decoding.name); choose from {sorted(DECODERS)}")
    return DECODERS[name](blank=blank, **kwargs)
