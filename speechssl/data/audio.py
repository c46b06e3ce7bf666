"""Audio loading with clear errors for bad input, and manifest validation.

Every failure is a :class:`BadCutError` that names the cut id, the audio path and a short machine-readable
``reason`` (one of :data:`REASONS`), so a broken corpus is diagnosed from one line, and ``skip_bad`` modes can
count skips by reason instead of dropping cuts silently.

Length rule (every path): a file more than 25 ms shorter than its manifest says is ``truncated``; up to 25 ms
is zero- (fast path) or reflection-padded (Lhotse). Lhotse's own default tolerance is 0.5 s, under which an 8 kHz
file behind a 16 kHz manifest loads as half a clip at double speed plus its mirror image: every load here runs
Lhotse at 25 ms, and the header check compares each file's sample rate and channel count with the manifest
before anything is decoded (``rate_mismatch``, ``channel_mismatch``).

Multi-channel policy: a cut that refers to several channels (a Lhotse ``MultiCut``) is down-mixed by averaging
the channels; a ``MonoCut`` that points at one channel of a multi-channel file loads that channel only, exactly
as its manifest says. Audio at another sampling rate is resampled on the fly to 16 kHz (scipy polyphase, no
torchaudio).
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np

from speechssl.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

# 25 ms: shorter audio cannot produce a single feature frame (or a single CNN frame at 400 samples).
DEFAULT_MIN_SAMPLES = 400
# the most a file may fall short of its manifest (seconds) before it is "truncated"; Lhotse's default is 0.5 s
MAX_SHORTFALL_S = 0.025

REASONS = ("missing_file", "unreadable", "truncated", "rate_mismatch", "channel_mismatch", "empty", "too_short",
           "non_finite", "missing_field")

# Supervision fields the tasks use; everything else named in ``require`` is a cut custom field (e.g. units).
SUPERVISION_FIELDS = ("text", "speaker", "emotion", "keyword", "phones", "session")


class BadCutError(ValueError):
    """A cut whose audio or labels cannot be used. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, cut_id: str, path: str | None, reason: str, detail: str = ""):
        self.cut_id, self.path, self.reason, self.detail = cut_id, path, reason, detail
        msg = f"bad cut '{cut_id}' (audio: {path or '?'}): {reason}"
        super().__init__(msg + (f": {detail}" if detail else ""))


def cut_audio_paths(cut) -> list[str]:
    """File paths (or URLs / descriptions) of every audio source a cut reads, mixed cuts included."""
    from lhotse.cut import MixedCut, PaddingCut

    if isinstance(cut, PaddingCut):
        return []
    if isinstance(cut, MixedCut):
        return [p for t in cut.tracks for p in cut_audio_paths(t.cut)]
    rec = getattr(cut, "recording", None)
    if rec is None:
        return []
    out = []
    for src in rec.sources:
        if src.type in ("file", "url", "command"):
            out.append(str(src.source))
        else:
            out.append(f"<{src.type}>")
    return out


def _path_str(cut) -> str:
    paths = cut_audio_paths(cut)
    return ", ".join(paths) if paths else None


def load_cut_audio(cut, *, sampling_rate: int = SAMPLE_RATE, min_samples: int = DEFAULT_MIN_SAMPLES) -> np.ndarray:
    """Load a cut's audio as float32 mono at ``sampling_rate``: ``np.ndarray [num_samples]``.

    Raises :class:`BadCutError` (naming cut id and path) for a missing file, a file whose header disagrees with
    the manifest (sample rate, channels, more than 25 ms fewer frames), unreadable or truncated audio,
    zero-length audio, fewer than ``min_samples`` samples, or NaN/Inf samples. Multi-channel cuts are
    down-mixed by averaging; other sampling rates are resampled on the fly.
    """
    path = _path_str(cut)
    if cut.duration is None or cut.duration <= 0:
        raise BadCutError(cut.id, path, "empty", f"duration {cut.duration}")
    fast = _fast_path_audio(cut, sampling_rate)  # checks the header of the one file it opens
    if fast is not None:
        return _finish(fast, cut.id, path, min_samples)
    _check_headers(cut)  # a header read per file: catches what Lhotse would pad or decode at the wrong speed
    if cut.sampling_rate != sampling_rate:
        cut = cut.resample(sampling_rate)
    return _finish(_lhotse_load(cut, path), cut.id, path, min_samples)


