"""Map-style dataset over Lhotse CutSet batches: padded waveforms, optional fbank/MFCC, aligned unit labels.

Build it with ``speechssl.data.loader.build_dataset`` (from the ``data:`` config) or directly, and feed it
batches of cuts from a sampler (``speechssl.data.loader.build_loader``). ``SpeechDataset[cuts]`` returns::

    audio [B, T] float (zero-padded, 16 kHz)   audio_lens [B] long
    features [B, F, D], features_lens [B]      (mode "fbank": D=80, "mfcc": D=39)
    units {name: [B, T'] long}                 aligned to encoder frames, padding PAD_ID (-100)
    cut_ids [B]; text / speaker / emotion / keyword / phones / session lists (None where absent)
    skipped [(cut_id, reason), ...]            only when skip_bad dropped cuts from this batch
    labeled [B] bool, ctc_targets [B, L] long, ctc_lens [B]
                                               with ctc_field: CTC targets of the cuts marked labeled
                                               (speechssl.data.sampler.mix_labeled), PAD_ID elsewhere
"""
from __future__ import annotations

import logging
import typing
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from speechssl.constants import PAD_ID, SAMPLE_RATE
from speechssl.data.audio import (SUPERVISION_FIELDS, BadCutError, check_fields, cut_audio_paths, load_cut_audio,
                                  supervision_field)
from speechssl.data.labels import align_units, label_rate, load_units
from speechssl.data.sampler import LABELED_KEY

__all__ = ["Features", "CtcField", "SpeechDataset", "pad_waves", "ctc_vocabulary", "ctc_symbols"]
log = logging.getLogger(__name__)

Features = Literal["waveform", "fbank", "mfcc"]
"""What a batch carries besides the waveform: nothing, 80-dim log-mel fbank, or 39-dim MFCC with deltas."""

CtcField = Literal["phones", "text"]
"""Where CTC targets come from: the ``phones`` supervision field (whitespace-separated symbols) or ``text``
(its characters, words joined by one space)."""


def ctc_symbols(value: str, field: CtcField) -> list[str]:
    """The CTC symbols of one transcript: phones split on whitespace, or the characters of the text."""
    return value.split() if field == "phones" else list(" ".join(value.split()))


def ctc_vocabulary(cuts, field: CtcField) -> list[str]:
    """The sorted symbols of ``field`` over ``cuts``; symbol ``i`` gets CTC id ``i + 1`` (0 is the blank), so a
    CTC layer needs ``len(vocabulary) + 1`` outputs. A cut without the field is an error naming it."""
    symbols: set[str] = set()
    for cut in cuts:
        value = supervision_field(cut, field)
        if not value:
            raise ValueError(f"labeled cut '{cut.id}' has no '{field}' (config key 'data.labeled_field')")
        symbols.update(ctc_symbols(value, field))
    log.info("CTC vocabulary of the labeled cuts: %d %s symbols (+ blank)", len(symbols), field)
    return sorted(symbols)


@dataclass
class _Item:
    """One good cut of a batch: its (augmented) waveform, the speed factor applied and its unit labels."""

    cut: object
    wav: np.ndarray
    scale: float
    labels: dict  # name -> (units [T_label] int64, label rate Hz)
    start: int = 0  # crop start in samples


def is_labeled(cut) -> bool:
    """Whether the cut came from the labeled set (``speechssl.data.sampler.mix_labeled`` marks it)."""
    return bool((getattr(cut, "custom", None) or {}).get(LABELED_KEY))


