"""SUPERB examples from manifests: reading a split, holding out dev, duration buckets, class weights, skip log."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from speechssl.constants import SAMPLE_RATE
from speechssl.data.audio import supervision_field
from speechssl.data.loader import filter_durations, open_cuts
from speechssl.superb.cache import Example

__all__ = ["SkipLog", "load_examples", "carve_dev", "bucket_batches", "class_weights"]


class SkipLog:
    """Utterances dropped under ``data.skip_bad``, by split and reason; every id is kept for results.json."""

    def __init__(self):
        self.by_split: dict[str, dict[str, str]] = {}  # split -> {cut id: reason}
        self.origin: dict[str, str] = {}  # cut id -> the split it was read from
        self.trials_dropped = 0

    def add(self, split: str, cut_id: str, reason: str) -> None:
        self.by_split.setdefault(split, {})[cut_id] = reason

    def __contains__(self, cut_id: str) -> bool:
        return any(cut_id in ids for ids in self.by_split.values())

    def counts(self, split: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for reason in self.by_split.get(split, {}).values():
            out[reason] = out.get(reason, 0) + 1
        return out

    def report(self) -> dict:
        out = {split: {"skipped": self.counts(split),
                       "dropped_ids": {r: sorted(i for i, x in ids.items() if x == r) for r in self.counts(split)}}
               for split, ids in self.by_split.items() if ids}
        if self.trials_dropped:
            out["trials_dropped"] = self.trials_dropped
        return out


def load_examples(manifest_dir: str, split: str, field_name: str, *, max_utts: int = 0,
                  min_duration: float = 0.0, fold_field: str | None = None,
                  skips: SkipLog | None = None) -> list[Example]:
    """Examples of ``manifest_dir/cuts_SPLIT.jsonl.gz`` with their ``field_name`` label. A cut without it is an
    error naming the cut, or, given ``skips`` (``data.skip_bad``), counted there as ``missing_field``."""
    path = Path(manifest_dir) / f"cuts_{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found (config keys data.manifest_dir / split '{split}')")
    out = []
    for cut in filter_durations(open_cuts(path, "data.manifest_dir"), min_duration):
        label = supervision_field(cut, field_name)
        if label is None or label == "":
            if skips is None:
                raise ValueError(f"cut {cut.id} in {path} has no supervision field '{field_name}': fix the manifest "
                                 "or set data.skip_bad=true to skip such cuts (counted in results.json)")
            skips.add(split, cut.id, "missing_field")
            continue
        if skips is not None:
            skips.origin[cut.id] = split
        session = supervision_field(cut, fold_field) if fold_field else None
        out.append(Example(id=cut.id, num_samples=int(round(cut.duration * SAMPLE_RATE)), label=label, cut=cut,
                           session=None if session is None else int(session)))
        if max_utts and len(out) >= max_utts:
            break
    if not out:
        raise ValueError(f"manifest {path} gives no usable utterances (min_duration={min_duration})")
    return out


def carve_dev(train: list[Example], fraction: float, seed: int, by_label: bool = False
              ) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the training utterances as dev. ``by_label`` (ASV) holds out whole speakers
    instead (at least two), so dev trials, like the test trials, compare speakers the head never trained on."""
    rng = np.random.default_rng(seed)
    if not by_label:
        idx = rng.permutation(len(train))
        n = max(1, int(round(fraction * len(train))))
        dev = set(idx[:n].tolist())
        return [e for i, e in enumerate(train) if i not in dev], [e for i, e in enumerate(train) if i in dev]
    labels = sorted({str(e.label) for e in train})
    n = max(2, int(round(fraction * len(labels))))
    if len(labels) - n < 2:
        raise ValueError(f"cannot hold out {n} of {len(labels)} training speakers as dev and keep two for "
                         f"training (config keys data.dev_fraction / data.dev_split)")
    held = set(rng.permutation(labels)[:n].tolist())
    return [e for e in train if str(e.label) not in held], [e for e in train if str(e.label) in held]


def bucket_batches(lengths: Sequence[int], max_samples: int, num_buckets: int = 10,
                   rng: np.random.Generator | None = None, weights: Sequence[float] | None = None) -> list[list[int]]:
    """Duration-bucketed batches of indices: similar lengths together, at most ``max_samples`` padded samples
    per batch (a longer single utterance gets a batch of its own).

    The batcher over cached hidden states: a task's batches are rebuilt every epoch of every learning-rate trial
    from lengths alone, so it stays a few numpy operations instead of a Lhotse sampler over cuts (the audio of
    these utterances is read through ``SpeechDataset`` by :class:`~speechssl.superb.cache.FeatureSource`).

    ``rng``: shuffle within buckets and the batch order (None = sorted, for evaluation). ``weights``: draw the
    epoch's indices with replacement in proportion to them (class-balanced sampling).
    """
    n = len(lengths)
    if rng is not None and weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        idx = rng.choice(n, size=n, replace=True, p=w / w.sum())
    else:
        idx = np.arange(n)
    lens = np.asarray(lengths)[idx]
    order = idx[np.argsort(lens, kind="stable")]
    buckets = np.array_split(order, max(1, min(num_buckets, n))) if rng is not None else [order]
    batches = []
    for b in buckets:
        b = list(b)
        if rng is not None:
            # shuffle inside the bucket but keep it sorted by length so batches stay tight
            rng.shuffle(b)
            b.sort(key=lambda i: lengths[i])
        cur, cur_max = [], 0
        for i in b:
            m = max(cur_max, lengths[i])
            if cur and m * (len(cur) + 1) > max_samples:
                batches.append(cur)
                cur, m = [], lengths[i]
            cur.append(int(i))
            cur_max = m
        if cur:
            batches.append(cur)
    if rng is not None:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def class_weights(examples: Sequence[Example]) -> list[float]:
    counts: dict[str, int] = {}
    for e in examples:
        counts[str(e.label)] = counts.get(str(e.label), 0) + 1
    return [1.0 / counts[str(e.label)] for e in examples]
