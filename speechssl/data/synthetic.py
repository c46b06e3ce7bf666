"""Synthetic manifests for tests and benchmarks: random speech-like audio written to disk as a CutSet.

Not a corpus (that is ``speechssl prepare mini``): just files with known lengths, optional speakers/texts and
optional unit labels whose values encode their frame index, so alignment is checkable.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from speechssl.constants import SAMPLE_RATE


def speechlike(num_samples: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Harmonics with a wandering pitch, amplitude envelope and a little noise: float32 [num_samples]."""
    t = np.arange(num_samples) / sr
    f0 = 110 + 60 * rng.random() + 30 * np.sin(2 * np.pi * rng.uniform(0.3, 2.0) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    sig = sum(np.sin(k * phase) / k for k in range(1, 5))
    env = 0.4 + 0.6 * np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6)) ** 2
    x = 0.2 * sig * env + 0.005 * rng.standard_normal(num_samples)
    return x.astype(np.float32)


def write_synthetic_cuts(out_dir, num_cuts: int = 8, min_duration: float = 1.0, max_duration: float = 3.0,
                         seed: int = 0, sampling_rate: int = SAMPLE_RATE, units: dict[str, float] | None = None,
                         num_speakers: int = 2, fmt: str = "wav"):
    """Write ``num_cuts`` audio files under ``out_dir`` and return their eager ``CutSet``.

    Each cut has one supervision (text ``"UTT N"``, speaker ``spkK``). ``units`` maps a label name to its frame
    shift in seconds (e.g. ``{"kmeans": 0.02}``); label ``j`` of every cut is ``j % 97`` so tests can compute
    the expected id of any frame.
    """
    import soundfile as sf
    from lhotse import CutSet, NumpyFilesWriter, Recording, SupervisionSegment

    from speechssl.data.labels import store_units

    out = Path(out_dir)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cuts = []
    for i in range(num_cuts):
        n = int(round(rng.uniform(min_duration, max_duration) * sampling_rate))
        path = out / "wav" / f"utt{i:05d}.{fmt}"
        sf.write(str(path), speechlike(n, rng, sampling_rate), sampling_rate)
        rec = Recording.from_file(path, recording_id=f"utt{i:05d}")
        cut = rec.to_cut()
        cut.supervisions = [SupervisionSegment(id=cut.id, recording_id=rec.id, start=0.0, duration=rec.duration,
                                               text=f"UTT {i}", speaker=f"spk{i % num_speakers}")]
        cuts.append(cut)
    if units:
        for name, shift in units.items():
            with NumpyFilesWriter(out / f"units_{name}") as w:
                cuts = [store_units(c, np.arange(int(np.floor(c.duration / shift))) % 97, w, name, shift) for c in cuts]
    return CutSet.from_cuts(cuts)
