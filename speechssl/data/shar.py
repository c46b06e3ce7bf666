"""Lhotse Shar shards for streaming large corpora (tens of thousands of hours) without loading a manifest.

``export_shar(cuts, out_dir, shard_size, fields)`` writes ``cuts.NNNNNN.jsonl.gz`` plus one tar per field and
shard (audio as FLAC by default, unit labels as lossless numpy). ``open_shar_cuts(dir, seed)`` reads them back
lazily, split across DDP ranks and dataloader workers; ``make_shar_loader`` builds the iterable DataLoader
(Lhotse's ``IterableDatasetWrapper``: the sampler lives in each worker, which streams its own shards).

Resume: Lhotse 1.33 has no state_dict for a Shar stream; a resumed run re-reads shards in a new shuffle order
(use the jsonl manifests with ``ResumableLoader`` when exact mid-epoch resume matters).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

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
    (set up by ``make_shar_loader``'s worker_init_fn). Shard order is reshuffled every epoch from ``seed``.
    """
    from lhotse import CutSet

    d = Path(shar_dir)
    if not any(d.glob("cuts.*.jsonl*")):
        raise FileNotFoundError(f"open_shar_cuts: no Shar shards (cuts.NNNNNN.jsonl.gz) in {d}")
    return CutSet.from_shar(in_dir=d, split_for_dataloading=split_for_dataloading, shuffle_shards=shuffle_shards,
                            stateful_shuffle=True, seed=seed)


def make_shar_loader(shar_dir, dataset, *, max_duration: float, num_workers: int = 2, seed: int = 0,
                     rank: int | None = None, world_size: int | None = None, shuffle: bool = True,
                     num_buckets: int = 10, duration_bins: Sequence[float] | None = None,
                     buffer_size: int = 10000):
    """A torch DataLoader streaming batches from Shar shards (iterable-style, for corpora too big for jsonl).

    Each worker runs its own bucketing sampler over the shards it owns; ``rank``/``world_size`` default to
    torch.distributed's when initialised. Returns a DataLoader whose ``dataset.set_epoch(e)`` reshuffles.
    """
    import torch
    from lhotse.dataset import DynamicBucketingSampler
    from lhotse.dataset.dataloading import make_worker_init_fn
    from lhotse.dataset.iterable_dataset import IterableDatasetWrapper

    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    cuts = open_shar_cuts(shar_dir, seed=seed)
    kwargs = dict(max_duration=max_duration, shuffle=shuffle, seed=seed, buffer_size=buffer_size,
                  rank=0, world_size=1)  # shards already split per node and worker
    if duration_bins is not None:
        kwargs["duration_bins"] = list(duration_bins)
    else:
        kwargs["num_buckets"] = num_buckets
    sampler = DynamicBucketingSampler(cuts, **kwargs)
    wrapper = IterableDatasetWrapper(dataset=dataset, sampler=sampler)
    return torch.utils.data.DataLoader(
        wrapper, batch_size=None, num_workers=num_workers,
        worker_init_fn=make_worker_init_fn(rank=rank, world_size=world_size, seed=seed),
    )
