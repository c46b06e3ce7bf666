"""Duration-bucketed, DDP-aware sampling with exact resume, and the loaders built on it.

``make_sampler`` wraps Lhotse's ``DynamicBucketingSampler`` (any number of cuts, lazy manifests included).
``ResumableLoader`` wraps a torch DataLoader (map-style: the sampler runs in the main process and workers only
load audio) and counts the batches the training loop actually consumed. Lhotse's own sampler state counts the
batches it handed to the DataLoader, which runs ahead with workers and prefetch; ``ResumableLoader.state_dict()``
rewrites that count to the consumed one, so ``load_state_dict()`` resumes at exactly the next unseen batch.
``mix_labeled`` mixes transcribed cuts into the unlabeled stream at a fixed ratio (UniSpeech's multi-task
pretraining). ``speechssl.data.loader.build_loader`` builds them from the ``data:`` config.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DurationFilter:
    """``filter(cut)``: True for cuts of ``min_duration`` to ``max_duration`` seconds (None = no upper limit).

    A picklable callable, so that it also runs inside dataloader workers (Shar streams)."""

    min_duration: float = 0.0
    max_duration: float | None = None

    @property
    def active(self) -> bool:
        return self.min_duration > 0 or self.max_duration is not None

    def __call__(self, cut) -> bool:
        return cut.duration >= self.min_duration and (self.max_duration is None or cut.duration <= self.max_duration)


LABELED_KEY = "labeled"
"""Custom field ``mix_labeled`` sets on the cuts it draws from the labeled set (the dataset's per-utterance flag:
the labeled and unlabeled sets may hold the same kinds of supervision, so only the source tells them apart)."""


def mark_labeled(cut):
    """``cut`` with the custom field ``LABELED_KEY`` set (a module-level function: lazy CutSets keep it)."""
    return cut.with_custom(LABELED_KEY, True)


def mix_labeled(unlabeled, labeled, ratio: float, seed: int):
    """One lazy CutSet drawing each next cut from ``labeled`` with probability ``ratio`` and from ``unlabeled``
    otherwise (Lhotse's ``CutSet.mux`` with weights ``[1 - ratio, ratio]``, seeded, so every pass and every
    resume sees the same order before the sampler's shuffle). The labeled cuts are repeated without end and
    marked with ``LABELED_KEY``; the stream ends with the unlabeled cuts, so an epoch is one pass over them with
    about ``ratio / (1 - ratio)`` labeled cuts per unlabeled one."""
    from lhotse import CutSet

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"config key 'data.labeled_ratio' must be in (0, 1), got {ratio}")
    return CutSet.mux(unlabeled, labeled.map(mark_labeled).repeat(), weights=[1.0 - ratio, ratio],
                      stop_early=True, seed=int(seed))


def estimate_duration_bins(cuts, num_buckets: int, max_duration: float, num_cuts: int = 10000) -> list[float]:
    """Bucket boundaries (seconds) from the durations of the first ``num_cuts`` cuts, read lazily.

    As Lhotse estimates them, but for any number of cuts: with fewer cuts than ``num_buckets`` there are that
    many buckets, and with fewer than two a single bucket holds everything (Lhotse's estimate asserts instead).
    """
    from lhotse.dataset.sampling.base import TimeConstraint
    from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

    head = list(islice(iter(cuts), num_cuts))
    if len(head) < 2 or num_buckets < 2:
        return [max((c.duration for c in head), default=1.0) + 1.0]
    return [float(b) for b in estimate_duration_buckets(head, num_buckets=min(num_buckets, len(head)),
                                                        constraint=TimeConstraint(max_duration=max_duration))]


def make_sampler(cuts, *, max_duration: float, num_buckets: int = 10, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, world_size: int | None = None, rank: int | None = None,
                 duration_bins: Sequence[float] | None = None, buffer_size: int = 10000):
    """A ``lhotse.dataset.DynamicBucketingSampler`` over ``cuts`` (eager or lazy).

    ``max_duration`` is the padded audio seconds per batch; ``world_size``/``rank`` default to
    torch.distributed's when initialised (each rank gets every world_size-th batch, equal counts on all ranks);
    ``duration_bins`` defaults to ``estimate_duration_bins`` over the first 10k cuts (pass it for sorted corpora).
    """
    from lhotse.dataset import DynamicBucketingSampler

    if max_duration <= 0:
        raise ValueError(f"make_sampler: argument 'max_duration' must be positive, got {max_duration}")
    if duration_bins is None:
        duration_bins = estimate_duration_bins(cuts, num_buckets, max_duration)
    with warnings.catch_warnings():  # eager CutSets are fine for small corpora; Lhotse warns regardless
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
        return DynamicBucketingSampler(cuts, max_duration=max_duration, shuffle=shuffle, seed=seed,
                                       drop_last=drop_last, world_size=world_size, rank=rank,
                                       buffer_size=buffer_size, duration_bins=list(duration_bins))


class ResumableLoader:
    """Iterable over batches from ``sampler`` + ``dataset`` with exact mid-epoch resume.

    Args:
        sampler: a Lhotse CutSampler (``make_sampler``).
        dataset: a map-style dataset taking a CutSet (``speechssl.data.dataset.SpeechDataset``).
        num_workers, prefetch_factor, pin_memory: as in ``torch.utils.data.DataLoader``.

    One ``for batch in loader`` pass is one epoch (or the rest of it after a resume); when a pass ends the
    loader moves to the next epoch itself (call ``set_epoch`` to choose one). Cuts the dataset skipped as bad
    are counted in ``loader.skipped`` and logged when the pass ends. A batch whose cuts were all bad is not
    yielded (a model cannot run on zero utterances): the loader counts it in ``loader.skipped_batches`` and
    draws the next one, and it still counts as consumed, so a resume does not replay it.
    """

    def __init__(self, sampler, dataset, num_workers: int = 0, prefetch_factor: int | None = 2,
                 pin_memory: bool = False, worker_init_fn=None):
        self.sampler = sampler
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor if self.num_workers > 0 else None
        self.pin_memory = pin_memory
        self.worker_init_fn = worker_init_fn
        self.epoch = int(getattr(sampler, "epoch", 0))
        self.consumed = 0  # batches of the current epoch the caller has received
        self._restored = False
        self.skipped: Counter = Counter()
        self.skipped_batches = 0
        self._sync_dataset_epoch()

    def _sync_dataset_epoch(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` on the next pass (a new shuffle).

        Right after ``load_state_dict`` a call for the restored epoch keeps the restored position, so the
        usual ``set_epoch(e); load_state_dict(s)`` or ``load_state_dict(s); set_epoch(e)`` orders both resume.
        """
        if self._restored and int(epoch) == self.epoch:
            return
        self.epoch = int(epoch)
        self.consumed = 0
        self._restored = False
        self.sampler.set_epoch(self.epoch)
        self._sync_dataset_epoch()

    def __iter__(self) -> Iterator[dict]:
        if not self._restored:
            self.consumed = 0
        self._restored = False
        dl = torch.utils.data.DataLoader(
            self.dataset, sampler=self.sampler, batch_size=None, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
            worker_init_fn=self.worker_init_fn, persistent_workers=False,
            # own generator: creating the iterator must not draw from the global torch RNG (exact resume)
            generator=torch.Generator().manual_seed(self.epoch),
        )
        whole_epoch, yielded, emptied = self.consumed == 0, 0, 0
        for batch in dl:
            count_skips(self.skipped, batch)
            # consumed counts sampler batches, yielded or not: the sampler's fast-forward replays exactly those
            self.consumed += 1
            if is_empty_batch(batch):
                emptied += 1
                self.skipped_batches += 1
                continue
            yielded += 1
            yield batch
        log_skips(self.epoch, self.skipped, self.skipped_batches)
        if whole_epoch:
            check_not_all_bad(self.epoch, yielded, emptied, self.skipped)
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        """Sampler state with its batch count rewritten to the batches consumed so far this epoch."""
        sd = copy.deepcopy(self.sampler.state_dict())
        diag = sd["diagnostics"]
        cur = diag["current_epoch"]
        if cur != self.epoch:  # the sampler was never iterated in this epoch
            diag["current_epoch"] = self.epoch
            sd["epoch"] = self.epoch
        stats = diag["stats_per_epoch"].setdefault(
            self.epoch, {"epoch": self.epoch, "kept_cuts": 0, "discarded_cuts": 0, "kept_batches": 0,
                         "discarded_batches": 0})
        # the sampler's fast-forward replays kept + discarded batches: make that exactly what was consumed
        stats["kept_batches"] = self.consumed
        stats["discarded_batches"] = 0
        return {"sampler": sd, "epoch": self.epoch, "consumed": self.consumed, "skipped": dict(self.skipped),
                "skipped_batches": self.skipped_batches}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; the next pass yields the first batch not consumed before it was saved."""
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self.skipped = Counter(state.get("skipped", {}))
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self._sync_dataset_epoch()
        self.sampler.load_state_dict(copy.deepcopy(state["sampler"]))
        self._restored = True

    def __len__(self):
        raise TypeError("ResumableLoader has no length: Lhotse's dynamic samplers do not know their batch count")


def count_skips(skipped: Counter, batch: dict) -> None:
    """Count, by reason, the bad cuts the dataset dropped from ``batch`` (and take the list off the batch)."""
    for _cut_id, reason in batch.pop("skipped", None) or ():
        skipped[reason] += 1


def is_empty_batch(batch) -> bool:
    """True for a dataset batch with no utterance left (every cut was bad and skipped)."""
    ids = batch.get("cut_ids") if isinstance(batch, dict) else None
    return ids is not None and len(ids) == 0


def log_skips(epoch: int, skipped: Counter, skipped_batches: int) -> None:
    if skipped:
        log.warning("epoch %d: skipped %d bad cuts so far: %s%s", epoch, sum(skipped.values()), dict(skipped),
                    f"; {skipped_batches} batches had no good cut and were skipped" if skipped_batches else "")


def check_not_all_bad(epoch: int, yielded: int, emptied: int, skipped: Counter) -> None:
    """A whole epoch that drew batches but could yield none means every cut was bad: say so instead of letting
    the caller report an empty epoch."""
    if yielded == 0 and emptied > 0:
        raise RuntimeError(f"epoch {epoch}: every batch of this pass ({emptied}) held only bad cuts ({dict(skipped)} "
                           "skipped so far): fix the data (speechssl prepare validate DIR --decode lists them)")
