"""What an extraction writes, as it goes: per-cut arrays, one manifest part per process, and its resume point.

One process (rank ``r`` of ``w``) owns ``OUT/parts/rank-r-of-w/``:

- ``<field>/``: one ``.npy`` per cut and field (``lhotse.NumpyFilesWriter``: lossless, the dtype kept; units are
  integers, hidden states fp16 or fp32);
- ``cuts.jsonl.gz``: the finished cuts, one JSON line each, pointing to their arrays in ``cut.custom[field]``.
  Lines are appended after the batch's arrays are written and the gzip stream is sync-flushed after every batch,
  so a kill loses at most the batch in flight (a truncated tail is ignored when the part is read back);
- ``state.pt``: the loader position (``ResumableLoader.state_dict``) and the number of manifest lines written
  with it, replaced atomically after every batch. A rerun keeps exactly those lines and continues the loader
  from there, so every batch is the one an uninterrupted run would have formed, and the output is identical;
- ``done``: written when the process has finished its share.

Rank 0 then concatenates the parts' kept lines into the output manifest (:func:`merge_parts`), streaming:
memory stays constant in the corpus size.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from speechssl.data.labels import store_units
from speechssl.utils.io import atomic_write

__all__ = ["PartWriter", "read_lines", "merge_parts", "part_dir", "durations_field", "remove_outputs"]
log = logging.getLogger(__name__)


def part_dir(out_dir: str | os.PathLike, rank: int, world: int) -> Path:
    return Path(out_dir) / "parts" / f"rank-{rank}-of-{world}"


def durations_field(field: str) -> str:
    """The field holding the run lengths (frames) of de-duplicated units ``field``."""
    return f"{field}_durations"


def read_lines(path: str | os.PathLike, limit: int | None = None) -> Iterator[str]:
    """The complete lines of a (possibly truncated) ``.jsonl.gz`` file, at most ``limit``; a tail cut off by a
    kill (a partial gzip block or a line without its newline) is left out."""
    n = 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        try:
            for line in f:
                if limit is not None and n >= limit:
                    return
                if not line.endswith("\n"):
                    return
                n += 1
                yield line
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return


class PartWriter:
    """One process's output part (see the module docstring).

    Args:
        directory: ``part_dir(out, rank, world)``.
        fields: field name -> ``FieldSpec`` of the source.
        dedup: store units fields run-length de-duplicated: ``field`` = unit ids (non-temporal int array) and
            ``field_durations`` = frames per run.
    """

    def __init__(self, directory: str | os.PathLike, fields: dict, dedup: bool = False):
        from lhotse import NumpyFilesWriter

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fields, self.dedup = fields, dedup
        self.writers = {f: NumpyFilesWriter(str(self.dir / f)) for f in fields}
        self.manifest = self.dir / "cuts.jsonl.gz"
        self.lines = 0
        self._gz = None

    @property
    def done(self) -> bool:
        return (self.dir / "done").exists()

    def resume(self) -> dict | None:
        """The saved loader state (None for a fresh part); the manifest is cut back to the lines saved with it."""
        state_path = self.dir / "state.pt"
        state = torch.load(state_path, weights_only=False) if state_path.exists() else None
        self.lines = int(state["lines"]) if state else 0
        tmp = self.dir / "cuts.tmp.jsonl.gz"
        with gzip.open(tmp, "wt", encoding="utf-8") as out:
            if self.manifest.exists():
                kept = sum(out.write(line) > 0 for line in read_lines(self.manifest, self.lines))
                if kept < self.lines:
                    raise RuntimeError(f"{self.manifest} holds {kept} complete lines but {state_path} counts "
                                       f"{self.lines}: the part is damaged; rerun with --overwrite")
        os.replace(tmp, self.manifest)
        self._gz = gzip.open(self.manifest, "at", encoding="utf-8")  # a new gzip member after the kept lines
        return state["loader"] if state else None

    def write_batch(self, cuts: list, outputs: dict[str, list[np.ndarray]], loader_state: dict) -> None:
        """Store every field of every cut, append their manifest lines, flush, then save ``loader_state``."""
        for i, cut in enumerate(cuts):
            for field, spec in self.fields.items():
                cut = self._store(cut, field, spec, outputs[field][i])
            self._gz.write(json.dumps(cut.to_dict()) + "\n")
        self._gz.flush()  # a sync flush: every line so far is readable even if the process dies now
        self.lines += len(cuts)
        state = {"loader": loader_state, "lines": self.lines}
        atomic_write(self.dir / "state.pt", lambda tmp: torch.save(state, tmp))

    def _store(self, cut, field: str, spec, value: np.ndarray):
        writer = self.writers[field]
        if spec.kind == "hidden":
            return cut.with_custom(field, writer.store_array(cut.id, value, frame_shift=spec.frame_shift,
                                                             temporal_dim=0, start=cut.start))
        if not self.dedup:
            return store_units(cut, value, writer, name=field, frame_shift=spec.frame_shift)
        from speechssl.extract.units import run_length

        ids, durations = run_length(value)
        cut = cut.with_custom(field, writer.store_array(cut.id, ids))
        return cut.with_custom(durations_field(field), writer.store_array(f"{cut.id}.durations", durations))

    def finish(self) -> None:
        self.close()
        (self.dir / "done").write_text(f"{self.lines}\n")

    def close(self) -> None:
        if self._gz is not None:
            self._gz.close()
            self._gz = None


def merge_parts(out_dir: str | os.PathLike, world: int, manifest: str | os.PathLike) -> tuple[int, float]:
    """Concatenate the kept lines of every part (rank order) into ``manifest`` (renamed into place at the end).
    Returns (cuts, seconds of audio)."""
    manifest = Path(manifest)
    tmp = manifest.parent / f".{manifest.name}.tmp{os.getpid()}"
    n, seconds = 0, 0.0
    try:
        with gzip.open(tmp, "wt", encoding="utf-8") as out:
            for rank in range(world):
                d = part_dir(out_dir, rank, world)
                if not (d / "done").exists():
                    raise RuntimeError(f"{d} is not finished: every process must finish before the merge")
                lines = int(torch.load(d / "state.pt", weights_only=False)["lines"]) if (d / "state.pt").exists() else 0
                for line in read_lines(d / "cuts.jsonl.gz", lines):
                    out.write(line)
                    n += 1
                    seconds += float(json.loads(line)["duration"])
        os.replace(tmp, manifest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n, seconds


def remove_outputs(out_dir: str | os.PathLike, manifest: str | os.PathLike | None = None) -> list[str]:
    """Delete what an extraction wrote in ``out_dir`` (parts, manifest, ``extract.json``, Shar shards); other
    files stay. Returns the names deleted."""
    out = Path(out_dir)
    gone = []
    for p in [out / "parts", out / "shar", out / "extract.json", out / "cuts.jsonl.gz"] + (
            [Path(manifest)] if manifest else []):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        gone.append(p.name)
    return gone
