"""Real corpora through Lhotse's recipes, normalised to the supervision fields every task reads.

Fields (see docs/data.md): ``supervision.text`` (upper-case words, LibriSpeech style),
``supervision.speaker``, and ``supervision.custom``: ``emotion`` (neutral|happy|sad|angry), ``keyword`` (one of
10 words, ``_unknown_``, ``_silence_``), ``phones``, ``session`` (IEMOCAP fold, int 1..5). Each preparer writes
``OUT_DIR/cuts_SPLIT.jsonl.gz`` per split and returns ``{split: CutSet}``.
"""
from __future__ import annotations

import inspect
import logging
import random
from pathlib import Path
from typing import Callable

from speechssl.constants import KEYWORDS

log = logging.getLogger(__name__)

SILENCE, UNKNOWN = "_silence_", "_unknown_"
"""The keyword-spotting classes besides :data:`~speechssl.constants.KEYWORDS` (SUPERB KS)."""


def _require_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: no such directory: {p}")
    return p


def _cuts_from(manifest: dict):
    from lhotse import CutSet

    cuts = CutSet.from_manifests(recordings=manifest["recordings"], supervisions=manifest.get("supervisions")).to_eager()
    # Lhotse numbers cuts globally ("REC-17"); one cut per recording here, so the recording id is the stable name
    for c in cuts:
        c.id = c.recording_id
    return CutSet.from_cuts(cuts)


def write_cuts(cuts, path) -> None:
    """Write a CutSet to ``path`` (.jsonl.gz) atomically."""
    import gzip
    import json

    from speechssl.utils.io import atomic_write

    def _w(tmp: str) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for c in cuts:
                f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")

    atomic_write(path, _w)


def write_splits(cutsets: dict, out_dir) -> dict:
    """Write ``{split: CutSet}`` as ``out_dir/cuts_SPLIT.jsonl.gz``; returns the eager CutSets written."""
    from lhotse import CutSet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eager = {}
    for split, cuts in cutsets.items():
        cuts = CutSet.from_cuts(sorted(cuts, key=lambda c: c.id))  # deterministic order whatever the parser's
        if len(cuts) == 0:
            log.warning("split %s is empty; not writing it", split)
            continue
        write_cuts(cuts, out / f"cuts_{split}.jsonl.gz")
        eager[split] = cuts
        log.info("%s: %d cuts, %.2f h", split, len(cuts), sum(c.duration for c in cuts) / 3600)
    return eager


def _set_custom(sup, **fields):
    custom = dict(sup.custom or {})
    custom.update({k: v for k, v in fields.items() if v is not None})
    sup.custom = custom or None
    return sup


def _upper_text(text):
    if text is None:
        return None
    t = " ".join(str(text).upper().split())
    return t or None


def _normalise_text(cuts):
    def fix(cut):
        for s in cut.supervisions:
            s.text = _upper_text(s.text)
        return cut

    return cuts.map(fix)


# ---------------------------------------------------------------------------------------------------------
def read_lexicon(paths, *, strip_stress: bool = True) -> dict[str, list[str]]:
    """Pronunciation lexicon(s) in OpenSLR's ``librispeech-lexicon.txt`` format (``WORD<whitespace>PH1 PH2 ...``)
    -> ``{WORD: [phones]}`` with upper-case words. ``paths``: one path or several, read in order; the first
    pronunciation of a word wins (across files too), as in s3prl's PR. ``strip_stress`` drops the ARPAbet stress
    digits (``AH0`` -> ``AH``: 39 phones instead of 69 stressed variants)."""
    import re

    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("no lexicon file given")
    lex: dict[str, list[str]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"lexicon: no such file: {path} (OpenSLR resource 11, librispeech-lexicon.txt)")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise ValueError(f"{path}:{n}: expected 'WORD PH1 PH2 ...', got {line.strip()!r}")
                word = parts[0].upper()
                if word in lex:
                    continue
                phones = [re.sub(r"\d+$", "", p) for p in parts[1:]] if strip_stress else parts[1:]
                lex[word] = phones
    if not lex:
        raise ValueError(f"lexicon {', '.join(map(str, paths))} holds no entries")
    return lex


def phonemize(text: str, lexicon: dict[str, list[str]]) -> tuple[str | None, list[str]]:
    """Upper-case words -> (space-separated phones, []) or (None, the words missing from ``lexicon``)."""
    words = (text or "").upper().split()
    oov = [w for w in words if w not in lexicon]
    if oov or not words:
        return None, oov
    return " ".join(p for w in words for p in lexicon[w]), []


