"""Discrete units for unit language models and unit-based TTS/ASR: sources, de-duplication and a unit BPE.

- :class:`UnitSource` turns any function ``batch -> [int codes [T_b]]`` (k-means of a layer, a quantizer's
  codes) into an extraction source with one units field.
- :func:`run_length` de-duplicates a unit sequence and keeps how long each run lasted (frames), so that durations
  can be predicted or restored (:func:`expand`).
- :class:`UnitBPE` is a sentencepiece BPE over unit strings: each unit id ``u`` is the private-use character
  ``chr(0xE000 + u)`` (ids past the 6400 of the Basic Multilingual Plane's private-use area continue in plane 15,
  ``chr(0xF0000 + u - 6400)``), so a sequence is a word without spaces that sentencepiece merges like text.
  ``encode(units) -> piece ids`` and ``decode(piece ids) -> units`` round-trip any sequence whose units were seen
  in training (``character_coverage`` 1.0, no normalisation, no dummy prefix).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from speechssl.extract.hidden import FieldSpec

__all__ = ["UnitSource", "run_length", "expand", "units_to_text", "text_to_units", "UnitBPE", "train_unit_bpe",
           "MAX_UNITS"]
log = logging.getLogger(__name__)

_BMP_BASE, _BMP_SIZE, _PLANE15_BASE = 0xE000, 6400, 0xF0000
MAX_UNITS = _BMP_SIZE + 65534
"""Unit ids a unit string can hold: the BMP private-use area and supplementary private-use area A."""


class UnitSource:
    """Extraction source of integer units: ``source(batch)`` -> ``{name: [int array [T_b]]}``.

    Args:
        fn: ``batch -> list of int arrays`` (one per utterance of the batch, in ``batch["cut_ids"]`` order).
        name: the output field (e.g. ``units_layer_6``).
        frame_shift: seconds per unit frame.
        layer: the hidden-state index the units come from (None when they do not come from a layer).
        info: what ``extract.json`` records about the source (model, k-means directory ...).
    """

    def __init__(self, fn: Callable[[dict], Sequence[np.ndarray]], name: str, frame_shift: float,
                 layer: int | None = None, info: dict | None = None):
        self.fn, self.name = fn, name
        self.fields = {name: FieldSpec("units", layer, float(frame_shift))}
        self.info = dict(info or {})

    def __call__(self, batch: dict) -> dict[str, list[np.ndarray]]:
        codes = [np.asarray(c) for c in self.fn(batch)]
        if len(codes) != len(batch["cut_ids"]):
            raise ValueError(f"unit source '{self.name}' returned {len(codes)} sequences for a batch of "
                             f"{len(batch['cut_ids'])} utterances")
        for cid, c in zip(batch["cut_ids"], codes):
            if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
                raise ValueError(f"unit source '{self.name}': cut '{cid}' got {c.dtype} codes of shape {c.shape}; "
                                 "units must be 1-D integers")
        return {self.name: codes}

    def describe(self) -> dict:
        spec = self.fields[self.name]
        return {"kind": "units", "field": self.name, "layer": spec.layer, **self.info}


# ------------------------------------------------------------------------------------------ de-duplication
def run_length(units) -> tuple[np.ndarray, np.ndarray]:
    """Run-length de-duplication: [T] ints -> (ids [N] int32, durations [N] int32 frames), ``sum(durations) == T``."""
    u = np.asarray(units).reshape(-1)
    if u.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
    durations = np.diff(np.concatenate([starts, [u.size]]))
    return u[starts].astype(np.int32), durations.astype(np.int32)


def expand(ids, durations) -> np.ndarray:
    """Inverse of :func:`run_length`: each id repeated its duration."""
    return np.repeat(np.asarray(ids), np.asarray(durations))


# ------------------------------------------------------------------------------------------------- BPE
def _char(u: int) -> str:
    if not 0 <= u < MAX_UNITS:
        raise ValueError(f"unit id {u} cannot be written as a unit character: ids must be in 0..{MAX_UNITS - 1}")
    return chr(_BMP_BASE + u) if u < _BMP_SIZE else chr(_PLANE15_BASE + u - _BMP_SIZE)


def units_to_text(units: Iterable[int]) -> str:
    """Unit ids -> a string of private-use characters, one per unit."""
    return "".join(_char(int(u)) for u in units)


def text_to_units(text: str) -> np.ndarray:
    """Inverse of :func:`units_to_text`; a character outside the unit alphabet is a ValueError."""
    out = np.empty(len(text), np.int64)
    for i, ch in enumerate(text):
        c = ord(ch)
        if _BMP_BASE <= c < _BMP_BASE + _BMP_SIZE:
            out[i] = c - _BMP_BASE
        elif _PLANE15_BASE <= c < _PLANE15_BASE + MAX_UNITS - _BMP_SIZE:
            out[i] = c - _PLANE15_BASE + _BMP_SIZE
        else:
            raise ValueError(f"character {ch!r} (U+{c:04X}) at {i} is not a unit character")
    return out


class UnitBPE:
    """A trained unit BPE (``MODEL.model`` written by :func:`train_unit_bpe`)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"unit BPE model {path} does not exist: train one with train_unit_bpe "
                                    "(speechssl extract ... --bpe MODEL --bpe-vocab N)")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, units) -> np.ndarray:
        """Unit ids [N] -> BPE piece ids [M] (M <= N); a unit never seen in training is a ValueError."""
        ids = np.asarray(self.sp.encode(units_to_text(np.asarray(units).reshape(-1)), out_type=int), np.int32)
        if (ids == self.sp.unk_id()).any():
            raise ValueError(f"{self.path}: a unit of this sequence was not in the BPE's training data (it maps to "
                             "<unk>); train the BPE on units that cover every id")
        return ids

    def decode(self, pieces) -> np.ndarray:
        """BPE piece ids -> unit ids."""
        return text_to_units(self.sp.decode([int(p) for p in np.asarray(pieces).reshape(-1)]))

    def piece_lengths(self, pieces) -> np.ndarray:
        """Units per piece: [M] ints summing to the decoded length."""
        return np.array([len(self.sp.id_to_piece(int(p))) for p in np.asarray(pieces).reshape(-1)], np.int32)


