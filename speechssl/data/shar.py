"""Lhotse Shar shards for streaming large corpora (tens of thousands of hours) without loading a manifest.

``export_shar(cuts, out_dir, shard_size, fields)`` writes ``cuts.NNNNNN.jsonl.gz`` plus one tar per field and
shard (audio as FLAC by default, unit labels as lossless numpy). ``open_shar_cuts(dir, seed)`` reads them back
lazily (metadata and audio in shard order; ``speechssl.data.loader.training_cuts`` uses it for the first cuts).
Training reads shards through ``make_resumable_shar_loader`` (what ``speechssl.data.loader.build_loader`` builds
for ``data.shar_dir``).

Exact resume: Lhotse 1.33 has no state_dict for a Shar stream, so ``make_resumable_shar_loader`` builds its own
(``ResumableSharLoader``): shards are shuffled per epoch from ``seed``, split per rank then per worker, and every
worker runs a ``DynamicBucketingSampler`` over the cut manifests of its shards. Audio and arrays are attached to a
cut only when its batch is handed to the dataset, by random access into the shard's tar (``tarfile`` reads the
member headers, then only the members asked for). The loader counts the batches the training loop consumed from
each worker; on resume each worker replays its sampler over the cut manifests (``cuts.NNNNNN.jsonl.gz``) to skip
exactly those batches, reading no audio, and the main process merges the workers' batches in a fixed round-robin
order, so K steps + resume + N-K steps see the same batches as N steps straight.
"""
from __future__ import annotations

import logging
import random
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from speechssl.data.sampler import DurationFilter, check_not_all_bad, count_skips, estimate_duration_bins, is_empty_batch, log_skips

log = logging.getLogger(__name__)

AUDIO_FORMATS = ("flac", "wav", "opus", "original")


def default_fields(cuts, audio_format: str = "flac", units: Sequence[str] | None = None) -> dict[str, str]:
    """``{"recording": audio_format, unit_name: "numpy", ...}``; unit names found on the first cut if not given."""
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"export_shar: audio format must be one of {AUDIO_FORMATS}, got {audio_format!r}")
    fields = {"recording": audio_format}
    if units is None:
        first = next(iter(cuts), None)
        units = [k for k, v in ((first.custom or {}).items() if first is not None else [])
                 if hasattr(v, "frame_shift") or hasattr(v, "storage_type")]
    for u in units:
        fields[u] = "numpy"
    return fields


def export_shar(cuts, out_dir, shard_size: int = 1000, fields: dict[str, str] | Sequence[str] | None = None,
                num_jobs: int = 1) -> dict[str, list[str]]:
    """Write ``cuts`` as Lhotse Shar under ``out_dir``; returns ``{field: [shard paths]}``.

    ``fields``: a dict ``{field: format}`` (``recording`` -> flac|wav|opus|original, array fields -> numpy),
    a list of custom array names to include next to FLAC audio, or None for audio plus every array field of
    the first cut. Integer unit labels stay exact (numpy format).
    """
    from lhotse import CutSet

    if shard_size < 1:
        raise ValueError(f"export_shar: shard_size must be >= 1, got {shard_size}")
    if isinstance(cuts, (str, Path)):
        cuts = CutSet.from_file(cuts)
    if fields is None or isinstance(fields, (list, tuple)):
        fields = default_fields(cuts, units=None if fields is None else list(fields))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = cuts.to_shar(out, fields=dict(fields), shard_size=shard_size, num_jobs=num_jobs, verbose=False)
    log.info("wrote %d shards with fields %s to %s", len(written.get("cuts", [])), list(fields), out)
    return written


def open_shar_cuts(shar_dir, seed: int | str = 0, split_for_dataloading: bool = True, shuffle_shards: bool = True):
    """A lazy CutSet over the Shar shards in ``shar_dir``.

    With ``split_for_dataloading`` each DDP node, then each dataloader worker, reads a disjoint subset of shards
    (Lhotse's ``make_worker_init_fn`` sets that up). Shard order is reshuffled every epoch from ``seed``.
    """
    from lhotse import CutSet

    d = Path(shar_dir)
    if not any(d.glob("cuts.*.jsonl*")):
        raise FileNotFoundError(f"open_shar_cuts: no Shar shards (cuts.NNNNNN.jsonl.gz) in {d}")
    return CutSet.from_shar(in_dir=d, split_for_dataloading=split_for_dataloading, shuffle_shards=shuffle_shards,
                            stateful_shuffle=True, seed=seed)


# ------------------------------------------------------------------------------------------------ exact resume
WORKER_KEY = "_shar_worker"   # batch key: the dataloader worker that produced the batch (popped by the loader)
END_KEY = "_shar_end"         # marker item: that worker's stream for this epoch is over