def add_phones(cuts, lexicon: dict[str, list[str]], *, oov: str = "skip", name: str = "cuts") -> tuple[list, dict]:
    """Set ``supervision.custom["phones"]`` on every cut from its text via ``lexicon``.

    A cut with a word missing from the lexicon (or without text) is skipped and counted (``oov="skip"``) or is an
    error naming the cut and the words (``oov="error"``). Returns (kept cuts, report with ``cuts``, ``skipped``,
    ``oov_words`` {word: count}, most frequent first).
    """
    from collections import Counter

    if oov not in ("skip", "error"):
        raise ValueError(f"oov must be 'skip' or 'error', got {oov!r}")
    kept, skipped, missing = [], 0, Counter()
    for cut in cuts:
        ok = bool(cut.supervisions)
        for s in cut.supervisions:
            phones, words = phonemize(s.text, lexicon)
            if phones is None:
                if oov == "error":
                    why = f"words not in the lexicon: {' '.join(words[:10])}" if words else "no text"
                    raise ValueError(f"{name}: cut {cut.id}: {why} (oov='skip' drops such cuts)")
                missing.update(words)
                ok = False
                break
            _set_custom(s, phones=phones)
        if ok:
            kept.append(cut)
        else:
            skipped += 1
    return kept, {"cuts": len(kept) + skipped, "skipped": skipped, "oov_words": dict(missing.most_common())}


def _parts_list(parts) -> list[str]:
    """``"a,b"`` or a sequence of part names -> a list of names."""
    return [p for p in parts.split(",") if p] if isinstance(parts, str) else list(parts)


def prepare_librispeech_cuts(corpus_dir, out_dir, *, parts="auto", num_jobs: int = 2, lexicon=None,
                             strip_stress: bool = True, oov: str = "skip") -> dict:
    """LibriSpeech (``PART/SPEAKER/CHAPTER/*.flac`` + ``*.trans.txt``) -> ``cuts_PART.jsonl.gz`` per part found
    (``train-clean-100``, ``dev-clean``, ...; ``parts`` "auto" = every part present, or a list). Text is the
    upper-case transcript; speaker from the file name.

    ``lexicon`` (a path or a list of paths, see :func:`read_lexicon`) adds ``supervision.custom["phones"]`` for
    the PR task. Cuts with words the lexicon lacks are skipped (``oov="skip"``: counted, and the count plus the
    most frequent missing words are logged and written to ``OUT_DIR/lexicon_report.json``) or are an error
    (``oov="error"``). Nothing is downloaded: get ``librispeech-lexicon.txt`` from OpenSLR resource 11.
    """
    from lhotse.recipes import prepare_librispeech

    corpus_dir = _require_dir(corpus_dir, "librispeech")
    lex = read_lexicon(lexicon, strip_stress=strip_stress) if lexicon else None  # bad lexicon fails before parsing
    parts = parts if parts == "auto" else _parts_list(parts)
    manifests = prepare_librispeech(corpus_dir, dataset_parts=parts, output_dir=None, num_jobs=num_jobs)
    splits = {part: _normalise_text(_cuts_from(m)) for part, m in manifests.items()}
    if lex is not None:
        paths = [lexicon] if isinstance(lexicon, (str, Path)) else list(lexicon)
        splits = _add_lexicon_phones(splits, lex, out_dir, oov=oov,
                                     about={"lexicon": [str(p) for p in paths], "strip_stress": strip_stress})
    return write_splits(splits, out_dir)


def _add_lexicon_phones(splits: dict, lex: dict, out_dir, *, oov: str, about: dict) -> dict:
    """Phones on every part's cuts (:func:`add_phones`); the per-part counts, missing words and the phone set go
    to ``OUT_DIR/lexicon_report.json`` (with ``about``: the lexicon files and the stress setting)."""
    from lhotse import CutSet

    from speechssl.utils.io import atomic_write_json

    report = {**about, "oov": oov, "parts": {}}
    out = dict(splits)
    for part in sorted(splits):
        kept, rep = add_phones(splits[part], lex, oov=oov, name=f"librispeech {part}")
        out[part] = CutSet.from_cuts(kept)
        report["parts"][part] = rep
        if rep["skipped"]:
            log.warning("librispeech %s: %d of %d cuts skipped (words missing from the lexicon: %d distinct, "
                        "e.g. %s)", part, rep["skipped"], rep["cuts"], len(rep["oov_words"]),
                        " ".join(list(rep["oov_words"])[:8]))
    report["phones"] = sorted({p for cs in out.values() for c in cs for s in c.supervisions
                               for p in s.custom["phones"].split()})
    path = Path(out_dir) / "lexicon_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    log.info("phones: %d symbols in use; lexicon report in %s", len(report["phones"]), path)
    return out