def pad_waves(wavs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D float arrays -> zero-padded audio [B, T] float32 and lengths [B] long."""
    lens = [int(w.shape[0]) for w in wavs]
    out = np.zeros((len(wavs), max(lens, default=0)), dtype=np.float32)
    for i, w in enumerate(wavs):
        out[i, : lens[i]] = w
    return torch.from_numpy(out), torch.tensor(lens, dtype=torch.long)


class SpeechDataset(torch.utils.data.Dataset):
    """Batches of speech from a CutSet batch.

    Args:
        mode: "waveform" (audio only), "fbank" (+ 80-dim log-mel) or "mfcc" (+ 39-dim MFCC with deltas).
        units: names of unit label sets stored on the cuts (``speechssl.data.labels.store_units``).
        num_frames: the encoder's frame count for a LongTensor [B] of sample counts (``encoder.num_frames``);
            required with ``units`` (labels are aligned to exactly that many frames).
        downsample_rate: input samples per encoder frame (``encoder.downsample_rate``): the encoder frame rate
            is ``16000 / downsample_rate`` and crop starts are multiples of it, so labels stay on the frame grid.
        crop_to_shortest: crop every item to the batch's shortest item (fairseq pretraining).
        max_crop_samples: crop items longer than this many samples.
        fields: supervision or custom fields every cut must have (e.g. ["text"]); a cut without one is bad.
        skip_bad: drop bad cuts (counted in ``self.skipped``, logged, and listed in ``batch["skipped"]``)
            instead of raising :class:`~speechssl.data.audio.BadCutError`.
        augment: an :class:`~speechssl.data.augment.Augmenter` (or None): label-preserving augmentation.
        seed: seeds crops and augmentation; each batch's randomness is derived from (seed, epoch, its cut
            ids), so results do not depend on worker count and resume exactly.
        ctc_field, ctc_vocab: CTC targets for the cuts marked labeled (``ctc_field`` of :data:`CtcField`, symbol
            ``ctc_vocab[i]`` -> id ``i + 1``); labeled cuts are not cropped (their transcripts cover them whole).
    """

    def __init__(self, *, mode: Features = "waveform", units: Sequence[str] = (),
                 num_frames: Callable[[torch.Tensor], torch.Tensor] | None = None, downsample_rate: int = 320,
                 crop_to_shortest: bool = False, max_crop_samples: int | None = None, fields: Sequence[str] = (),
                 skip_bad: bool = False, augment=None, seed: int = 0, ctc_field: CtcField | None = None,
                 ctc_vocab: Sequence[str] = ()):
        if mode not in typing.get_args(Features):
            raise ValueError(f"SpeechDataset: argument 'mode' must be one of {typing.get_args(Features)}, "
                             f"got {mode!r}")
        if downsample_rate < 1:
            raise ValueError(f"SpeechDataset: argument 'downsample_rate' must be >= 1, got {downsample_rate}")
        if units and num_frames is None:
            raise ValueError("SpeechDataset: argument 'units' needs 'num_frames', the encoder's frame-count "
                             "function (encoder.num_frames), to align the labels to its frames")
        self.mode = mode
        self.units = list(units)
        self.num_frames = num_frames
        self.downsample_rate = int(downsample_rate)
        self.crop_to_shortest = crop_to_shortest
        self.max_crop_samples = max_crop_samples
        self.fields = list(fields)
        self.skip_bad = skip_bad
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.skipped: Counter = Counter()
        self.ctc_field = ctc_field
        self.ctc_ids = {sym: i + 1 for i, sym in enumerate(ctc_vocab)}

    @property
    def frame_rate(self) -> float:
        """Encoder frames per second."""
        return SAMPLE_RATE / self.downsample_rate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, cuts) -> dict:
        return self.collate(cuts)[0]

    def collate(self, cuts) -> tuple[dict, list[BadCutError]]:
        """``(batch, errors)``: the batch of ``cuts`` and the error of each cut ``skip_bad`` dropped from it
        (``batch["skipped"]`` lists only their ids and reasons, which cross process boundaries)."""
        from lhotse import CutSet

        if not isinstance(cuts, CutSet):
            cuts = CutSet.from_cuts(cuts)
        rng = self._rng(cuts)
        if self.augment is not None:
            cuts = self.augment.transform_cuts(cuts, rng)
        items, errors = self._load_items(cuts, rng)
        self._crop(items, rng)
        audio, audio_lens = pad_waves([it.wav for it in items])
        batch = {"audio": audio, "audio_lens": audio_lens, "cut_ids": [it.cut.id for it in items]}
        if self.mode != "waveform" and items:
            batch["features"], batch["features_lens"] = self._features(audio, audio_lens)
        if self.units:
            batch["units"] = self._align(items, audio_lens)
        batch.update(self._supervisions([it.cut for it in items]))
        if self.ctc_field is not None:
            batch.update(self._ctc_targets([it.cut for it in items]))
        if errors:
            batch["skipped"] = [(e.cut_id, e.reason) for e in errors]
        return batch, errors

    # -- the steps of a batch, in order ---------------------------------------------------------------------
    def _rng(self, cuts) -> np.random.Generator:
        key = zlib.crc32("\x00".join(c.id for c in cuts).encode())
        return np.random.default_rng([self.seed, self.epoch, key])

    def _load_items(self, cuts, rng: np.random.Generator) -> tuple[list[_Item], list[BadCutError]]:
        """The good cuts' audio and labels, and the error of each bad one (with ``skip_bad``)."""
        items, bad = [], []
        for cut in cuts:
            try:
                check_fields(cut, self.fields + self.units)
                wav = load_cut_audio(cut)
                labels = {name: self._load_units(cut, name) for name in self.units}
            except BadCutError as e:
                if not self.skip_bad:
                    raise
                self.skipped[e.reason] += 1
                bad.append(e)
                log.warning("skipping %s (skipped so far: %s)", e, dict(self.skipped))
                continue
            scale = 1.0
            if self.augment is not None:
                wav, scale = self.augment.transform_wave(wav, rng)
            items.append(_Item(cut, wav, scale, labels))
        return items, bad

    @staticmethod
    def _load_units(cut, name: str):
        """(units [T_label] int64, label rate) or BadCutError when the stored array cannot be read."""
        try:
            return load_units(cut, name), label_rate(cut, name)
        except (OSError, KeyError, ValueError) as e:
            raise BadCutError(cut.id, ", ".join(cut_audio_paths(cut)) or None, "missing_field",
                              f"units '{name}' unreadable: {e}") from None

    def _crop_length(self, lens: list[int]) -> int | None:
        target = min(lens) if lens and self.crop_to_shortest else None
        if lens and self.max_crop_samples is not None:
            target = min(target or max(lens), int(self.max_crop_samples))
        return target

    def _crop(self, items: list[_Item], rng: np.random.Generator) -> None:
        """Crop in place to the batch's crop length; starts lie on the frame grid so labels keep their alignment.
        Labeled cuts (CTC targets) are neither cropped nor counted: their transcripts cover them whole."""
        if self.ctc_field is not None:
            items = [it for it in items if not is_labeled(it.cut)]
        target = self._crop_length([it.wav.shape[0] for it in items])
        if target is None:
            return
        for it in items:
            n = it.wav.shape[0]
            if n > target:
                positions = (n - target) // self.downsample_rate + 1
                it.start = int(rng.integers(0, positions)) * self.downsample_rate
                it.wav = it.wav[it.start: it.start + target]

    def _features(self, audio: torch.Tensor, audio_lens: torch.Tensor):
        from speechssl.data.features import compute_fbank, compute_mfcc

        return (compute_fbank if self.mode == "fbank" else compute_mfcc)(audio, audio_lens)

    def _align(self, items: list[_Item], audio_lens: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [B, T'] long}: each label set on the encoder's frames of each item, PAD_ID past its end."""
        B = len(items)
        n_frames = torch.as_tensor(self.num_frames(audio_lens)).long().clamp(min=0) if B else torch.zeros(0).long()
        T = int(n_frames.max()) if B else 0
        out = {}
        for name in self.units:
            units = torch.full((B, T), PAD_ID, dtype=torch.long)
            for i, it in enumerate(items):
                labels, rate = it.labels[name]
                n = int(n_frames[i])
                # speed factor f shrinks the label period by f
                units[i, :n] = align_units(labels, rate * it.scale, n, self.frame_rate,
                                           offset=it.start / SAMPLE_RATE)
            out[name] = units
        return out

    def _ctc_targets(self, cuts: list) -> dict[str, torch.Tensor]:
        """``labeled`` [B] bool, ``ctc_targets`` [B, L] long (PAD_ID padded; unlabeled rows all PAD_ID) and
        ``ctc_lens`` [B] (0 for unlabeled cuts)."""
        flags = [is_labeled(c) for c in cuts]
        seqs = []
        for cut, flag in zip(cuts, flags):
            value = supervision_field(cut, self.ctc_field) if flag else None
            if flag and not value:
                raise BadCutError(cut.id, None, "missing_field", f"labeled cut without '{self.ctc_field}'")
            seqs.append([self.ctc_ids[s] for s in ctc_symbols(value, self.ctc_field)] if flag else [])
        lens = torch.tensor([len(q) for q in seqs], dtype=torch.long)
        targets = torch.full((len(cuts), int(lens.max()) if len(cuts) else 0), PAD_ID, dtype=torch.long)
        for i, q in enumerate(seqs):
            targets[i, : len(q)] = torch.tensor(q, dtype=torch.long)
        return {"labeled": torch.tensor(flags, dtype=torch.bool), "ctc_targets": targets, "ctc_lens": lens}

    def _supervisions(self, cuts: list) -> dict[str, list]:
        out = {}
        for f in SUPERVISION_FIELDS:
            vals = [supervision_field(c, f) for c in cuts]
            if f in self.fields or any(v is not None for v in vals):
                out[f] = vals
        return out
