"""Rendering the mini corpus: one planned utterance (:class:`UttSpec`) -> 16 kHz audio, phones and a phone
alignment, and whole plans rendered to wav files by worker processes.

eSpeak NG speaks at 22050 Hz; one polyphase resampling takes it to 16 kHz with the utterance's speed jitter, the
quiet ends are trimmed, the speech is placed between silences (or at a random offset in a fixed-length keyword
clip), optionally reverberated in a synthetic room, and mixed with background noise. Every random draw comes from
the spec's seed, so the same spec gives the same bytes in any process and any order.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speechssl.constants import SAMPLE_RATE
from speechssl.data.corpora.espeak import Prosody


@dataclass(frozen=True)
class UttSpec:
    """Everything needed to render one utterance; planned in the parent so results do not depend on jobs."""

    id: str
    path: str                      # relative to OUT_DIR
    kind: str                      # "speech" | "silence"
    seed: int
    speaker: str | None = None
    gender: str | None = None
    voice: str | None = None
    text: str = ""                 # what eSpeak reads (lower case, may end with . or ?)
    prosody: Prosody = field(default_factory=Prosody)
    speed: float = 1.0             # resampling speed factor (also shifts pitch and formants)
    lead_s: float = 0.1
    trail_s: float = 0.1
    noise_dbfs: float = -60.0      # RMS level of the added background noise
    rt60: float = 0.0              # room reverberation time in seconds (0 = dry)
    clip_s: float | None = None    # fixed clip length (keyword clips), speech placed at a random offset
    emotion: str | None = None
    keyword: str | None = None
    session: int | None = None



_PINK_B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
_PINK_A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])


def _noise(n: int, dbfs: float, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """Background noise [n] with RMS ``dbfs``: white, pink, brown, or pink with mains hum."""
    from scipy.signal import lfilter

    kind = kind or ("white", "pink", "brown", "hum")[int(rng.integers(4))]
    w = rng.standard_normal(n + 2000)
    if kind == "white":
        x = w
    elif kind == "brown":
        x = lfilter([1.0], [1.0, -0.995], w)
    else:
        x = lfilter(_PINK_B, _PINK_A, w)
    x = x[2000:]  # drop the filter's start-up transient
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f = rng.choice([50.0, 60.0])
        x = x / (x.std() + 1e-9) + sum(rng.uniform(0.5, 2.0) / h * np.sin(2 * np.pi * f * h * t + rng.uniform(0, 6.3))
                                       for h in (1, 2, 3))
    x = x - x.mean()
    return (x * (10 ** (dbfs / 20)) / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def _room_response(rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response [N]: the direct path, then exponentially decaying noise that falls by
    60 dB in ``rt60`` seconds, starting 3-10 ms after it (early reflections), at a direct-to-reverberant ratio
    of 0 to 8 dB."""
    n = int(rt60 * SAMPLE_RATE)
    gap = int(rng.integers(48, 160))
    tail = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
    drr_db = rng.uniform(0.0, 8.0)
    tail *= 10 ** (-drr_db / 20) / (np.sqrt(np.sum(tail ** 2)) + 1e-12)
    h = np.zeros(gap + n)
    h[0] = 1.0
    h[gap:] = tail
    return h