def list_shards(shar_dir) -> list[dict[str, Path]]:
    """The shards of a Shar directory as ``[{"cuts": path, field: tar path, ...}, ...]`` in shard order.

    Raises FileNotFoundError (no shards) or ValueError (a field with a different number of shards)."""
    d = Path(shar_dir)
    cut_paths = sorted(p for p in d.glob("cuts.*.jsonl*"))
    if not cut_paths:
        raise FileNotFoundError(f"no Shar shards (cuts.NNNNNN.jsonl.gz) in {d}")
    fields: dict[str, list[Path]] = {}
    for p in sorted(d.glob("*.*.tar")):
        fields.setdefault(p.name.split(".")[0], []).append(p)
    other = sorted({p.name.split(".")[0] for p in d.glob("*.*.jsonl*")} - {"cuts"})
    if other:
        raise ValueError(f"Shar directory {d}: fields {other} are stored as jsonl; the resumable Shar loader reads "
                         "tar fields only (export them as arrays, or train from jsonl manifests)")
    for name, paths in fields.items():
        if len(paths) != len(cut_paths):
            raise ValueError(f"Shar directory {d}: field '{name}' has {len(paths)} shards but there are "
                             f"{len(cut_paths)} cut shards")
    return [{"cuts": c, **{name: paths[i] for name, paths in fields.items()}} for i, c in enumerate(cut_paths)]


def shards_for(shards: list, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int, worker: int,
               num_workers: int) -> list:
    """The shards one worker of one rank reads in ``epoch``: shuffled from ``seed + epoch``, then every
    ``world_size``-th for the rank and every ``num_workers``-th of those for the worker."""
    order = list(shards)
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order[rank::world_size][worker::num_workers]


class _ShardCuts:
    """Re-iterable cuts of some shards, read from the cut manifests only; each cut remembers its shard."""

    def __init__(self, shards: list):
        self.shards = shards

    def __iter__(self):
        from lhotse.lazy import LazyManifestIterator

        for i, shard in enumerate(self.shards):
            for cut in LazyManifestIterator(shard["cuts"]):
                cut.shard_origin = str(shard["cuts"])
                yield cut


class _TarIndex:
    """Random access to one Shar tar: member headers are read once, data only for the cuts asked for."""

    def __init__(self, path: Path):
        import tarfile

        self.path = path
        self.tar = tarfile.open(path, mode="r:")
        self.members: dict[str, dict[str, Any]] = {}
        for m in self.tar.getmembers():
            stem, _, ext = m.name.rpartition(".")
            self.members.setdefault(stem, {})[ext] = m

    def read(self, cut_id: str):
        """(manifest with the data attached, data path) or (None, None) when the cut has no value here."""
        from lhotse.serialization import decode_json_line, deserialize_item
        from lhotse.shar.utils import fill_shar_placeholder

        entry = self.members.get(cut_id)
        if entry is None:
            raise KeyError(f"Shar tar {self.path} has no member for cut '{cut_id}'")
        if "nodata" in entry or "json" not in entry:
            return None, None
        data_ext = next((e for e in entry if e != "json"), None)
        if data_ext is None:
            raise KeyError(f"Shar tar {self.path}: cut '{cut_id}' has metadata but no data member")
        data = self.tar.extractfile(entry[data_ext]).read()
        meta = deserialize_item(decode_json_line(self.tar.extractfile(entry["json"]).read().decode("utf-8")))
        path = Path(entry[data_ext].name)
        fill_shar_placeholder(manifest=meta, data=data, tarpath=path)
        return meta, path

    def close(self) -> None:
        self.tar.close()


class _TarCache:
    """A few open ``_TarIndex`` (the sampler's buffer spans several shards); least recently used closed first."""

    def __init__(self, size: int = 64):
        self.size = size
        self.open: OrderedDict[Path, _TarIndex] = OrderedDict()

    def get(self, path: Path) -> _TarIndex:
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        idx = self.open[path] = _TarIndex(path)
        if len(self.open) > self.size:
            self.open.popitem(last=False)[1].close()
        return idx

    def close(self) -> None:
        for t in self.open.values():
            t.close()
        self.open.clear()


def hydrate(cuts, shard_by_cuts_path: dict[str, dict], cache: _TarCache) -> None:
    """Attach every field's data (audio, arrays) to ``cuts`` read by ``_ShardCuts``, in place."""
    for cut in cuts:
        shard = shard_by_cuts_path[cut.shard_origin]
        for field, path in shard.items():
            if field == "cuts":
                continue
            manifest, _ = cache.get(path).read(cut.id)
            if manifest is not None:
                setattr(cut, field, manifest)