def train_unit_bpe(sequences: Iterable[Sequence[int]], model_path: str | os.PathLike, vocab_size: int,
                   max_sentences: int = 1_000_000) -> UnitBPE:
    """Train a sentencepiece BPE of ``vocab_size`` pieces on unit sequences and write ``model_path`` (``.model``).

    ``sequences`` is streamed to a temporary text file (one sequence a line); sentencepiece samples at most
    ``max_sentences`` of them (all of them, deterministically, when there are fewer). ``vocab_size`` must exceed the number of distinct units (+3 special pieces)."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"argument 'model_path' must end in .model (sentencepiece's name), got {model_path}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        text = Path(tmp) / "units.txt"
        seen, longest = set(), 1
        with open(text, "w", encoding="utf-8") as f:
            for seq in sequences:
                s = units_to_text(seq)
                seen.update(s)
                longest = max(longest, len(s.encode("utf-8")))
                f.write(s + "\n")
        if vocab_size < len(seen) + 3:
            raise ValueError(f"argument 'vocab_size' ({vocab_size}) must be at least the {len(seen)} distinct units "
                             f"+ 3 special pieces = {len(seen) + 3}")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(Path(tmp) / "bpe"), model_type="bpe", vocab_size=int(vocab_size),
            character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_by_whitespace=False, max_sentence_length=max(4192, longest + 1),
            max_sentencepiece_length=16, input_sentence_size=int(max_sentences), shuffle_input_sentence=True,
            seed_sentencepiece_size=100000, hard_vocab_limit=False, minloglevel=2,
            bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, num_threads=1)
        os.replace(Path(tmp) / "bpe.model", model_path)
    log.info("unit BPE: %d pieces over %d distinct units -> %s", vocab_size, len(seen), model_path)
    return UnitBPE(model_path)