def prepare_librilight_cuts(corpus_dir, out_dir, *, parts=("small", "medium", "large"), num_jobs: int = 2,
                            max_segment: float = 30.0) -> dict:
    """Libri-Light (``small|medium|large/SPEAKER/BOOK/*.flac`` + ``*.json`` with speaker and voice activity) ->
    ``cuts_PART.jsonl.gz`` for the parts present: one cut per voice-activity segment, long segments cut into
    windows of at most ``max_segment`` seconds (unlabelled: speaker only, no text)."""
    from lhotse import CutSet
    from lhotse.recipes.librilight import _prepare_subset

    corpus_dir = _require_dir(corpus_dir, "librilight")
    parts = _parts_list(parts)
    present = [p for p in parts if (corpus_dir / p).is_dir()]
    if not present:
        raise FileNotFoundError(f"librilight: none of the parts {parts} found under {corpus_dir}")
    out = {}
    for part in present:
        # Lhotse's prepare_librilight always walks all three parts; its per-part parser is used for the ones here
        recs, sups = _prepare_subset(part, corpus_dir, num_jobs)
        cuts = _cuts_from({"recordings": recs, "supervisions": sups}).trim_to_supervisions(keep_overlapping=False)
        if max_segment:
            cuts = cuts.cut_into_windows(duration=max_segment)
            cuts = CutSet.from_cuts([c for c in cuts if c.duration >= 0.5])
        out[part] = cuts
    return write_splits(out, out_dir)


def _vox_id(rel: str) -> str:
    """``id10270/vid2/00001.wav`` -> the recording id Lhotse gives it, ``id10270-vid2-00001``."""
    return "-".join(rel.rsplit(".", 1)[0].split("/"))


def _read_trials(path: Path, rec_to_cut: dict) -> list[str]:
    lines, missing = [], 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        target, a, b = parts
        ids = [_vox_id(x) for x in (a, b)]
        if not all(i in rec_to_cut for i in ids):
            missing += 1
            continue
        lines.append(f"{target} {rec_to_cut[ids[0]]} {rec_to_cut[ids[1]]}")
    if missing:
        log.warning("%s: %d trials name utterances not in the corpus; skipped", path.name, missing)
    return lines


def _write_vox_trials(corpus_dir: Path, out_dir, rec_to_cut: dict) -> None:
    """``OUT_DIR/asv_trials.txt`` from the first trial list found in the corpus directory (none: a warning)."""
    from speechssl.utils.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("veri_test2.txt", "veri_test.txt", "voxceleb1_test_v2.txt"):
        if (corpus_dir / name).is_file():
            trials = _read_trials(corpus_dir / name, rec_to_cut)
            atomic_write_text(out / "asv_trials.txt", "\n".join(trials) + "\n")
            log.info("asv_trials.txt: %d trials from %s", len(trials), name)
            return
    log.warning("voxceleb1: no veri_test2.txt in %s; asv_trials.txt not written", corpus_dir)


def _vox_sid_splits(iden: Path, all_cuts) -> dict:
    """``sid_{train,dev,test}`` CutSets from ``iden_split.txt`` (``1|2|3 RELATIVE_PATH`` lines)."""
    from lhotse import CutSet

    names = {"1": "sid_train", "2": "sid_dev", "3": "sid_test"}
    which = {}
    for line in iden.read_text().splitlines():
        if line.strip():
            k, rel = line.split()
            which[_vox_id(rel)] = names[k]
    return {split: CutSet.from_cuts([c for c in all_cuts if which.get(c.recording_id) == split])
            for split in names.values()}


