"""Task metrics: edit-distance error rates (WER/CER/PER), accuracy, and speaker-verification EER / minDCF.

Error rates are corpus-level: the edit distances summed over utterances divided by the summed reference
lengths (what SUPERB and jiwer report), never an average of per-utterance rates.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "edit_distance", "error_rate", "wer", "cer", "per", "wer_jiwer", "accuracy", "eer", "min_dcf",
    "roc_curve",
]


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions + deletions + insertions, unit costs) between two token sequences."""
    ref, hyp = list(ref), list(hyp)
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Summed edit distance / summed reference length over a corpus of token sequences."""
    if len(refs) != len(hyps):
        raise ValueError(f"error_rate: {len(refs)} references but {len(hyps)} hypotheses")
    errors = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("error_rate: the references are all empty")
    return errors / total


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over whitespace-separated words."""
    return error_rate([r.split() for r in refs], [h.split() for h in hyps])


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate (spaces count as characters, runs of spaces collapsed)."""
    return error_rate([" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps])


def per(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Phone error rate over space-separated phone symbols."""
    return wer(refs, hyps)


def wer_jiwer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """WER through jiwer (a cross-check of :func:`wer`; identical on non-empty references)."""
    import jiwer

    return float(jiwer.wer(list(refs), list(hyps)))


def accuracy(preds: Sequence, labels: Sequence) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.size == 0:
        raise ValueError(f"accuracy: need equal non-empty arrays, got {preds.shape} and {labels.shape}")
    return float((preds == labels).mean())


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates when accepting ``score >= threshold``, for every distinct threshold.

    Returns ``(p_miss, p_fa, thresholds)``, thresholds ascending, with a final +inf threshold (accept nothing).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"need 1-D scores and labels of equal length, got {scores.shape} and {labels.shape}")
    n_tar, n_non = int(labels.sum()), int((~labels).sum())
    if n_tar == 0 or n_non == 0:
        raise ValueError(f"need both target and non-target trials, got {n_tar} targets and {n_non} non-targets")
    thresholds = np.unique(scores)
    order = np.argsort(scores, kind="mergesort")
    s, lab = scores[order], labels[order]
    # counts of trials strictly below each threshold are rejected
    below = np.searchsorted(s, thresholds, side="left")
    tar_below = np.concatenate([[0], np.cumsum(lab)])[below]
    non_below = below - tar_below
    p_miss = np.append(tar_below / n_tar, 1.0)
    p_fa = np.append(1.0 - non_below / n_non, 0.0)
    return p_miss, p_fa, np.append(thresholds, np.inf)


def eer(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Equal error rate: where the miss and false-alarm curves cross, linearly interpolated between thresholds.

    ``labels`` are 1 for target (same speaker) trials and 0 for non-target ones; higher scores mean "same".
    """
    p_miss, p_fa, _ = roc_curve(scores, labels)
    diff = p_miss - p_fa  # rises from <=0 to 1
    idx = int(np.argmax(diff >= 0))
    if diff[idx] == 0 or idx == 0:
        return float(p_miss[idx] if diff[idx] == 0 else (p_miss[idx] + p_fa[idx]) / 2)
    # the crossing lies between thresholds idx-1 and idx: intersect the two line segments
    d0, d1 = diff[idx - 1], diff[idx]
    t = d0 / (d0 - d1)
    return float(p_miss[idx - 1] + t * (p_miss[idx] - p_miss[idx - 1]))


def min_dcf(scores: Sequence[float], labels: Sequence[int], p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (NIST SRE): min over thresholds of
    ``(c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target)) / min(c_miss * p_target, c_fa * (1 - p_target))``.
    """
    p_miss, p_fa, _ = roc_curve(scores, labels)
    dcf = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1 - p_target)))