def _lhotse_load(cut, path) -> np.ndarray:
    """``cut.load_audio()`` under the 25 ms rule, its errors turned into :class:`BadCutError`."""
    from lhotse.audio.utils import AudioLoadingError, DurationMismatchError

    try:
        with _lhotse_tolerance(MAX_SHORTFALL_S):
            return cut.load_audio()
    except (AudioLoadingError, DurationMismatchError) as e:
        msg = str(e)
        m = re.search(r"diff=(-?\d+)", msg)
        if m is not None:  # Lhotse's length check: diff = declared - decoded samples
            diff = int(m.group(1))
            if diff > 0:
                raise BadCutError(cut.id, path, "truncated",
                                  f"decoded audio is {diff} samples ({diff / cut.sampling_rate:.3f} s) shorter than "
                                  f"the manifest says (more than {MAX_SHORTFALL_S * 1000:.0f} ms): re-create the file "
                                  "or fix the manifest's duration") from None
            raise BadCutError(cut.id, path, "unreadable",
                              f"decoded audio is {-diff} samples longer than the manifest says: the manifest's "
                              "duration or sampling rate is wrong; re-create the recording from the file") from None
        reason = "truncated" if "declared samples" in msg else "unreadable"
        raise BadCutError(cut.id, path, reason, msg.splitlines()[0][:300]) from None
    except (OSError, RuntimeError, ValueError, AssertionError) as e:
        raise BadCutError(cut.id, path, "unreadable", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None


@contextmanager
def _lhotse_tolerance(seconds: float):
    """Run Lhotse's loader with a duration-mismatch tolerance of ``seconds`` and put the old one back.

    Lhotse reads one module global on every load; its setter warns and logs on each call, so the global is
    swapped directly. Loads run in one thread per process (DataLoader workers are processes).
    """
    import lhotse.audio.utils as lu

    old = lu._LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE
    lu._LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE = seconds
    try:
        yield
    finally:
        lu._LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE = old


def _finish(audio, cut_id: str, path, min_samples: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio[0] if audio.shape[0] == 1 else audio.mean(axis=0)  # documented choice: average channels
    if audio.size == 0:
        raise BadCutError(cut_id, path, "empty", "zero samples")
    if audio.shape[0] < min_samples:
        raise BadCutError(cut_id, path, "too_short", f"{audio.shape[0]} samples < {min_samples}")
    if not np.isfinite(audio).all():
        raise BadCutError(cut_id, path, "non_finite", "NaN or Inf samples")
    return audio


def _fast_path_audio(cut, sampling_rate: int):
    """Read the common case (a MonoCut of a mono file at the target rate, no transforms) straight through
    soundfile, skipping Lhotse's generic loader; None when the cut needs the general path."""
    from lhotse.cut import MonoCut

    if type(cut) is not MonoCut or cut.sampling_rate != sampling_rate:
        return None
    rec = cut.recording
    if rec is None or rec.transforms or len(rec.sources) != 1 or rec.num_channels != 1:
        return None
    src = rec.sources[0]
    if src.type != "file" or not str(src.source).endswith((".wav", ".flac", ".WAV", ".FLAC")):
        return None
    import soundfile as sf

    start = int(round(cut.start * sampling_rate))
    frames = cut.num_samples
    if not os.path.exists(str(src.source)):
        raise BadCutError(cut.id, str(src.source), "missing_file", "no such file")
    try:
        with sf.SoundFile(str(src.source)) as f:
            if f.samplerate != sampling_rate or f.channels != 1:  # the general path's header check names it
                return None
            f.seek(start)
            audio = f.read(frames, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise BadCutError(cut.id, str(src.source), "unreadable", str(e).splitlines()[0][:300]) from None
    short = frames - audio.shape[0]
    if short > 0:
        # the 25 ms rule: up to 25 ms missing at the end is padded, more means a truncated file
        if short > MAX_SHORTFALL_S * sampling_rate:
            raise BadCutError(cut.id, str(src.source), "truncated",
                              f"read {audio.shape[0]} of {frames} samples from offset {start}: re-create the "
                              "file or fix the manifest's duration")
        audio = np.pad(audio, (0, short))
    return audio


def supervision_field(cut, name: str):
    """The value of a supervision field (``text``/``speaker`` or a ``custom`` key) for a cut, or None.

    Texts of several supervisions are joined with a space; other fields come from the first supervision that
    has them.
    """
    sups = list(cut.supervisions)
    if name == "text":
        texts = [s.text for s in sups if s.text]
        return " ".join(texts) if texts else None
    for s in sups:
        if name == "speaker" and s.speaker is not None:
            return s.speaker
        if name in ("text", "speaker"):
            continue
        if s.custom and name in s.custom and s.custom[name] is not None:
            return s.custom[name]
    return None


def has_field(cut, name: str) -> bool:
    """True when the cut has supervision field ``name`` or, failing that, a custom field ``name`` (e.g. units)."""
    if name in SUPERVISION_FIELDS:
        v = supervision_field(cut, name)
        return v is not None and v != ""
    try:
        return cut.has_custom(name)
    except AttributeError:
        return bool(getattr(cut, "custom", None)) and name in cut.custom


def check_fields(cut, require: Sequence[str]) -> None:
    """Raise :class:`BadCutError` (reason ``missing_field``) if any field in ``require`` is absent."""
    missing = [f for f in require if not has_field(cut, f)]
    if missing:
        raise BadCutError(cut.id, _path_str(cut), "missing_field", f"no {', '.join(missing)}")


def check_cut(cut, *, require: Sequence[str] = (), min_duration: float = 0.0, decode: bool = False) -> None:
    """Check one cut without training on it; raises :class:`BadCutError`.

    Without ``decode`` the check is cheap: each file's header (soundfile) against the manifest, enough to catch
    missing, unreadable and truncated files and sample-rate or channel mismatches. NaN/Inf samples and errors
    in the middle of a stream only show when decoding: ``decode=True`` reads the audio fully.
    """
    path = _path_str(cut)
    if cut.duration is None or cut.duration <= 0:
        raise BadCutError(cut.id, path, "empty", f"duration {cut.duration}")
    if cut.duration < min_duration:
        raise BadCutError(cut.id, path, "too_short", f"{cut.duration:.3f} s < min_duration {min_duration}")
    check_fields(cut, require)
    if decode:
        load_cut_audio(cut)
        return
    _check_headers(cut)


def _check_headers(cut) -> None:
    """Header check of every file a cut reads (no decoding): exists, readable, and agrees with the manifest."""
    from lhotse.cut import MixedCut, PaddingCut

    if isinstance(cut, PaddingCut):
        return
    if isinstance(cut, MixedCut):
        for t in cut.tracks:
            _check_headers(t.cut)
        return
    rec = getattr(cut, "recording", None)
    if rec is None:
        return
    for src in rec.sources:
        if src.type == "file":
            _check_source_header(cut.id, rec, src)


def _check_source_header(cut_id: str, rec, src) -> None:
    import soundfile as sf

    p = str(src.source)
    if not os.path.exists(p):
        raise BadCutError(cut_id, p, "missing_file", "no such file")
    try:
        info = sf.info(p)
    except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
        if p.lower().endswith((".wav", ".flac", ".ogg")):
            raise BadCutError(cut_id, p, "unreadable", str(e).splitlines()[0][:200]) from None
        return  # formats soundfile cannot probe (e.g. mp3): the load itself applies the 25 ms rule
    if info.samplerate != rec.sampling_rate:
        # Lhotse would decode at the file's rate and call it the manifest's: wrong speed, wrong length
        raise BadCutError(cut_id, p, "rate_mismatch",
                          f"file is {info.samplerate} Hz, the manifest says {rec.sampling_rate} Hz: re-create the "
                          "recording from the file (Recording.from_file / speechssl prepare) or resample the file")
    if info.channels != len(src.channels):
        raise BadCutError(cut_id, p, "channel_mismatch",
                          f"file has {info.channels} channel(s), the manifest reads {len(src.channels)} "
                          f"({list(src.channels)}) from it: re-create the recording from the file")
    if info.frames == 0:
        raise BadCutError(cut_id, p, "empty", "file has zero frames")
    if info.frames + MAX_SHORTFALL_S * info.samplerate < rec.num_samples:
        raise BadCutError(cut_id, p, "truncated",
                          f"file has {info.frames} frames, the manifest expects {rec.num_samples} (more than "
                          f"{MAX_SHORTFALL_S * 1000:.0f} ms short): re-create the file or fix the manifest")


HEADER_ONLY_NOTE = ("headers only: NaN/Inf samples and decoding errors inside the audio are not checked; "
                    "decode the audio (decode=True) to find them")


def validate_cuts(cuts, require: Sequence[str] = (), min_duration: float = 0.0, skip_bad: bool = False,
                  decode: bool = False, max_examples: int = 5, desc: str | None = None):
    """Check every cut; return ``(CutSet of good cuts, report)``.

    ``desc`` labels the progress bar shown for large or lazy manifests.
    ``report`` = ``{"total": n, "kept": k, "skipped": {reason: count}, "dropped_ids": {reason: [cut id, ...]}``
    (every dropped cut), ``"examples": {reason: [message, ...]}`` (the first ``max_examples`` messages),
    ``"decoded": decode, "duration_hours": kept hours}``. Without ``skip_bad`` the first bad cut raises
    :class:`BadCutError`; with it bad cuts are counted by reason and logged in one warning at the end, never
    dropped silently.
    """
    from lhotse import CutSet

    from speechssl.utils.progress import progress_bar

    kept, skipped, examples, dropped = [], Counter(), {}, {}
    total, dur = 0, 0.0
    # progress only for big manifests: a mini split is checked in well under a second
    n = len(cuts) if not getattr(cuts, "is_lazy", True) else None
    for cut in progress_bar(cuts, desc=desc or "validating cuts", unit="cut", total=n, leave=False,
                            disable=n is not None and n < 5000):
        total += 1
        try:
            check_cut(cut, require=require, min_duration=min_duration, decode=decode)
        except BadCutError as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
            dropped.setdefault(e.reason, []).append(cut.id)
            ex = examples.setdefault(e.reason, [])
            if len(ex) < max_examples:
                ex.append(str(e))
            continue
        kept.append(cut)
        dur += cut.duration
    report = {"total": total, "kept": len(kept), "skipped": dict(skipped), "dropped_ids": dropped,
              "examples": examples, "decoded": bool(decode), "duration_hours": dur / 3600.0}
    if skipped:
        log.warning("skipped %d of %d cuts: %s; e.g. %s", sum(skipped.values()), total, dict(skipped),
                    next(iter(examples.values()))[0])
    return CutSet.from_cuts(kept), report


def summarize(reports: Iterable[tuple[str, dict]]) -> str:
    """Format ``(name, report)`` pairs from :func:`validate_cuts` as an aligned text table."""
    lines = [f"{'split':<14} {'cuts':>7} {'hours':>8} {'skipped':>8}"]
    for name, r in reports:
        lines.append(f"{name:<14} {r['kept']:>7d} {r['duration_hours']:>8.3f} {sum(r['skipped'].values()):>8d}")
    return "\n".join(lines)