class SharBatchStream(torch.utils.data.IterableDataset):
    """Batches of one rank's shards, run inside each dataloader worker (or the main process without workers).

    Every item is a batch dict from ``dataset`` with ``WORKER_KEY`` added, and each worker ends its epoch with a
    ``{END_KEY: True, WORKER_KEY: w}`` marker. ``skip[w]`` batches of worker ``w`` are replayed on the cut
    manifests only and not yielded (resume). Everything here is picklable (workers get a copy per epoch).
    """

    def __init__(self, shards: list, dataset, *, duration_bins: Sequence[float], max_duration: float,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, buffer_size: int = 10000,
                 min_duration: float = 0.0, max_cut_duration: float | None = None):
        super().__init__()
        self.shards, self.dataset = shards, dataset
        self.duration_bins = list(duration_bins)
        self.max_duration, self.seed, self.shuffle = max_duration, int(seed), shuffle
        self.rank, self.world_size, self.buffer_size = rank, world_size, buffer_size
        self.keep = DurationFilter(min_duration, max_cut_duration)
        self.epoch = 0
        self.skip: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def _sampler(self, shards: list, worker: int):
        from lhotse import CutSet
        from lhotse.dataset import DynamicBucketingSampler

        cuts = CutSet(_ShardCuts(shards))
        if self.keep.active:
            cuts = cuts.filter(self.keep)
        sampler = DynamicBucketingSampler(
            cuts, max_duration=self.max_duration, duration_bins=self.duration_bins, shuffle=self.shuffle,
            # distinct in-buffer shuffles per rank and worker; the same for a given (rank, worker, epoch)
            seed=self.seed + 1000 * self.rank + worker, buffer_size=self.buffer_size, rank=0, world_size=1)
        sampler.set_epoch(self.epoch)
        return sampler

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = shards_for(self.shards, self.epoch, self.seed, self.shuffle, self.rank, self.world_size, worker,
                          num_workers)
        skip = self.skip[worker] if worker < len(self.skip) else 0
        n = 0
        if mine:
            by_path = {str(s["cuts"]): s for s in mine}
            cache = _TarCache()
            try:
                for cuts in self._sampler(mine, worker):
                    n += 1
                    if n <= skip:
                        continue  # consumed before the checkpoint: skipped on the manifests, no audio read
                    hydrate(cuts, by_path, cache)
                    batch = self.dataset[cuts]
                    batch[WORKER_KEY] = worker
                    yield batch
            finally:
                cache.close()
        if n < skip:
            raise RuntimeError(f"Shar resume: worker {worker} of rank {self.rank} has {n} batches in epoch "
                               f"{self.epoch} but the checkpoint says {skip} were consumed (shards changed?)")
        yield {END_KEY: True, WORKER_KEY: worker}


