"""Extraction of a whole corpus: cuts -> batches by duration -> a source (layers, units) -> arrays + manifest.

``extract_corpus(cuts, out_dir, source)`` streams a CutSet through the toolkit's one data path
(``speechssl.data.loader``: lazy ``open_cuts``, the ``SpeechDataset`` of ``build_dataset`` without crops, and the
resumable duration-bucketed ``ResumableLoader``, its audio loaded by ``num_workers`` processes while the model
runs) and writes each cut's fields as it goes (:mod:`speechssl.extract.writer`), so memory does not grow with the
corpus. ``OUT/`` then holds::

    extract.json        the settings (source, layers, fields and their frame shifts, batching), the counts,
                        "finished": true once the manifest is complete
    cuts.jsonl.gz       the output manifest: every cut, with cut.custom[field] pointing to its array
    parts/rank-R-of-W/  what process R wrote: arrays per field, its manifest part, its resume point

**Several processes** (``accelerate launch`` / ``torchrun``, a ``Runtime`` per process): each takes the cuts whose
id hashes to its rank (``crc32(id) % world``; no cut is dropped or repeated), extracts them into its own part, and
rank 0 merges the parts into one manifest once every rank is done.

**Resume**: rerunning the same extraction into the same ``OUT`` keeps every finished batch and continues each
process's loader where it stopped, so the result equals an uninterrupted run; different settings (another layer,
model, batch size or process count) are refused, naming what changed.

A source is any object with ``fields`` (name -> :class:`~speechssl.extract.hidden.FieldSpec`), ``describe()``
(a dict for ``extract.json``) and ``source(batch) -> {field: [array per utterance]}``:
:class:`~speechssl.extract.hidden.HiddenStates`, :class:`~speechssl.extract.units.UnitSource`, or k-means units
(``speechssl.train.units.KMeansUnits``).
"""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from speechssl.constants import SAMPLE_RATE
from speechssl.data.loader import DataConfig, build_dataset, open_cuts
from speechssl.data.sampler import ResumableLoader, make_sampler
from speechssl.extract.writer import PartWriter, merge_parts, part_dir, remove_outputs
from speechssl.utils.io import atomic_write_json
from speechssl.utils.progress import progress_bar

__all__ = ["ExtractOptions", "RankShard", "extraction_loader", "extract_corpus", "read_record", "update_record", "RECORD"]
log = logging.getLogger(__name__)

RECORD = "extract.json"


@dataclass
class ExtractOptions:
    """How an extraction reads its cuts and stores its fields."""

    max_duration: float = 100.0  # padded seconds of audio per batch and process
    num_buckets: int = 10        # duration buckets (batches hold cuts of similar length: little padding)
    num_workers: int = 1         # audio-loading processes running ahead of the model (0: in the main process)
    skip_bad: bool = False       # skip unreadable cuts (counted, logged) instead of failing
    dedup: bool = False          # units fields: run-length de-duplicated ids + durations

    def validate(self) -> None:
        if self.max_duration <= 0:
            raise ValueError(f"argument 'max_duration' must be > 0 seconds, got {self.max_duration}")
        if self.num_buckets < 1 or self.num_workers < 0:
            raise ValueError(f"arguments 'num_buckets' (>= 1) and 'num_workers' (>= 0): got {self.num_buckets} "
                             f"and {self.num_workers}")


@dataclass(frozen=True)
class RankShard:
    """``filter(cut)``: True for the cuts of process ``rank`` of ``world`` (by a hash of the cut id; picklable)."""

    rank: int
    world: int

    def __call__(self, cut) -> bool:
        return zlib.crc32(cut.id.encode()) % self.world == self.rank


