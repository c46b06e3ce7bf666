"""Label-preserving augmentation for pretraining: additive noise, volume, pitch shift, speed with warped labels,
and a random change of speaker identity (formant and pitch shift).

Off by default. ``AugmentConfig`` is embedded in the pretraining config; ``build_augmenter(cfg)`` returns an
:class:`Augmenter` (or None when nothing is enabled) that ``SpeechDataset(augment=...)`` applies per batch:

- noise: MUSAN (or any noise CutSet) mixed in with Lhotse's ``CutMix`` at ``snr`` dB, ``pad_to_longest=False``
  so a cut never grows; its unit labels come from the speech track and padding is -100, never a real id;
- volume: a random gain (label-free);
- pitch: ``librosa.effects.pitch_shift`` by a random number of semitones (same length, labels unchanged;
  Lhotse's pitch shift needs torchaudio); librosa is the ``aug`` extra, imported on use;
- speed: resampling by factor ``f`` (duration / f, pitch changes too, like Kaldi's speed perturbation); the
  dataset multiplies the label rate by ``f`` so every encoder frame still gets the label of its own audio;
- speaker: :func:`speaker_change` with random formant and pitch ratios (:func:`draw_speaker_ratios`), same
  length, labels unchanged. ContentVec's objective calls the same function on whole batches.

**Speaker-identity change.** The classic recipe (Praat's "change gender", used by NANSY and ContentVec) resamples
the waveform, which scales every frequency (formants and pitch) by the ratio, then restores the duration and sets
the pitch with PSOLA. :func:`speaker_change` does the same in the STFT domain, batched in torch, with formants and
pitch set independently: each frame's log magnitude is split into the spectral envelope (the low-quefrency part
of its cepstrum: formants, vocal-tract length) and the fine structure (harmonics: pitch); the envelope is
resampled along frequency by the formant ratio, the fine structure by the pitch ratio, and the phase follows a
phase vocoder (each bin advances by the pitch ratio times the instantaneous frequency of its source bin). The
duration never changes, so frame-level unit labels stay aligned. Ratios follow NANSY / ContentVec: formant ratio
uniform in [1, 1.4], pitch ratio uniform in [1, 2], each inverted with probability 1/2. The paper's third
transform, a random parametric equaliser, is not applied. librosa's pitch shift (``augment.pitch_prob``) moves
formants with the pitch and is kept for plain pitch augmentation.

Randomness comes from the numpy Generator the dataset passes in (seeded per batch), so runs are reproducible
and independent of the number of dataloader workers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from speechssl.constants import SAMPLE_RATE
from speechssl.signal import draw_ratio, speaker_change


@dataclass
class AugmentConfig:
    enabled: bool = False
    noise_cuts: str | None = None        # noise manifest, e.g. data/musan/cuts_musan_noise.jsonl.gz
    noise_prob: float = 0.0              # probability of adding noise to an utterance
    snr: list[float] = field(default_factory=lambda: [10.0, 20.0])  # uniform SNR range in dB
    volume_prob: float = 0.0
    volume_db: list[float] = field(default_factory=lambda: [-6.0, 6.0])  # uniform gain range in dB
    pitch_prob: float = 0.0
    pitch_semitones: list[float] = field(default_factory=lambda: [-2.0, 2.0])
    speed_prob: float = 0.0
    speeds: list[float] = field(default_factory=lambda: [0.9, 1.1])  # one is chosen uniformly
    speaker_prob: float = 0.0            # probability of a random speaker-identity change (formant + pitch)
    formant_ratio: list[float] = field(default_factory=lambda: [1.0, 1.4])  # uniform, inverted with prob. 1/2
    pitch_ratio: list[float] = field(default_factory=lambda: [1.0, 2.0])    # uniform, inverted with prob. 1/2


def _check_range(name: str, r, lo=None) -> tuple[float, float]:
    if len(r) != 2 or r[0] > r[1]:
        raise ValueError(f"augment.{name} must be [low, high] with low <= high, got {r}")
    if lo is not None and r[0] <= lo:
        raise ValueError(f"augment.{name} values must be > {lo}, got {r}")
    return float(r[0]), float(r[1])


class Augmenter:
    """Applies an :class:`AugmentConfig`; ``noise`` may be a CutSet given directly instead of a path."""

    def __init__(self, cfg: AugmentConfig, noise=None, sampling_rate: int = SAMPLE_RATE):
        for name in ("noise_prob", "volume_prob", "pitch_prob", "speed_prob", "speaker_prob"):
            p = getattr(cfg, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {p}")
        self.cfg = cfg
        self.sr = sampling_rate
        self.snr = _check_range("snr", cfg.snr)
        self.volume_db = _check_range("volume_db", cfg.volume_db)
        self.pitch = _check_range("pitch_semitones", cfg.pitch_semitones)
        self.formant_ratio = _check_range("formant_ratio", cfg.formant_ratio, lo=0.0)
        self.pitch_ratio = _check_range("pitch_ratio", cfg.pitch_ratio, lo=0.0)
        if cfg.speed_prob > 0:
            if not cfg.speeds or any(s <= 0 for s in cfg.speeds):
                raise ValueError(f"augment.speeds must be positive factors, got {cfg.speeds}")
        if noise is None and cfg.noise_prob > 0:
            if not cfg.noise_cuts:
                raise ValueError("augment.noise_prob > 0 needs augment.noise_cuts (a noise CutSet manifest)")
            from lhotse import CutSet

            noise = CutSet.from_file(cfg.noise_cuts).to_eager()
            if len(noise) == 0:
                raise ValueError(f"augment.noise_cuts: {cfg.noise_cuts} has no cuts")
        self.noise = noise

    def transform_cuts(self, cuts, rng: np.random.Generator):
        """Mix noise into some cuts (CutMix, no padding): CutSet -> CutSet of the same durations and ids."""
        if self.noise is None or self.cfg.noise_prob <= 0:
            return cuts
        from lhotse.dataset import CutMix

        mix = CutMix(self.noise, snr=self.snr, p=self.cfg.noise_prob, pad_to_longest=False, preserve_id=True,
                     seed=random.Random(int(rng.integers(2**31))), random_mix_offset=True)
        out = mix(cuts)
        # Lhotse may leave a mix longer than the speech (short cut + long noise): truncate to the original
        return out.__class__.from_cuts([
            m.truncate(duration=c.duration) if m.duration > c.duration + 1e-6 else m for m, c in zip(out, cuts)])

    def transform_wave(self, wav: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Volume, pitch, speaker and speed on one waveform [T]; returns ``(wav', f)`` where ``f`` multiplies the
        label rate (1.0 unless the speed changed)."""
        cfg, scale = self.cfg, 1.0
        if cfg.speed_prob > 0 and rng.random() < cfg.speed_prob:
            f = float(cfg.speeds[int(rng.integers(len(cfg.speeds)))])
            if f != 1.0:
                wav, scale = speed_perturb(wav, f), f
        if cfg.pitch_prob > 0 and rng.random() < cfg.pitch_prob:
            wav = pitch_shift(wav, float(rng.uniform(*self.pitch)), self.sr)
        if cfg.speaker_prob > 0 and rng.random() < cfg.speaker_prob:
            ratios = [draw_ratio(rng.random(), rng.random(), r) for r in (self.formant_ratio, self.pitch_ratio)]
            x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
            wav = speaker_change(x, torch.tensor([x.shape[1]]), torch.tensor([ratios[0]]),
                                 torch.tensor([ratios[1]]))[0].numpy()
        if cfg.volume_prob > 0 and rng.random() < cfg.volume_prob:
            wav = wav * np.float32(10 ** (rng.uniform(*self.volume_db) / 20))
        return wav.astype(np.float32, copy=False), scale


def speed_perturb(wav: np.ndarray, factor: float) -> np.ndarray:
    """Play ``wav`` [T] ``factor`` times faster: [T] -> [~T / factor] (polyphase resampling)."""
    from scipy.signal import resample_poly

    fr = Fraction(factor).limit_denominator(100)
    return resample_poly(wav, fr.denominator, fr.numerator).astype(np.float32)


def pitch_shift(wav: np.ndarray, semitones: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Shift pitch by ``semitones`` keeping the duration: [T] -> [T] (librosa, the ``aug`` extra)."""
    try:
        import librosa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pitch augmentation needs librosa: pip install 'speechssl[aug]'") from e
    return librosa.effects.pitch_shift(wav.astype(np.float32), sr=sr, n_steps=semitones).astype(np.float32)


def build_augmenter(cfg: AugmentConfig | None, noise=None) -> Augmenter | None:
    """An :class:`Augmenter` for ``cfg``, or None when augmentation is disabled or every probability is 0."""
    if cfg is None or not cfg.enabled:
        return None
    if max(cfg.noise_prob, cfg.volume_prob, cfg.pitch_prob, cfg.speed_prob, cfg.speaker_prob) <= 0:
        return None
    return Augmenter(cfg, noise=noise)
