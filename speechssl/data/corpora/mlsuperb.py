"""ML-SUPERB (the multilingual SUPERB benchmark's data release, downloaded by the user) -> CutSets.

The release's layout, one folder per source corpus and language (ISO 639-3)::

    DIR/SOURCE/LANG/transcript_10min_train.txt    lines "UTT_ID FIELD TEXT..." (FIELD is not used)
    DIR/SOURCE/LANG/transcript_1h_train.txt
    DIR/SOURCE/LANG/transcript_10min_dev.txt
    DIR/SOURCE/LANG/transcript_10min_test.txt
    DIR/SOURCE/LANG/wav/UTT_ID.wav

SOURCE is e.g. ``commonvoice``, ``fleurs``, ``mls``, ``voxpopuli``. The benchmark's dev and test sets are the
``10min`` files whatever the training setting. Texts are normalised as the benchmark's ESPnet recipe does:
bracketed tags (``[noise]``) removed, ASCII punctuation removed, upper case. Training utterances longer than
``max_duration`` seconds are left out (the benchmark's default: 20 s).

Every cut's supervision has ``text``, ``language`` and ``custom["language"]`` (the LID label) and
``custom["source"]``; the splits are those of the multilingual mini corpus: ``ml_train_10min``, ``ml_train_1h``,
``ml_dev``, ``ml_test``.
"""
from __future__ import annotations

import logging
import re
import string
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["TRANSCRIPTS", "normalize_mlsuperb_text", "read_transcript", "mlsuperb_cutsets"]

# output split -> transcript file name in every SOURCE/LANG folder
TRANSCRIPTS = {"ml_train_10min": "transcript_10min_train.txt", "ml_train_1h": "transcript_1h_train.txt",
               "ml_dev": "transcript_10min_dev.txt", "ml_test": "transcript_10min_test.txt"}
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_mlsuperb_text(text: str) -> str:
    """Tags in square brackets and ASCII punctuation removed, upper case, single spaces."""
    return " ".join(re.sub(r"\[[^\]]*\]", " ", text).translate(_PUNCT).upper().split())


def read_transcript(path: Path) -> list[tuple[str, str]]:
    """[(utterance id, raw text)] of one transcript file; a line without text is an error naming the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(maxsplit=2)
            if not parts:
                continue
            if len(parts) < 3:
                raise ValueError(f"{path}:{n}: expected 'UTT_ID FIELD TEXT', got {line.strip()!r}")
            out.append((parts[0], parts[2]))
    return out


def _language_dirs(corpus_dir: Path) -> list[tuple[str, str, Path]]:
    found = sorted((src.name, lang.name, lang) for src in corpus_dir.iterdir() if src.is_dir()
                   for lang in src.iterdir() if lang.is_dir() and (lang / TRANSCRIPTS["ml_dev"]).is_file())
    if not found:
        raise FileNotFoundError(f"{corpus_dir}: no SOURCE/LANG/{TRANSCRIPTS['ml_dev']} found; point CORPUS_DIR at "
                                "the unpacked ML-SUPERB release (its folders are source corpora: fleurs, mls, ...)")
    return found


def _cut(utt: str, text: str, source: str, lang: str, wav: Path):
    from lhotse import Recording, SupervisionSegment
    from lhotse.cut import MonoCut

    if not wav.is_file():
        raise FileNotFoundError(f"{wav} is missing (listed in the transcripts of {source}/{lang})")
    rec = Recording.from_file(wav, recording_id=utt)
    sup = SupervisionSegment(id=utt, recording_id=utt, start=0.0, duration=rec.duration, channel=0,
                             text=normalize_mlsuperb_text(text), language=lang, speaker=utt,
                             custom={"language": lang, "source": source})
    return MonoCut(id=utt, start=0.0, duration=rec.duration, channel=0, supervisions=[sup], recording=rec)


def mlsuperb_cutsets(corpus_dir, max_duration: float = 20.0) -> dict:
    """Every SOURCE/LANG folder of ``corpus_dir`` -> ``{split: CutSet}`` for ``ml_train_10min``, ``ml_train_1h``,
    ``ml_dev``, ``ml_test``; a split none of the folders has a transcript for (e.g. no 1-hour files) is left out.
    ``speechssl.data.corpora.prepare.prepare_mlsuperb_cuts`` writes them."""
    from lhotse import CutSet

    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"ML-SUPERB directory {corpus_dir} not found")
    splits: dict[str, list] = {s: [] for s in TRANSCRIPTS}
    dropped = 0
    for source, lang, folder in _language_dirs(corpus_dir):
        for split, name in TRANSCRIPTS.items():
            if not (folder / name).is_file():
                continue
            for utt, text in read_transcript(folder / name):
                cut = _cut(utt, text, source, lang, folder / "wav" / f"{utt}.wav")
                if split.startswith("ml_train") and cut.duration > max_duration:
                    dropped += 1
                    continue
                splits[split].append(cut)
    if dropped:
        log.info("ML-SUPERB: left out %d training cuts longer than %g s", dropped, max_duration)
    return {s: CutSet.from_cuts(c) for s, c in splits.items() if c}