class ResumableSharLoader:
    """Iterable over Shar batches with exact mid-epoch resume (the ``ResumableLoader`` interface).

    Batches from the workers are merged in a fixed order (worker 0, 1, ..., skipping finished workers), which
    is also the order torch's DataLoader delivers them in, so the sequence does not depend on timing. The state
    holds the epoch, the batches consumed from each worker, which workers are done and the merge cursor.
    """

    def __init__(self, stream: SharBatchStream, num_workers: int = 0, prefetch_factor: int | None = 2,
                 pin_memory: bool = False):
        self.stream = stream
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor if self.num_workers > 0 else None
        self.pin_memory = pin_memory
        self.epoch = 0
        self._reset_position()
        self._restored = False
        self.skipped: Counter = Counter()
        self.skipped_batches = 0  # batches with no good cut, not yielded (see ResumableLoader)
        self.stream.set_epoch(0)

    @property
    def _slots(self) -> int:
        return max(1, self.num_workers)

    def _reset_position(self) -> None:
        self.consumed = [0] * self._slots
        self.done = [False] * self._slots
        self.cursor = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` on the next pass; right after ``load_state_dict`` the restored epoch keeps its position."""
        if self._restored and int(epoch) == self.epoch:
            return
        self.epoch = int(epoch)
        self._restored = False
        self._reset_position()
        self.stream.set_epoch(self.epoch)

    def _worker_init(self, worker_id: int) -> None:
        import numpy as np

        s = (self.stream.seed + 100003 * self.stream.rank + 1009 * worker_id + 7 * self.epoch) % 2**32
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def __iter__(self) -> Iterator[dict]:
        if not self._restored:
            self._reset_position()
        self._restored = False
        self.stream.skip = list(self.consumed)
        dl = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
            pin_memory=self.pin_memory, worker_init_fn=self._worker_init if self.num_workers else None,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.epoch))  # no draw from the global RNG (exact resume)
        it = iter(dl)
        pending: dict[int, deque] = {w: deque() for w in range(self._slots)}
        whole_epoch, yielded, emptied = sum(self.consumed) == 0, 0, 0
        try:
            while not all(self.done):
                w = self.cursor
                if self.done[w]:
                    self.cursor = (w + 1) % self._slots
                    continue
                while not pending[w]:
                    try:
                        item = next(it)
                    except StopIteration:
                        raise RuntimeError(f"Shar loader: worker {w} stopped without its end marker") from None
                    pending[int(item[WORKER_KEY])].append(item)
                item = pending[w].popleft()
                self.cursor = (w + 1) % self._slots
                if item.get(END_KEY):
                    self.done[w] = True
                    continue
                item.pop(WORKER_KEY)
                count_skips(self.skipped, item)
                self.consumed[w] += 1  # yielded or not: the per-worker fast-forward replays consumed batches
                if is_empty_batch(item):  # every cut bad: nothing to train on, draw the next batch
                    emptied += 1
                    self.skipped_batches += 1
                    continue
                yielded += 1
                yield item
        finally:
            del it  # shuts the workers down when the caller stops early
        log_skips(self.epoch, self.skipped, self.skipped_batches)
        if whole_epoch:
            check_not_all_bad(self.epoch, yielded, emptied, self.skipped)
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"kind": "shar", "epoch": self.epoch, "consumed": list(self.consumed), "done": list(self.done),
                "cursor": self.cursor, "skipped": dict(self.skipped), "skipped_batches": self.skipped_batches,
                "num_workers": self.num_workers,
                "rank": self.stream.rank, "world_size": self.stream.world_size,
                "num_shards": len(self.stream.shards)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``: the next pass starts at the first batch not consumed before it."""
        if state.get("kind") != "shar":
            raise ValueError("ResumableSharLoader.load_state_dict: not a Shar loader state (the checkpoint was "
                             "written by a run on jsonl manifests?)")
        self.epoch = int(state["epoch"])
        self.skipped = Counter(state.get("skipped", {}))
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self.stream.set_epoch(self.epoch)
        same = (state.get("num_workers") == self.num_workers and state.get("world_size") == self.stream.world_size
                and state.get("num_shards") == len(self.stream.shards))
        if not same:
            log.warning("Shar resume: the checkpoint was written with num_workers=%s, world_size=%s, %s shards; now "
                        "%s, %s, %s: the shard split differs, epoch %d starts over", state.get("num_workers"),
                        state.get("world_size"), state.get("num_shards"), self.num_workers,
                        self.stream.world_size, len(self.stream.shards), self.epoch)
            self._reset_position()
        else:
            self.consumed = [int(x) for x in state["consumed"]]
            self.done = [bool(x) for x in state["done"]]
            self.cursor = int(state["cursor"])
        self._restored = True

    def __len__(self):
        raise TypeError("ResumableSharLoader has no length: the batch count of a Shar stream is not known ahead")


def estimate_shar_duration_bins(shards: list, num_buckets: int, max_duration: float, seed: int = 0) -> list[float]:
    """Bucket boundaries from the durations of the first 10k cuts of the shards in a seeded order (manifests
    only), so that every rank and a resumed run get the same bins."""
    order = list(shards)
    random.Random(seed).shuffle(order)
    return estimate_duration_bins(_ShardCuts(order), num_buckets, max_duration)


def make_resumable_shar_loader(shar_dir, dataset, *, max_duration: float, num_workers: int = 2, seed: int = 0,
                               rank: int | None = None, world_size: int | None = None, shuffle: bool = True,
                               num_buckets: int = 10, duration_bins: Sequence[float] | None = None,
                               buffer_size: int = 10000, min_duration: float = 0.0,
                               max_cut_duration: float | None = None) -> ResumableSharLoader:
    """A ``ResumableSharLoader`` over the shards in ``shar_dir`` (see the module docstring).

    ``rank``/``world_size`` default to torch.distributed's. Each rank reads every ``world_size``-th shard of the
    epoch's shuffled order (a rank may get a different number of batches than another; the trainer handles
    that), each worker every ``num_workers``-th of those. Example::

        loader = make_resumable_shar_loader("data/shar", SpeechDataset(), max_duration=200)
        for batch in loader: ...
        state = loader.state_dict()      # later: loader.load_state_dict(state) continues exactly
    """
    if max_duration <= 0:
        raise ValueError(f"make_resumable_shar_loader: max_duration must be positive, got {max_duration}")
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    shards = list_shards(shar_dir)
    if len(shards) < world_size:
        log.warning("Shar: %d shards for %d ranks: some ranks get no data (export with a smaller shard_size)",
                    len(shards), world_size)
    bins = list(duration_bins) if duration_bins is not None else estimate_shar_duration_bins(
        shards, num_buckets, max_duration, seed)
    stream = SharBatchStream(shards, dataset, duration_bins=bins, max_duration=max_duration, seed=seed,
                             shuffle=shuffle, rank=rank, world_size=world_size, buffer_size=buffer_size,
                             min_duration=min_duration, max_cut_duration=max_cut_duration)
    return ResumableSharLoader(stream, num_workers=num_workers)
