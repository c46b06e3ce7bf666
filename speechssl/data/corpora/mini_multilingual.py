"""The multilingual mini corpus: synthetic read speech in 12 languages from eSpeak NG, in ML-SUPERB's shape.

``prepare_mini_multilingual(out_dir, minutes, seed, num_jobs)`` plans short sentences in each language's native
spelling (drawn from a small word list per language), renders them with ``mini_audio.synthesize_specs`` (the same
renderer as the English mini corpus: eSpeak voices, prosody jitter, silences, noise) and writes one Lhotse
manifest per split, ``OUT_DIR/cuts_<split>.jsonl.gz``:

- ``ml_train_1h``: the "1 hour" training set at mini scale; ``minutes`` is its total length over all languages.
- ``ml_train_10min``: the "10 minute" set, the first sixth (at least two) of each language's ``ml_train_1h``
  utterances (as in ML-SUPERB, where the 10-minute set is a subset of the 1-hour one).
- ``ml_dev`` and ``ml_test``: held-out sentences by held-out voices.

Each supervision has the native ``text`` (lower case, punctuation removed, single spaces), ``language`` and
``custom["language"]`` (ISO 639-3 code; the LID label) and the eSpeak IPA ``custom["phones"]``.
Same seed and minutes -> same cut ids and the same audio bytes, whatever ``num_jobs`` is.
"""
from __future__ import annotations

import json
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np

from speechssl.constants import SAMPLE_RATE
from speechssl.data.corpora.espeak import Prosody
from speechssl.data.corpora.mini import _write_manifest
from speechssl.data.corpora.mini_audio import UttSpec, synthesize_specs

__all__ = ["LANGUAGES", "SPLITS", "FORMAT_VERSION", "normalize_text", "plan_multilingual",
           "prepare_mini_multilingual"]

# ISO 639-3 code -> (eSpeak voice, native words). Sentences are 3-5 words drawn from the list, so every language
# keeps its own letters and letter statistics (the LID cue a model has to hear, and the ASR output alphabet).
LANGUAGES: dict[str, tuple[str, str]] = {
    "eng": ("en-us", "the sun is warm today and the river runs near the old house where children play"),
    "deu": ("de", "der hund läuft schnell über die grüne wiese und das kind lacht fröhlich im großen garten"),
    "fra": ("fr", "le chat mange une pomme rouge près de la fenêtre où il fait très beau ce matin"),
    "spa": ("es", "el niño come pan con queso en la cocina mientras su madre canta una canción bonita"),
    "ita": ("it", "la ragazza legge un libro sotto il grande albero vicino alla piazza della città"),
    "por": ("pt", "o menino bebe água fresca na praia enquanto o pai lê o jornal pela manhã"),
    "nld": ("nl", "de vrouw fietst elke dag naar het werk langs de rivier en het oude huis"),
    "swe": ("sv", "flickan äter ett rött äpple i köket och hunden sover på mattan hela dagen"),
    "pol": ("pl", "mały kot śpi na ciepłym krześle a pies biegnie szybko przez zielony ogród"),
    "rus": ("ru", "маленькая девочка читает интересную книгу а мальчик играет во дворе с собакой"),
    "ell": ("el", "το μικρό παιδί τρώει ψωμί και τυρί στο σπίτι της γιαγιάς κάθε πρωί"),
    "fin": ("fi", "pieni poika juoksee metsässä ja äiti lukee kirjaa talon vieressä joka ilta"),
}
SPLITS = ("ml_train_10min", "ml_train_1h", "ml_dev", "ml_test")
DEFAULT_MINUTES = 6.0     # of ml_train_1h over all languages: ~15 utterances per language
FORMAT_VERSION = 1        # bump when the generated corpus changes for the same seed
_SENTENCE_SECONDS = 2.0   # average length of a sentence with its silences, to turn minutes into counts
# eSpeak variants: the first four speak training sentences, the last two only dev/test (unseen voices)
_TRAIN_VARIANTS = ("m1", "f1", "m3", "f2")
_HELD_OUT_VARIANTS = ("m5", "f4")