def prepare_voxceleb1_cuts(corpus_dir, out_dir, *, num_jobs: int = 2) -> dict:
    """VoxCeleb1 (``wav/idXXXXX/VIDEO/NNNNN.wav`` + ``vox1_meta.csv``) via Lhotse's VoxCeleb1 parser.

    Writes ``cuts_asv_train`` (VoxCeleb1 dev speakers) and ``cuts_asv_test`` (test speakers), and
    ``asv_trials.txt`` (``1|0 ENROLL_CUT TEST_CUT`` lines) from ``veri_test2.txt`` (or ``veri_test.txt``) in
    the corpus directory; with ``iden_split.txt`` (1 train, 2 dev, 3 test) also ``cuts_sid_{train,dev,test}``.
    Nothing is downloaded: Lhotse's ``prepare_voxceleb`` would fetch the trial list, so the lists must be in
    the corpus directory.
    """
    from lhotse.recipes.voxceleb import _prepare_voxceleb_v1

    corpus_dir = _require_dir(corpus_dir, "voxceleb1")
    if not (corpus_dir / "vox1_meta.csv").is_file():
        raise FileNotFoundError(f"voxceleb1: {corpus_dir / 'vox1_meta.csv'} is missing (speaker metadata)")
    manifests = _prepare_voxceleb_v1(corpus_dir, num_jobs)
    splits = {"asv_train": _cuts_from(manifests["train"]).to_eager(),
              "asv_test": _cuts_from(manifests["test"]).to_eager()}
    all_cuts = list(splits["asv_train"]) + list(splits["asv_test"])
    _write_vox_trials(corpus_dir, out_dir, {c.recording_id: c.id for c in all_cuts})
    if (corpus_dir / "iden_split.txt").is_file():
        splits.update(_vox_sid_splits(corpus_dir / "iden_split.txt", all_cuts))
    return write_splits(splits, out_dir)


def _keyword_of(cut) -> str:
    text = (cut.supervisions[0].text or "").strip().lower() if cut.supervisions else ""
    if not text:
        return SILENCE
    return text if text in KEYWORDS else UNKNOWN


def _keyword_cut(cut):
    """The cut with ``custom.keyword`` on its supervision (a window of background noise gets one: ``_silence_``)."""
    from lhotse import SupervisionSegment

    kw = _keyword_of(cut)
    for s in cut.supervisions:
        s.text = None if kw == SILENCE else _upper_text(s.text)
        _set_custom(s, keyword=kw)
    if not cut.supervisions:
        cut.supervisions = [SupervisionSegment(id=cut.id, recording_id=cut.recording_id, start=0,
                                               duration=cut.duration, custom={"keyword": SILENCE})]
    return cut


def prepare_speechcommands_cuts(corpus_dir, out_dir, *, version: str = "1", silence_window: float = 1.0) -> dict:
    """Speech Commands (v0.01 by default: ``speech_commands_v0.01/WORD/*.wav`` with ``validation_list.txt``,
    ``testing_list.txt`` and ``_background_noise_/``, plus ``speech_commands_test_set_v0.01/``) ->
    ``cuts_ks_{train,dev,test}``. ``custom.keyword`` is one of the 10 SUPERB words, ``_unknown_`` or
    ``_silence_``; background-noise recordings become ``silence_window``-second ``_silence_`` cuts."""
    from lhotse import CutSet
    from lhotse.recipes import prepare_speechcommands

    corpus_dir = _require_dir(corpus_dir, "speechcommands")
    manifests = prepare_speechcommands(str(version), corpus_dir, output_dir=None)
    names = {"train": "ks_train", "valid": "ks_dev", "test": "ks_test"}
    out = {}
    for part, m in manifests.items():
        cuts = _cuts_from(m).to_eager()
        noise = CutSet.from_cuts([c for c in cuts if "_background_noise_" in c.id])
        speech = [c for c in cuts if "_background_noise_" not in c.id]
        if len(noise):
            noise = [c for c in noise.cut_into_windows(duration=silence_window)
                     if c.duration >= silence_window - 1e-3]
        out[names[part]] = CutSet.from_cuts([_keyword_cut(c) for c in list(speech) + list(noise)])
    return write_splits(out, out_dir)


def prepare_musan_cuts(corpus_dir, out_dir, *, parts=("music", "speech", "noise")) -> dict:
    """MUSAN (``music|speech|noise/SUBDIR/*.wav``) -> ``cuts_musan_PART.jsonl.gz``: noise for augmentation."""
    from lhotse.recipes import prepare_musan

    corpus_dir = _require_dir(corpus_dir, "musan")
    parts = [p for p in _parts_list(parts) if (corpus_dir / p).is_dir()]
    if not parts:
        raise FileNotFoundError(f"musan: none of music/speech/noise under {corpus_dir}")
    manifests = prepare_musan(corpus_dir, output_dir=None, parts=parts)
    return write_splits({f"musan_{p}": _cuts_from(m) for p, m in manifests.items()}, out_dir)


