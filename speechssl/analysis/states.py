"""The utterances a layer analysis looks at: a split into probe-training and held-out cuts, and every cut's
hidden states with its frame-level phones and its speaker.

Hidden states come through the SUPERB path: an upstream from ``speechssl.superb.upstream.build_upstream`` (a
model, ``random:PRESET_OR_MODEL`` or ``fbank``) run by ``speechssl.superb.cache.FeatureSource`` on
``SpeechDataset`` batches, so a layer index means what it means in SUPERB (0 = the input of the first
transformer layer) and states are cut to the upstream's own frame count.

Phones: frame ``i`` (at the upstream's frame rate) takes the phone of the cut's ``alignment["phone"]`` item that
covers its centre (``speechssl.data.labels.alignment_frame_labels``); frames no item covers, and cuts without an
alignment, are unlabelled (-1). Speakers come from the supervision's ``speaker``.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from speechssl.constants import SAMPLE_RATE
from speechssl.data.audio import supervision_field
from speechssl.data.labels import alignment_frame_labels, has_alignment
from speechssl.utils.progress import progress_bar

__all__ = ["Utterance", "split_by_speaker", "collect_states"]
log = logging.getLogger(__name__)


@dataclass
class Utterance:
    """One cut's hidden states [L, T, D] (float32, CPU), phone ids [T] (-1: unlabelled) and speaker."""

    id: str
    states: torch.Tensor
    phones: np.ndarray
    speaker: str | None


def _speaker(cut) -> str | None:
    return supervision_field(cut, "speaker")


def split_by_speaker(cuts: Iterable, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(training cuts, held-out cuts): ``eval_fraction`` of every speaker's cuts, at least one and never all of
    them, are held out, so a speaker probe is scored on unseen utterances of speakers it was trained on. Which
    cuts depends on ``seed`` and the cut ids only. A speaker with a single cut (and cuts without a speaker, pooled
    as one group) goes to training."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    groups: dict[str | None, list] = {}
    for cut in cuts:
        groups.setdefault(_speaker(cut), []).append(cut)
    train, held = [], []
    for spk in sorted(groups, key=lambda s: (s is None, s or "")):
        group = sorted(groups[spk], key=lambda c: c.id)
        rng = np.random.default_rng([seed, zlib.crc32(str(spk).encode())])
        order = rng.permutation(len(group))
        n_eval = 0 if len(group) < 2 or spk is None else min(len(group) - 1,
                                                              max(1, round(eval_fraction * len(group))))
        held += [group[i] for i in sorted(order[:n_eval])]
        train += [group[i] for i in sorted(order[n_eval:])]
    return train, held


def _batches(cuts: Sequence, batch_seconds: float) -> list[list]:
    """Length-sorted batches of at most ``batch_seconds`` of padded audio (one long cut may exceed it alone)."""
    budget = batch_seconds * SAMPLE_RATE
    out, cur = [], []
    for cut in sorted(cuts, key=lambda c: c.num_samples):
        if cur and (len(cur) + 1) * cut.num_samples > budget:
            out.append(cur)
            cur = []
        cur.append(cut)
    return out + [cur] if cur else out


def _phone_ids(cut, num_frames: int, frame_rate: float, vocab: dict[str, int]) -> np.ndarray:
    """Phone ids [num_frames] of ``cut`` (new symbols are added to ``vocab``), -1 where unlabelled."""
    if not has_alignment(cut, "phone"):
        return np.full(num_frames, -1, dtype=np.int64)
    symbols = alignment_frame_labels(cut, num_frames, frame_rate=frame_rate)
    return np.array([vocab.setdefault(s, len(vocab)) if s is not None else -1 for s in symbols], dtype=np.int64)


def collect_states(upstream, cuts: Sequence, vocab: dict[str, int], *, device: str = "cpu",
                   batch_seconds: float = 60.0, progress: bool = True) -> list[Utterance]:
    """Every cut's hidden states from ``upstream`` (all its ``num_states``), its phones (symbols numbered in
    ``vocab``, which grows) and its speaker, in the order of ``cuts``. Bad audio raises
    :class:`~speechssl.data.audio.BadCutError` naming the cut."""
    from speechssl.superb.cache import Example, FeatureSource

    source = FeatureSource(upstream.to(device), cache=False, device=device, progress=False)
    frame_rate = SAMPLE_RATE / upstream.downsample_rate
    by_id: dict[str, Utterance] = {}
    with torch.no_grad():
        for batch in progress_bar(_batches(cuts, batch_seconds), desc=f"hidden states ({upstream.name})",
                                  unit="batch", disable=not progress, leave=False):
            examples = [Example(c.id, c.num_samples, cut=c) for c in batch]
            states, frames = source.states(examples)  # [L, B, T, D], [B]
            for i, cut in enumerate(batch):
                n = int(frames[i])
                by_id[cut.id] = Utterance(cut.id, states[:, i, :n].float().cpu().contiguous(),
                                          _phone_ids(cut, n, frame_rate, vocab), _speaker(cut))
    return [by_id[c.id] for c in cuts]
