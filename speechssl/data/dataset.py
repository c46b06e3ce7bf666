"""Map-style dataset over Lhotse CutSet batches: padded waveforms, optional fbank/MFCC, aligned unit labels.

Use with a Lhotse sampler (``speechssl.data.sampler.make_sampler``) in the usual Lhotse pattern: the sampler
yields a ``CutSet`` per batch and ``SpeechDataset[cuts]`` turns it into the batch dict of docs/internals.md::

    audio [B, T] float (zero-padded, 16 kHz)   audio_lens [B] long
    features [B, F, D], features_lens [B]      (mode "fbank": D=80, "mfcc": D=39)
    units {name: [B, T'] long}                 aligned to encoder frames, padding -100
    cut_ids [B]; text / speaker / emotion / keyword / phones / session lists (None where absent)
    skipped [(cut_id, reason), ...]            only when skip_bad dropped cuts from this batch
"""
from __future__ import annotations

import logging
import zlib
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch

from speechssl.data.audio import SUPERVISION_FIELDS, BadCutError, check_fields, load_cut_audio, supervision_field
from speechssl.data.labels import PAD_ID, align_units, label_rate, load_units

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000
MODES = ("waveform", "fbank", "mfcc")


class SpeechDataset(torch.utils.data.Dataset):
    """Batches of speech from a CutSet batch.

    Args:
        cuts_or_none: unused placeholder for API symmetry with Lhotse datasets (the sampler owns the cuts).
        mode: "waveform" (audio only), "fbank" (+ 80-dim log-mel) or "mfcc" (+ 39-dim MFCC with deltas).
        units: names of unit label sets stored on the cuts (``speechssl.data.labels.store_units``).
        num_frames: encoder frame count for a LongTensor [B] of sample counts (e.g. ``encoder.num_frames``);
            default ``floor(samples * frame_rate / 16000)``.
        frame_rate: encoder frames per second (50 for a CNN with stride 320, 25 for 40 ms fbank front ends).
        crop_to_shortest: crop every item to the batch's shortest item (fairseq pretraining).
        max_crop_samples: crop items longer than this many samples.
        crop_multiple: crop starts are multiples of this many samples, so labels stay on the frame grid.
        fields: supervision or custom fields every cut must have (e.g. ["text"]); a cut without one is bad.
        skip_bad: drop bad cuts (counted, logged, and listed in ``batch["skipped"]``) instead of raising
            :class:`~speechssl.data.audio.BadCutError`.
        augment: an :class:`~speechssl.data.augment.Augmenter` (or None): label-preserving augmentation.
        seed: seeds crops and augmentation; each batch's randomness is derived from (seed, epoch, its cut
            ids), so results do not depend on worker count and resume exactly.
    """

    def __init__(self, cuts_or_none=None, *, mode: str = "waveform", units: Sequence[str] = (),
                 num_frames: Callable[[torch.Tensor], torch.Tensor] | None = None, frame_rate: float = 50.0,
                 crop_to_shortest: bool = False, max_crop_samples: int | None = None, crop_multiple: int = 320,
                 fields: Sequence[str] = (), skip_bad: bool = False, augment=None, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"SpeechDataset: mode must be one of {MODES}, got {mode!r}")
        if crop_multiple < 1:
            raise ValueError(f"SpeechDataset: crop_multiple must be >= 1, got {crop_multiple}")
        self.mode = mode
        self.units = list(units)
        self.num_frames = num_frames
        self.frame_rate = float(frame_rate)
        self.crop_to_shortest = crop_to_shortest
        self.max_crop_samples = max_crop_samples
        self.crop_multiple = int(crop_multiple)
        self.fields = list(fields)
        self.skip_bad = skip_bad
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.skipped: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, cuts) -> np.random.Generator:
        key = zlib.crc32("\x00".join(c.id for c in cuts).encode())
        return np.random.default_rng([self.seed, self.epoch, key])

    def _frames(self, lens: torch.Tensor) -> torch.Tensor:
        if self.num_frames is not None:
            return torch.as_tensor(self.num_frames(lens)).long()
        return torch.div(lens * int(round(self.frame_rate * 1000)), SAMPLING_RATE * 1000, rounding_mode="floor")

    @staticmethod
    def _load_units(cut, name: str):
        """(units [T_label] int64, label rate) or BadCutError when the stored array cannot be read."""
        try:
            return load_units(cut, name), label_rate(cut, name)
        except (OSError, KeyError, ValueError) as e:
            from speechssl.data.audio import cut_audio_paths

            raise BadCutError(cut.id, ", ".join(cut_audio_paths(cut)) or None, "missing_field",
                              f"units '{name}' unreadable: {e}") from None

    def __getitem__(self, cuts) -> dict:
        from lhotse import CutSet

        if not isinstance(cuts, CutSet):
            cuts = CutSet.from_cuts(cuts)
        rng = self._rng(cuts)
        if self.augment is not None:
            cuts = self.augment.transform_cuts(cuts, rng)

        kept, wavs, scales, labels, bad = [], [], [], [], []
        for cut in cuts:
            try:
                check_fields(cut, self.fields + self.units)
                wav = load_cut_audio(cut)
                lab = {name: self._load_units(cut, name) for name in self.units}
            except BadCutError as e:
                if not self.skip_bad:
                    raise
                self.skipped[e.reason] += 1
                bad.append((cut.id, e.reason))
                log.warning("skipping %s (skipped so far: %s)", e, dict(self.skipped))
                continue
            scale = 1.0
            if self.augment is not None:
                wav, scale = self.augment.transform_wave(wav, rng)
            kept.append(cut)
            wavs.append(wav)
            scales.append(scale)
            labels.append(lab)

        # crops: start on the crop_multiple grid so unit labels keep their frame alignment
        lens = [w.shape[0] for w in wavs]
        target = None
        if wavs and self.crop_to_shortest:
            target = min(lens)
        if wavs and self.max_crop_samples is not None:
            target = min(target or max(lens), int(self.max_crop_samples))
        starts = [0] * len(wavs)
        if target is not None:
            for i, L in enumerate(lens):
                if L > target:
                    n_pos = (L - target) // self.crop_multiple + 1
                    starts[i] = int(rng.integers(0, n_pos)) * self.crop_multiple
                    wavs[i] = wavs[i][starts[i] : starts[i] + target]
            lens = [w.shape[0] for w in wavs]

        B = len(wavs)
        T = max(lens) if lens else 0
        audio_np = np.zeros((B, T), dtype=np.float32)
        for i, w in enumerate(wavs):
            audio_np[i, : w.shape[0]] = w
        audio = torch.from_numpy(audio_np)
        audio_lens = torch.tensor(lens, dtype=torch.long)
        batch = {"audio": audio, "audio_lens": audio_lens, "cut_ids": [c.id for c in kept]}

        if self.mode != "waveform" and B:
            from speechssl.data.features import compute_fbank, compute_mfcc

            fn = compute_fbank if self.mode == "fbank" else compute_mfcc
            batch["features"], batch["features_lens"] = fn(audio, audio_lens)

        if self.units:
            n_frames = self._frames(audio_lens).clamp(min=0) if B else torch.zeros(0, dtype=torch.long)
            Tp = int(n_frames.max()) if B else 0
            batch["units"] = {}
            for name in self.units:
                out = torch.full((B, Tp), PAD_ID, dtype=torch.long)
                for i, cut in enumerate(kept):
                    units, rate = labels[i][name]
                    rate = rate * scales[i]  # speed factor f: the label period shrinks by f
                    out[i, : int(n_frames[i])] = align_units(units, rate, int(n_frames[i]), self.frame_rate,
                                                             offset=starts[i] / SAMPLING_RATE)
                batch["units"][name] = out

        for f in SUPERVISION_FIELDS:
            vals = [supervision_field(c, f) for c in kept]
            if f in self.fields or any(v is not None for v in vals):
                batch[f] = vals
        if bad:
            batch["skipped"] = bad
        return batch