def _reverberate(wav: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """``wav`` [T] in a room (``_room_response``), cut to its length and rescaled to its RMS."""
    from scipy.signal import fftconvolve

    out = fftconvolve(wav, _room_response(rt60, rng))[: wav.size]
    return (out * np.sqrt(np.mean(wav ** 2)) / (np.sqrt(np.mean(out ** 2)) + 1e-12)).astype(np.float32)


def _trim(x: np.ndarray, threshold: float = 2e-3) -> tuple[np.ndarray, int]:
    """(x without its quiet ends, index in x where the kept part starts)."""
    idx = np.flatnonzero(np.abs(x) > threshold)
    return (x[idx[0]: idx[-1] + 1], int(idx[0])) if idx.size else (x, 0)


def _phone_alignment(events: list[tuple[str, int]], num_raw: int, ratio: float, lead: int, speech_len: int,
                     start: int, n: int) -> list[tuple[str, float, float]]:
    """eSpeak's phone events as (symbol, start s, duration s) items covering the whole clip of ``n`` samples.

    An event at raw sample ``s`` starts at ``start + s * ratio - lead`` in the clip (resampling and speed change by
    ``ratio``, the trimmed quiet start ``lead``, the placement ``start``), clipped to the speech; a phone ends
    where the next starts. Pauses ("") and the silences around the speech become "sil".
    """
    if not events:
        return []

    def at(raw_sample: float) -> int:
        return start + int(round(min(max(raw_sample * ratio - lead, 0.0), speech_len)))

    bounds = [at(s) for _, s in events] + [at(num_raw)]
    spans = [("sil", 0, bounds[0])] + [(sym or "sil", bounds[i], bounds[i + 1]) for i, (sym, _) in enumerate(events)]
    spans.append(("sil", bounds[-1], n))
    merged: list[list] = []
    for sym, a, b in spans:
        if b <= a:
            continue
        if merged and sym == "sil" and merged[-1][0] == "sil":
            merged[-1][2] = b  # one silence, not a run of pauses
        else:
            merged.append([sym, a, b])
    return [(sym, round(a / SAMPLE_RATE, 5), round((b - a) / SAMPLE_RATE, 5)) for sym, a, b in merged]


def speak(spec: UttSpec) -> tuple[np.ndarray, int, list[list[str]], list[tuple[str, int]]]:
    """eSpeak NG's part of one utterance, in this process: (int16 samples [T], sample rate, phones per word,
    phone events [(IPA symbol, start sample)])."""
    from speechssl.data.corpora.espeak import get_engine

    engine = get_engine()
    data, events = engine.synthesize_timed(spec.text, spec.voice, spec.prosody, seed=spec.seed)
    raw = np.frombuffer(data, dtype="<i2").astype(np.int16)
    if raw.size == 0:
        raise RuntimeError(f"eSpeak NG produced no audio for {spec.id} ({spec.text!r})")
    return raw, engine.sample_rate, engine.phonemize(spec.text.rstrip(".?!"), spec.voice), events


def render(spec: UttSpec, speak_fn=speak
           ) -> tuple[np.ndarray, list[list[str]], list[tuple[str, float, float]]]:
    """Audio float32 [T] at 16 kHz, IPA phones per word and the phone alignment (``_phone_alignment``; empty for
    silence clips) for one planned utterance.

    ``speak_fn`` runs eSpeak: ``speak`` in this process (not bit-exact after earlier calls), or an
    ``ESpeakServer``'s (bit-exact); the rest (resampling, silences, noise) is plain numpy.
    """
    from scipy.signal import resample_poly

    rng = np.random.default_rng([spec.seed, 7])  # a stream apart from the one that planned the spec
    words: list[list[str]] = []
    phones: list[tuple[str, float, float]] = []
    if spec.kind == "silence":
        wav = _noise(int(round(spec.clip_s * SAMPLE_RATE)), spec.noise_dbfs, rng)
    else:
        raw, sr, words, events = speak_fn(spec)
        # One resampling does both 22050 -> 16000 Hz and the speed jitter (a Lhotse-style speed change).
        down = int(round(sr / 50 * spec.speed))
        speech, lead = _trim(resample_poly(raw.astype(np.float32) / 32768.0, SAMPLE_RATE // 50, down))
        if spec.clip_s is not None:
            n = max(int(round(spec.clip_s * SAMPLE_RATE)), speech.size + 800)
            start = int(rng.integers(0, n - speech.size + 1))
        else:
            start = int(round(spec.lead_s * SAMPLE_RATE))
            n = start + speech.size + int(round(spec.trail_s * SAMPLE_RATE))
        wav = np.zeros(n, dtype=np.float32)
        wav[start: start + speech.size] = speech
        if spec.rt60 > 0:
            wav = _reverberate(wav, spec.rt60, rng)
        wav += _noise(n, spec.noise_dbfs, rng)
        phones = _phone_alignment(events, raw.size, SAMPLE_RATE // 50 / down, lead, speech.size, start, n)
    return np.clip(wav, -1.0, 32767 / 32768), words, phones


def _write_wav(path: Path, wav: np.ndarray) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(str(tmp), np.round(wav * 32768).astype(np.int16), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


_SERVER = None  # this worker's eSpeak helper process


def _server_speak(spec: UttSpec) -> tuple[np.ndarray, int, list[list[str]], list[tuple[str, int]]]:
    return _SERVER.speak_timed(spec.text, spec.voice, spec.prosody, spec.seed, phone_text=spec.text.rstrip(".?!"))


def _worker_init() -> None:
    # One eSpeak helper per worker (bit-exact output, see espeak.ESpeakServer); closed when the worker exits.
    global _SERVER
    from multiprocessing.util import Finalize

    from speechssl.data.corpora.espeak import ESpeakServer

    _SERVER = ESpeakServer()
    Finalize(_SERVER, _SERVER.close, exitpriority=10)


def _render_chunk(args: tuple[str, list[UttSpec]]) -> list[tuple[str, int, str, list]]:
    """Worker: render and write a chunk of utterances; returns (cut id, num samples, phones, phone alignment)."""
    out_dir, specs = args
    results = []
    for spec in specs:
        try:
            wav, words, alignment = render(spec, _server_speak)
            _write_wav(Path(out_dir) / spec.path, wav)
        except Exception as e:
            raise RuntimeError(f"mini corpus: failed to synthesise {spec.id} ({spec.text!r}, voice {spec.voice}): "
                               f"{e}") from e
        results.append((spec.id, int(wav.size), " ".join(p for w in words for p in w), alignment))
    return results


def synthesize_specs(specs: list[UttSpec], out_dir, num_jobs: int = 2, progress: bool = True
                     ) -> dict[str, tuple[int, str, list]]:
    """Render ``specs`` to wav files under ``out_dir`` with ``num_jobs`` worker processes.

    Returns ``{cut id: (num samples, phones, phone alignment [(symbol, start s, duration s)])}``. Each worker
    has an ``ESpeakServer`` helper that speaks every utterance from a pristine fork, so the bytes depend only on
    the spec (not on jobs or order).
    """
    import multiprocessing as mp

    from speechssl.utils.progress import progress_bar

    if num_jobs < 1:
        raise ValueError(f"num_jobs must be >= 1, got {num_jobs}")
    # Workers only run numpy/scipy and talk to their eSpeak helper; fork them where possible (fast, and
    # scripts need no __main__ guard).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    chunk = 24
    jobs = [(str(out_dir), specs[i: i + chunk]) for i in range(0, len(specs), chunk)]
    results: dict[str, tuple[int, str, list]] = {}
    with progress_bar(total=len(specs), desc="synthesising mini corpus", unit="utt", disable=not progress) as bar, \
            ProcessPoolExecutor(max_workers=num_jobs, mp_context=mp.get_context(method),
                                initializer=_worker_init) as pool:
        for out in pool.map(_render_chunk, jobs):
            for cid, n, phones, alignment in out:
                results[cid] = (n, phones, alignment)
            bar.update(len(out))
    return results