def normalize_text(text: str) -> str:
    """Lower case (Unicode-aware), NFC, letters and apostrophes inside words only, single spaces."""
    text = unicodedata.normalize("NFC", text).lower()
    text = re.sub(r"[^\w' ]+|\d|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def _counts(minutes: float) -> dict[str, int]:
    per_lang = max(6, int(round(minutes * 60 / _SENTENCE_SECONDS / len(LANGUAGES))))
    held = max(2, per_lang // 4)
    # at least two sentences per language in the 10-minute set: with one, a class is a single utterance
    return {"train": per_lang, "10min": max(2, per_lang // 6), "dev": held, "test": held}


def _spec(lang: str, variant: str, text: str, uid: str, seed: int) -> UttSpec:
    rng = np.random.default_rng(seed)
    voice = LANGUAGES[lang][0]
    prosody = Prosody(rate=int(rng.integers(145, 200)), pitch=int(rng.integers(35, 66)),
                      pitch_range=int(rng.integers(35, 70)), volume=int(rng.integers(80, 111)))
    return UttSpec(id=uid, path=f"audio/{lang}/{uid}.wav", kind="speech", seed=seed, speaker=f"{lang}-{variant}",
                   gender=variant[0], voice=f"{voice}+{variant}", text=text, prosody=prosody,
                   speed=float(rng.uniform(0.96, 1.04)), lead_s=float(rng.uniform(0.05, 0.3)),
                   trail_s=float(rng.uniform(0.05, 0.3)), noise_dbfs=float(rng.uniform(-65, -45)))


def plan_multilingual(minutes: float = DEFAULT_MINUTES, seed: int = 0) -> tuple[list[UttSpec], dict[str, list[str]]]:
    """(utterance specs, {split: cut ids}) for every language, from ``seed`` alone."""
    c = _counts(minutes)
    specs: list[UttSpec] = []
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for li, (lang, (_, words)) in enumerate(LANGUAGES.items()):
        vocab = words.split()
        rng = np.random.default_rng([seed, li])
        for part, n, variants in (("train", c["train"], _TRAIN_VARIANTS), ("dev", c["dev"], _HELD_OUT_VARIANTS),
                                  ("test", c["test"], _HELD_OUT_VARIANTS)):
            for k in range(n):
                text = " ".join(rng.choice(vocab, size=int(rng.integers(3, 6))))
                uid = f"ml-{lang}-{part}-{k:04d}"
                s = int(np.random.SeedSequence([seed, li, len(specs)]).generate_state(1)[0])
                specs.append(_spec(lang, variants[k % len(variants)], text, uid, s))
                if part == "train":
                    splits["ml_train_1h"].append(uid)
                    if k < c["10min"]:
                        splits["ml_train_10min"].append(uid)
                else:
                    splits[f"ml_{part}"].append(uid)
    return specs, splits


def _make_cut(spec: UttSpec, out_dir: Path, num_samples: int, phones: str):
    from lhotse import AudioSource, Recording, SupervisionSegment
    from lhotse.cut import MonoCut

    duration = num_samples / SAMPLE_RATE
    lang = spec.speaker.split("-")[0]
    rec = Recording(id=spec.id, sources=[AudioSource(type="file", channels=[0], source=str(out_dir / spec.path))],
                    sampling_rate=SAMPLE_RATE, num_samples=num_samples, duration=duration)
    sup = SupervisionSegment(id=spec.id, recording_id=spec.id, start=0.0, duration=duration, channel=0,
                             text=normalize_text(spec.text), language=lang, speaker=spec.speaker,
                             gender=spec.gender, custom={"language": lang, "phones": phones})
    return MonoCut(id=spec.id, start=0.0, duration=duration, channel=0, supervisions=[sup], recording=rec)


def prepare_mini_multilingual(out_dir, *, minutes: float = DEFAULT_MINUTES, seed: int = 0, num_jobs: int = 2) -> dict:
    """Synthesise the multilingual mini corpus into ``out_dir``; returns ``{split: CutSet}`` for ``SPLITS``.
    A finished corpus with the same (minutes, seed) is reused."""
    from speechssl.utils.io import atomic_write_json

    out_dir = Path(out_dir).resolve()
    if num_jobs < 1:
        raise ValueError(f"num_jobs must be >= 1, got {num_jobs}")
    stamp_path = out_dir / ".mini_multilingual_done.json"
    stamp = {"format_version": FORMAT_VERSION, "minutes": float(minutes), "seed": int(seed)}
    manifest = {split: out_dir / f"cuts_{split}.jsonl.gz" for split in SPLITS}
    done = stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp
    if done and all(p.exists() for p in manifest.values()):
        from lhotse import CutSet

        print(f"multilingual mini corpus already prepared in {out_dir}", file=sys.stderr)
        return {split: CutSet.from_file(p) for split, p in manifest.items()}
    stamp_path.unlink(missing_ok=True)
    specs, splits = plan_multilingual(minutes, seed)
    results = synthesize_specs(specs, out_dir, num_jobs=num_jobs)
    from lhotse import CutSet  # imported after synthesis: the forked workers stay small

    cuts = {s.id: _make_cut(s, out_dir, results[s.id][0], results[s.id][1]) for s in specs}
    cutsets = {}
    for split in SPLITS:
        _write_manifest(manifest[split], [cuts[i] for i in splits[split]])
        cutsets[split] = CutSet.from_cuts([cuts[i] for i in splits[split]])
    atomic_write_json(out_dir / "summary.json", {**stamp, "languages": list(LANGUAGES), "splits": {
        s: {"cuts": len(c), "minutes": round(sum(x.duration for x in c) / 60, 3)} for s, c in cutsets.items()}})
    atomic_write_json(stamp_path, stamp)
    print(f"multilingual mini corpus in {out_dir}: {len(LANGUAGES)} languages, "
          + ", ".join(f"{s} {len(c)} cuts" for s, c in cutsets.items()), file=sys.stderr)
    return cutsets