class _CutsDataset:
    """The ``SpeechDataset`` batch plus ``batch["cuts"]``: the good cuts themselves, in ``cut_ids`` order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, cuts) -> dict:
        batch, _ = self.dataset.collate(cuts)
        by_id = {c.id: c for c in cuts}
        batch["cuts"] = [by_id[i] for i in batch["cut_ids"]]
        return batch


# ------------------------------------------------------------------------------------------ extract.json
def read_record(out_dir: str | os.PathLike) -> dict | None:
    p = Path(out_dir) / RECORD
    return json.loads(p.read_text()) if p.exists() else None


def update_record(out_dir: str | os.PathLike, **entries) -> dict:
    """Add or replace top-level entries of ``OUT/extract.json`` (written atomically)."""
    record = read_record(out_dir) or {}
    record.update(entries)
    atomic_write_json(Path(out_dir) / RECORD, record)
    return record


def _settings(cuts, source, options: ExtractOptions, world: int) -> dict:
    paths = [cuts] if isinstance(cuts, (str, os.PathLike)) else cuts
    names = [str(Path(p).resolve()) for p in paths] if all(isinstance(p, (str, os.PathLike)) for p in paths) else None
    fields = {name: {**asdict(spec), "dedup": bool(options.dedup and spec.kind == "units")}
              for name, spec in source.fields.items()}
    return {"source": source.describe(), "fields": fields, "cuts": names, "world": world,
            "max_duration": options.max_duration, "num_buckets": options.num_buckets, "dedup": options.dedup}


def _claim(out: Path, settings: dict, is_main: bool, restart: bool, manifest: Path) -> dict | None:
    """The existing record when ``out`` holds this extraction already; when it holds another one, a ValueError
    naming what differs (or, with ``restart``, its outputs deleted); None (and a new record, on rank 0) when it
    holds none."""
    record = read_record(out)
    if record is not None and restart and record.get("settings") != settings:
        if is_main:
            remove_outputs(out, manifest)
        record = None
    if record is None:
        if is_main:
            update_record(out, settings=settings, finished=False)
        return None
    old = record.get("settings", {})
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} then, {settings[k]!r} now" for k in changed)
        raise ValueError(f"{out} holds an extraction with other settings ({diff}): rerun it as it was to resume, "
                         "pass --overwrite to start again, or choose another output directory")
    return record


# ------------------------------------------------------------------------------------------------- the run
def extraction_loader(cuts, frame_shift: float, options: ExtractOptions, rank: int = 0, world: int = 1
                      ) -> ResumableLoader:
    """The resumable loader of process ``rank`` of ``world``: its shard of ``cuts`` in duration buckets of
    ``options.max_duration`` padded seconds, in a fixed order; whole utterances (no crops), and each batch also
    carries its cuts (``batch["cuts"]``). ``frame_shift``: the smallest output frame period (seconds)."""
    shard = open_cuts(cuts, "cuts")
    if world > 1:
        shard = shard.filter(RankShard(rank, world))
    cfg = DataConfig(max_duration=options.max_duration, num_buckets=options.num_buckets, crop_to_shortest=False,
                     max_crop_seconds=None, skip_bad=options.skip_bad)
    dataset = build_dataset(cfg, num_frames=None, downsample_rate=max(1, round(frame_shift * SAMPLE_RATE)), seed=0,
                            train=False)
    sampler = make_sampler(shard, max_duration=cfg.max_duration, num_buckets=cfg.num_buckets, shuffle=False,
                           seed=0, world_size=1, rank=0)
    return ResumableLoader(sampler, _CutsDataset(dataset), num_workers=options.num_workers)


def _run_part(part: PartWriter, loader: ResumableLoader, source, rank: int, progress: bool) -> tuple[int, float]:
    """Extract this process's remaining batches into ``part``; returns (cuts, seconds) done in this call."""
    state = part.resume()
    if state is not None:
        loader.load_state_dict(state)
        log.info("rank %d: resuming after %d finished cuts", rank, part.lines)
    bar = progress_bar(desc=f"extract [rank {rank}]", unit="audio-h", disable=not progress,
                       bar_format="{desc}: {n:.3f} {unit} [{elapsed}{postfix}]")
    n, seconds, start = 0, 0.0, time.perf_counter()
    try:
        for batch in loader:
            outputs = source(batch)
            part.write_batch(batch["cuts"], outputs, loader.state_dict())
            n += len(batch["cuts"])
            secs = float(batch["audio_lens"].sum()) / SAMPLE_RATE
            seconds += secs
            bar.update(secs / 3600)
            bar.set_postfix_str(f"{seconds / max(time.perf_counter() - start, 1e-9):.0f} audio-h/h", refresh=False)
        part.finish()
    finally:
        part.close()
        bar.close()
    return n, seconds


def extract_corpus(cuts, out_dir: str | os.PathLike, source, *, options: ExtractOptions | None = None,
                   manifest: str | os.PathLike | None = None, runtime=None, progress: bool = True,
                   restart_on_change: bool = False) -> dict:
    """Extract ``source``'s fields for every cut of ``cuts`` (manifest path(s) or a CutSet) into ``out_dir``.

    ``manifest`` is the output manifest (default ``OUT/cuts.jsonl.gz``); ``runtime`` a
    ``speechssl.train.runtime.Runtime`` for several processes (None: one process). Resumes a killed run (see the
    module docstring); an extraction with other settings in ``out_dir`` is an error, or with ``restart_on_change``
    is deleted and done again. Returns ``extract.json``'s content: settings, ``cuts``, ``audio_hours``, ``manifest``.
    """
    options = options or ExtractOptions()
    options.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = (runtime.rank, runtime.world) if runtime is not None else (0, 1)
    manifest = Path(manifest) if manifest is not None else out / "cuts.jsonl.gz"
    settings = _settings(cuts, source, options, world)
    record = _claim(out, settings, rank == 0, restart_on_change, manifest)
    if record is not None and record.get("finished") and manifest.exists():
        log.info("%s: the extraction is complete already (%d cuts)", out, record.get("cuts", 0))
        return record
    _barrier(runtime)
    part = PartWriter(part_dir(out, rank, world), source.fields, dedup=options.dedup)
    if not part.done:
        shift = min(spec.frame_shift for spec in source.fields.values())
        loader = extraction_loader(cuts, shift, options, rank, world)
        n, seconds = _run_part(part, loader, source, rank, progress)
        log.info("rank %d: extracted %d cuts (%.3f h of audio)", rank, n, seconds / 3600)
    _barrier(runtime)
    if rank == 0:
        total, seconds = merge_parts(out, world, manifest)
        record = update_record(out, finished=True, cuts=total, audio_hours=seconds / 3600,
                               manifest=os.path.relpath(manifest, out))
        log.info("%s: %d cuts (%.3f h of audio) -> %s", out, total, seconds / 3600, manifest)
    _barrier(runtime)
    return record if rank == 0 else read_record(out)


def _barrier(runtime) -> None:
    if runtime is not None and runtime.world > 1:
        runtime.barrier()
