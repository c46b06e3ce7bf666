"""IEMOCAP in Lhotse's recipe style (Lhotse 1.33 has no IEMOCAP recipe).

Layout read (the official ``IEMOCAP_full_release``)::

    SessionN/sentences/wav/DIALOG/UTT.wav                  one file per utterance
    SessionN/dialog/EmoEvaluation/DIALOG.txt               "[START - END]\tUTT\tEMO\t[V, A, D]" lines
    SessionN/dialog/transcriptions/DIALOG.txt              "UTT [START-END]: words" (optional)

Emotions use the 4-class setup of SUPERB ER: ``neu`` -> neutral, ``hap`` and ``exc`` -> happy, ``ang`` ->
angry, ``sad`` -> sad; other labels (frustration, surprise, ...) are left out and counted in the log. Each
supervision has ``speaker`` (e.g. ``Ses01F``: session + gender of the speaking actor), upper-case ``text`` when
the transcript is there, and ``custom = {"emotion": ..., "session": N}`` (the fold id 1..5).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

EMOTION_MAP = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}
_EVAL_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)")
_TRANS_LINE = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s*(.*)$")


def _normalise_text(text: str) -> str | None:
    # LibriSpeech style: upper case, words and apostrophes only; drop IEMOCAP's bracketed noise tags
    text = re.sub(r"\[[^\]]*\]", " ", text).upper()
    text = re.sub(r"[^A-Z' ]+", " ", text)
    text = " ".join(w.strip("'") for w in text.split() if w.strip("'"))
    return text or None


def _read_matches(folder: Path, line_re: re.Pattern, key: int, value: int) -> dict[str, str]:
    """``{group key: group value}`` over the lines of every ``*.txt`` in ``folder`` that ``line_re`` matches."""
    out = {}
    for f in sorted(folder.glob("*.txt")):
        for line in f.read_text(errors="replace").splitlines():
            m = line_re.match(line.strip())
            if m:
                out[m.group(key)] = m.group(value)
    return out


def _session(sdir: Path, n: int, dropped: Counter) -> list:
    """(Recording, SupervisionSegment) of every 4-class utterance of session ``n``; the rest counted in
    ``dropped`` by label."""
    from lhotse import Recording, SupervisionSegment

    if not sdir.is_dir():
        raise FileNotFoundError(f"iemocap: {sdir} is missing (expected Session1..Session5)")
    labels = _read_matches(sdir / "dialog" / "EmoEvaluation", _EVAL_LINE, 3, 4)  # utterance -> raw emotion
    if not labels:
        raise FileNotFoundError(f"iemocap: no labels in {sdir / 'dialog' / 'EmoEvaluation'}")
    texts = _read_matches(sdir / "dialog" / "transcriptions", _TRANS_LINE, 1, 2)  # utterance -> transcript
    items = []
    for wav in sorted((sdir / "sentences" / "wav").glob("*/*.wav")):
        utt = wav.stem
        emotion = EMOTION_MAP.get(labels.get(utt, "unlabelled"))
        if emotion is None:
            dropped[labels.get(utt, "unlabelled")] += 1
            continue
        rec = Recording.from_file(wav, recording_id=utt)
        speaker = utt[:5] + utt.split("_")[-1][0]  # Ses01 + F/M of the speaking actor
        items.append((rec, SupervisionSegment(
            id=utt, recording_id=utt, start=0.0, duration=rec.duration, channel=0, speaker=speaker,
            text=_normalise_text(texts[utt]) if utt in texts else None, language="English",
            custom={"emotion": emotion, "session": int(n)},
        )))
    return items


def prepare_iemocap(corpus_dir, output_dir=None, sessions=(1, 2, 3, 4, 5)) -> dict:
    """Return ``{"recordings": RecordingSet, "supervisions": SupervisionSet}`` for the 4-class utterances.

    ``corpus_dir`` holds ``Session1`` ... ``Session5`` (missing sessions are an error unless left out of
    ``sessions``). With ``output_dir`` the manifests are also written as ``iemocap_recordings.jsonl.gz`` and
    ``iemocap_supervisions.jsonl.gz``, as Lhotse recipes do.
    """
    from lhotse import RecordingSet, SupervisionSet
    from lhotse.qa import fix_manifests, validate_recordings_and_supervisions

    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"iemocap: no such directory: {corpus_dir}")
    dropped = Counter()
    items = [item for n in sessions for item in _session(corpus_dir / f"Session{n}", n, dropped)]
    if dropped:
        log.info("iemocap: left out %d utterances outside the 4 classes: %s", sum(dropped.values()), dict(dropped))
    if not items:
        raise ValueError(f"iemocap: no 4-class utterances found under {corpus_dir}")
    recs, sups = fix_manifests(RecordingSet.from_recordings([r for r, _ in items]),
                               SupervisionSet.from_segments([s for _, s in items]))
    validate_recordings_and_supervisions(recs, sups)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        recs.to_file(out / "iemocap_recordings.jsonl.gz")
        sups.to_file(out / "iemocap_supervisions.jsonl.gz")
    return {"recordings": recs, "supervisions": sups}
