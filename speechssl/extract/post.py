"""After an extraction: the unit BPE applied to its manifest, and its fields as Lhotse Shar shards.

Both stream the output manifest (one cut at a time) and run on one process, after the merge.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from speechssl.extract.units import UnitBPE
from speechssl.extract.writer import durations_field

__all__ = ["bpe_field", "unit_sequences", "apply_bpe", "export_shar"]
log = logging.getLogger(__name__)


def bpe_field(field: str) -> str:
    """The field holding the BPE piece ids of units ``field``."""
    return f"{field}_bpe"


def _cuts(manifest: str | os.PathLike) -> Iterator:
    from lhotse import CutSet

    return iter(CutSet.from_file(manifest))


def unit_sequences(manifest: str | os.PathLike, field: str) -> Iterator[np.ndarray]:
    """Each cut's units ``field`` (de-duplicated ids where the extraction de-duplicated), streamed."""
    for cut in _cuts(manifest):
        yield np.asarray(cut.load_custom(field)).reshape(-1)


def apply_bpe(out_dir: str | os.PathLike, manifest: str | os.PathLike, field: str, bpe: UnitBPE) -> int:
    """Give every cut of ``manifest`` the BPE pieces of its units ``field``, rewriting the manifest in place.

    Adds ``<field>_bpe`` (piece ids, int32) and, where ``<field>_durations`` exists, ``<field>_bpe_durations``
    (frames per piece: the durations of its units summed). Arrays go to ``OUT/bpe/``. Returns the cuts done."""
    from lhotse import NumpyFilesWriter

    manifest, name = Path(manifest), bpe_field(field)
    tmp = manifest.parent / f".{manifest.name}.bpe{os.getpid()}"
    n = 0
    try:
        with NumpyFilesWriter(str(Path(out_dir) / "bpe" / name)) as writer, \
                gzip.open(tmp, "wt", encoding="utf-8") as out:
            for cut in _cuts(manifest):
                units = np.asarray(cut.load_custom(field)).reshape(-1)
                pieces = bpe.encode(units)
                cut = cut.with_custom(name, writer.store_array(cut.id, pieces))
                if cut.custom.get(durations_field(field)) is not None:
                    frames = np.asarray(cut.load_custom(durations_field(field))).reshape(-1)
                    starts = np.concatenate([[0], np.cumsum(bpe.piece_lengths(pieces))[:-1]]).astype(np.int64)
                    per_piece = np.add.reduceat(frames, starts) if len(pieces) else np.zeros(0, np.int32)
                    cut = cut.with_custom(durations_field(name), writer.store_array(f"{cut.id}.durations",
                                                                                    per_piece.astype(np.int32)))
                out.write(json.dumps(cut.to_dict()) + "\n")
                n += 1
        os.replace(tmp, manifest)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("unit BPE (%d pieces) on '%s' of %d cuts -> '%s'", bpe.vocab_size, field, n, name)
    return n


def export_shar(out_dir: str | os.PathLike, manifest: str | os.PathLike, fields: list[str],
                shard_size: int = 1000) -> Path:
    """Write ``manifest``'s cuts with their array ``fields`` as Lhotse Shar shards under ``OUT/shar/``
    (``cuts.NNNNNN.jsonl.gz`` and ``<field>.NNNNNN.tar`` per shard; the audio stays where the cuts point)."""
    from lhotse import CutSet

    shar = Path(out_dir) / "shar"
    shar.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the cuts keep pointing to their audio on purpose: Lhotse warns regardless
        warnings.filterwarnings("ignore", message=".*'recording' field that is not specified.*")
        CutSet.from_file(manifest).to_shar(str(shar), fields={f: "numpy" for f in fields}, shard_size=shard_size)
    return shar