def prepare_iemocap_cuts(corpus_dir, out_dir, *, fold: int = 1, dev_fraction: float = 0.1, seed: int = 0) -> dict:
    """IEMOCAP -> ``cuts_er_all`` (every 4-class utterance) and fold ``fold``: ``cuts_er_test`` = Session
    ``fold``, ``cuts_er_dev`` = ``dev_fraction`` of the other sessions (seeded), ``cuts_er_train`` = the rest."""
    from lhotse import CutSet

    from speechssl.data.corpora.iemocap import prepare_iemocap

    if fold not in range(1, 6):
        raise ValueError(f"iemocap: fold must be 1..5, got {fold}")
    m = prepare_iemocap(corpus_dir)
    cuts = _cuts_from(m).to_eager()
    test = CutSet.from_cuts([c for c in cuts if c.supervisions[0].custom["session"] == fold])
    rest = [c for c in cuts if c.supervisions[0].custom["session"] != fold]
    random.Random(seed).shuffle(rest)
    n_dev = int(round(dev_fraction * len(rest)))
    dev_ids = {c.id for c in rest[:n_dev]}
    return write_splits({
        "er_all": cuts,
        "er_train": CutSet.from_cuts(sorted((c for c in rest if c.id not in dev_ids), key=lambda c: c.id)),
        "er_dev": CutSet.from_cuts(sorted((c for c in rest if c.id in dev_ids), key=lambda c: c.id)),
        "er_test": test,
    }, out_dir)


def prepare_mlsuperb_cuts(corpus_dir, out_dir, *, max_duration: float = 20.0) -> dict:
    """ML-SUPERB's release (SOURCE/LANG/transcript_*.txt + wav/) -> ``cuts_ml_{train_10min,train_1h,dev,test}``;
    see :mod:`speechssl.data.corpora.mlsuperb`."""
    from speechssl.data.corpora.mlsuperb import mlsuperb_cutsets

    return write_splits(mlsuperb_cutsets(corpus_dir, max_duration=max_duration), out_dir)


CORPORA: dict[str, Callable] = {
    "librispeech": prepare_librispeech_cuts,
    "librilight": prepare_librilight_cuts,
    "voxceleb1": prepare_voxceleb1_cuts,
    "iemocap": prepare_iemocap_cuts,
    "speechcommands": prepare_speechcommands_cuts,
    "musan": prepare_musan_cuts,
    "mlsuperb": prepare_mlsuperb_cuts,
}


class UnsupportedOptionError(ValueError):
    """An option a corpus preparer does not take. ``corpus``, ``unsupported`` and ``supported`` (option names) let
    a caller word the message its own way (the command line names its flags)."""

    def __init__(self, corpus: str, unsupported: list[str], supported: list[str]):
        self.corpus, self.unsupported, self.supported = corpus, list(unsupported), list(supported)
        super().__init__(f"corpus '{corpus}' does not take the option(s) {', '.join(map(repr, unsupported))}; "
                         f"its options are {', '.join(map(repr, supported)) or 'none'}")


def corpus_options(fn: Callable) -> list[str]:
    """The keyword options of a preparer (``prepare_*_cuts`` or ``prepare_mini``): its keyword-only parameters."""
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


def check_options(name: str, fn: Callable, options: dict) -> None:
    """Raise :class:`UnsupportedOptionError` when ``options`` holds a name ``fn`` does not take, so an option
    meant for another corpus is refused instead of dropped."""
    supported = corpus_options(fn)
    unsupported = [k for k in options if k not in supported]
    if unsupported:
        raise UnsupportedOptionError(name, unsupported, supported)


def prepare_corpus(name: str, corpus_dir, out_dir, **options) -> dict:
    """Prepare corpus ``name`` (a key of :data:`CORPORA`) from ``corpus_dir`` into ``out_dir`` with the corpus's
    keyword ``options``; an option it does not take raises :class:`UnsupportedOptionError` naming both."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus '{name}'; choose one of {', '.join(CORPORA)} (or 'mini', 'mini-multilingual')")
    check_options(name, CORPORA[name], options)
    return CORPORA[name](corpus_dir, out_dir, **options)
