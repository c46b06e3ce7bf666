"""The mini corpus: synthetic English speech from eSpeak NG covering every SUPERB-style task.

``prepare_mini(out_dir, minutes, seed, num_jobs)`` plans every utterance from the seed (text, voice,
prosody, silences, noise), renders them in ``num_jobs`` worker processes (each with its own eSpeak NG
helper process, ``espeak.ESpeakServer``), writes 16 kHz 16-bit wav files under ``OUT_DIR/audio/`` and one
Lhotse manifest per split, ``OUT_DIR/cuts_<split>.jsonl.gz``, plus ``OUT_DIR/asv_trials.txt``. Same seed and minutes -> same cut ids
and the same audio bytes, whatever ``num_jobs`` is.

Speakers: 24 eSpeak voices (accents en-us and en-gb x variants m1..m7, f1..f5), each with its own base
pitch, pitch range, rate and volume. 16 are "training side" speakers (ASR train, SID, ER, KS train, ASV
train); 8 are held out (unseen ASR dev/test speakers, KS dev/test, ASV test).

The ``pretrain`` split is an unlabelled pool of its own (``POOL_FACTOR`` x the read-sentence minutes): new
sentences by the training-side speakers and 24 pool-only voices (six more accents), in every prosody class,
with wider speed and noise ranges and half of it in a synthetic room (``custom.rt60``). It shares no audio and
no transcript with the labelled splits and holds no held-out speaker.

This module plans the corpus and writes its manifests; :mod:`speechssl.data.corpora.mini_audio` renders the audio
(``render`` and ``synthesize_specs`` are re-exported here, the corpus's one entry point).
"""
from __future__ import annotations

import gzip
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from speechssl.constants import SAMPLE_RATE
from speechssl.data.corpora.espeak import Prosody
from speechssl.data.corpora.mini_audio import UttSpec, render, synthesize_specs
from speechssl.data.corpora.mini_text import (
    KEYWORDS, SILENCE, UNKNOWN, UNKNOWN_WORDS, SentenceGrammar, normalize_transcript,
)

__all__ = ["SPLITS", "EMOTIONS", "FORMAT_VERSION", "SPEAKERS", "POOL_SPEAKERS", "TRAIN_SPEAKERS",
           "HELD_OUT_SPEAKERS", "MiniPlan", "UttSpec", "plan_mini", "prepare_mini", "render", "synthesize_specs"]

SPLITS = ("pretrain", "asr_train", "asr_dev", "asr_test", "sid_train", "sid_dev", "sid_test",
          "asv_train", "asv_test", "er_train", "er_dev", "er_test", "ks_train", "ks_dev", "ks_test")
EMOTIONS = ("neutral", "happy", "sad", "angry")
DEFAULT_MINUTES = 15.0  # ~380 ASR utterances; 50 clips per emotion and 32 per keyword class in training
FORMAT_VERSION = 3  # bump when the generated corpus changes for the same seed (2: phone alignments, 3: pool)
POOL_FACTOR = 3.0  # the pretraining pool holds about this many times the read-sentence minutes
_SENTENCE_SECONDS = 2.4  # average length of a read sentence with its silences, to turn minutes into counts


@dataclass(frozen=True)
class MiniSpeaker:
    """One synthetic speaker: an eSpeak voice plus personal prosody defaults (eSpeak units)."""

    id: str
    voice: str
    gender: str                    # "m" | "f", from the eSpeak variant
    pitch: int
    pitch_range: int
    rate: int
    volume: int
    held_out: bool


def _make_speakers() -> tuple[MiniSpeaker, ...]:
    # A fixed table, independent of the corpus seed, so a speaker id always names the same voice.
    rng = np.random.default_rng(20240607)
    held_out = {"us-m2", "us-m6", "us-f3", "us-f5", "gb-m3", "gb-m7", "gb-f2", "gb-f4"}
    speakers = []
    for accent, lang in (("us", "en-us"), ("gb", "en")):
        for variant in ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"):
            sid = f"{accent}-{variant}"
            speakers.append(MiniSpeaker(
                id=sid, voice=f"{lang}+{variant}", gender=variant[0], pitch=int(rng.integers(38, 63)),
                pitch_range=int(rng.integers(38, 66)), rate=int(rng.integers(150, 196)),
                volume=int(rng.integers(80, 101)), held_out=sid in held_out))
    return tuple(speakers)


def _make_pool_speakers() -> tuple[MiniSpeaker, ...]:
    # Voices heard only in the pretraining pool: other accents and eSpeak variants, so pretraining meets more
    # voices than the labelled splits and none of the held-out test speakers.
    rng = np.random.default_rng(20261201)
    accents = (("nyc", "en-us-nyc"), ("rp", "en-gb-x-rp"), ("sc", "en-gb-scotland"), ("cb", "en-029"),
               ("ln", "en-gb-x-gbclan"), ("cw", "en-gb-x-gbcwmd"))
    variants = (("adam", "m"), ("anika", "f"), ("aunty", "f"), ("benjamin", "m"), ("caleb", "m"),
                ("david", "m"), ("edward", "m"), ("grandma", "f"), ("ian", "m"), ("linda", "f"), ("m8", "m"),
                ("max", "m"), ("michel", "m"), ("norbert", "m"), ("f1", "f"), ("f4", "f"))
    speakers = []
    for i, (accent, lang) in enumerate(accents):
        for j in range(4):
            variant, gender = variants[(4 * i + j) % len(variants)]
            speakers.append(MiniSpeaker(
                id=f"{accent}-{variant}", voice=f"{lang}+{variant}", gender=gender,
                pitch=int(rng.integers(30, 71)), pitch_range=int(rng.integers(30, 76)),
                rate=int(rng.integers(140, 211)), volume=int(rng.integers(60, 121)), held_out=False))
    return tuple(speakers)


SPEAKERS = _make_speakers()
POOL_SPEAKERS = _make_pool_speakers()
TRAIN_SPEAKERS = tuple(s for s in SPEAKERS if not s.held_out)
HELD_OUT_SPEAKERS = tuple(s for s in SPEAKERS if s.held_out)
# Unseen ASR speakers: two in dev, the other six in test. KS dev/test: four held-out speakers each.
ASR_DEV_UNSEEN = ("us-m6", "gb-f2")
KS_DEV_SPEAKERS = ("us-m2", "us-f3", "gb-m3", "gb-f4")

# Emotion prosody relative to the speaker's defaults: pitch offset, range / rate / volume factors.
EMOTION_PROSODY = {
    "neutral": (0, 1.0, 1.0, 1.0),
    "happy": (18, 1.7, 1.15, 1.1),     # high, wide, fast
    "sad": (-15, 0.5, 0.78, 0.6),      # low, flat, slow, quiet
    "angry": (8, 0.45, 1.18, 1.55),    # loud, fast, narrow range
}


def _seed_for(seed: int, group: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, group, index]).generate_state(1)[0])


def _clip(x: float, lo: float, hi: float) -> float:
    return float(min(hi, max(lo, x)))


def _prosody(spk: MiniSpeaker, rng: np.random.Generator, emotion: str = "neutral", jitter: float = 1.0) -> Prosody:
    dp, frange, frate, fvol = EMOTION_PROSODY[emotion]
    return Prosody(
        rate=int(round(_clip(spk.rate * frate * rng.uniform(1 - 0.13 * jitter, 1 + 0.13 * jitter), 80, 450))),
        pitch=int(round(_clip(spk.pitch + dp + rng.uniform(-6, 6) * jitter, 0, 100))),
        pitch_range=int(round(_clip(spk.pitch_range * frange * rng.uniform(0.85, 1.15), 0, 100))),
        volume=int(round(_clip(spk.volume * fvol * rng.uniform(0.85, 1.15), 0, 170))),
    )


def _speech_spec(uid: str, path: str, spk: MiniSpeaker, text: str, seed: int, emotion: str = "neutral",
                 **extra) -> UttSpec:
    rng = np.random.default_rng(seed)
    return UttSpec(
        id=uid, path=path, kind="speech", seed=seed, speaker=spk.id, gender=spk.gender, voice=spk.voice, text=text,
        prosody=_prosody(spk, rng, emotion), speed=float(rng.uniform(0.96, 1.04)),
        lead_s=float(rng.uniform(0.05, 0.35)), trail_s=float(rng.uniform(0.05, 0.35)),
        noise_dbfs=float(rng.uniform(-65, -42)), emotion=emotion, **extra)


def _pool_spec(uid: str, spk: MiniSpeaker, text: str, seed: int) -> UttSpec:
    """A pretraining-pool utterance: any prosody class, wider speed and noise ranges, half of them in a room."""
    rng = np.random.default_rng([seed, 11])
    emotion = EMOTIONS[int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))]
    spec = _speech_spec(uid, f"audio/pool/{spk.id}/{uid}.wav", spk, text, seed, emotion=emotion)
    return replace(spec, speed=float(rng.uniform(0.9, 1.1)), noise_dbfs=float(rng.uniform(-65, -32)),
                   rt60=float(rng.uniform(0.15, 0.6)) if rng.random() < 0.5 else 0.0, emotion=None)


def _punctuate(sentence: str) -> str:
    return sentence + ("?" if sentence.startswith(("did ", "where ")) else ".")


@dataclass
class MiniPlan:
    specs: list[UttSpec]
    splits: dict[str, list[str]]   # split -> cut ids (in order)
    trials: list[tuple[int, str, str]]


def _counts(minutes: float) -> dict[str, int]:
    """Per-speaker counts for a corpus of about ``minutes`` of read sentences."""
    n_sent = max(1, round(minutes * 60 / _SENTENCE_SECONDS))
    per_train = max(3, round(0.75 * n_sent / len(TRAIN_SPEAKERS)))
    eval_each = max(1, math.ceil(0.1 * per_train))
    return {
        "sent_train": per_train - 2 * eval_each, "sent_dev": eval_each, "sent_test": eval_each,
        "sent_held_out": max(2, round(0.25 * n_sent / len(HELD_OUT_SPEAKERS))),
        "er": min(10, max(1, round(minutes / 3))),      # clips per speaker per emotion
        "ks": min(10, max(1, round(minutes / 7))),      # clips per speaker per keyword class
        "pool": max(len(TRAIN_SPEAKERS) + len(POOL_SPEAKERS), round(POOL_FACTOR * n_sent)),  # pool sentences
    }


def plan_mini(minutes: float = DEFAULT_MINUTES, seed: int = 0) -> MiniPlan:
    """Decide every utterance of the corpus (no audio yet). Deterministic for (minutes, seed)."""
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    c = _counts(minutes)
    plan = MiniPlan(specs=[], splits={s: [] for s in SPLITS}, trials=[])
    # one sentence stream, drawn in this order, so that no transcript repeats across the steps
    grammar = SentenceGrammar(np.random.default_rng(np.random.SeedSequence([seed, 0])))
    _plan_sentences(plan, c, grammar, seed)
    _plan_emotions(plan, c, grammar, seed)
    _plan_keywords(plan, c, seed)
    _plan_pool(plan, c, grammar, seed)
    plan.trials = _asv_trials(plan.splits["asv_test"], {s.id: s.speaker for s in plan.specs},
                              np.random.default_rng(np.random.SeedSequence([seed, 5])))
    return plan


def _plan_sentences(plan: MiniPlan, c: dict, grammar: SentenceGrammar, seed: int) -> None:
    """Read sentences (pretrain / ASR / SID / ASV): each transcript appears once in the whole corpus."""
    n_train_side = c["sent_train"] + c["sent_dev"] + c["sent_test"]
    n_sent = n_train_side * len(TRAIN_SPEAKERS) + c["sent_held_out"] * len(HELD_OUT_SPEAKERS)
    sentences = iter(grammar.unique_sentences(n_sent))
    splits, k = plan.splits, 0
    for spk in SPEAKERS:
        n = c["sent_held_out"] if spk.held_out else n_train_side
        for i in range(n):
            uid = f"mini-sent-{spk.id}-{i:04d}"
            plan.specs.append(_speech_spec(uid, f"audio/sent/{spk.id}/{uid}.wav", spk, _punctuate(next(sentences)),
                                           _seed_for(seed, 1, k)))
            k += 1
            if spk.held_out:
                splits["asr_dev" if spk.id in ASR_DEV_UNSEEN else "asr_test"].append(uid)
                splits["asv_test"].append(uid)
                continue
            part = "train" if i < c["sent_train"] else "dev" if i < c["sent_train"] + c["sent_dev"] else "test"
            splits[f"asr_{part}"].append(uid)
            splits[f"sid_{part}"].append(uid)
            if part == "train":
                splits["asv_train"].append(uid)


def _plan_emotions(plan: MiniPlan, c: dict, grammar: SentenceGrammar, seed: int) -> None:
    """Emotion clips: training-side speakers in 5 sessions like IEMOCAP; sessions 1-3 train, 4 dev, 5 test."""
    short = iter(grammar.unique_sentences(c["er"] * len(EMOTIONS) * len(TRAIN_SPEAKERS), short=True,
                                          exclude={normalize_transcript(s.text) for s in plan.specs}))
    k = 0
    for si, spk in enumerate(TRAIN_SPEAKERS):
        session = si % 5 + 1
        split = "er_train" if session <= 3 else "er_dev" if session == 4 else "er_test"
        for i in range(c["er"]):
            for emotion in EMOTIONS:
                uid = f"mini-er-{spk.id}-{emotion}-{i:03d}"
                plan.specs.append(_speech_spec(uid, f"audio/er/{spk.id}/{uid}.wav", spk, _punctuate(next(short)),
                                               _seed_for(seed, 2, k), emotion=emotion, session=session))
                k += 1
                plan.splits[split].append(uid)


def _plan_keywords(plan: MiniPlan, c: dict, seed: int) -> None:
    """Keyword clips of about 1 s: train on training-side speakers, dev/test on held-out speakers."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    k = 0
    for spk in SPEAKERS:
        split = ("ks_train" if not spk.held_out else "ks_dev" if spk.id in KS_DEV_SPEAKERS else "ks_test")
        for i in range(c["ks"]):
            for label in KEYWORDS + (UNKNOWN, SILENCE):
                s = _seed_for(seed, 4, k)
                k += 1
                if label == SILENCE:
                    spec = _silence_clip(k, s)
                else:
                    word = label if label != UNKNOWN else UNKNOWN_WORDS[int(rng.integers(len(UNKNOWN_WORDS)))]
                    spec = _keyword_clip(spk, label, word, i, s)
                plan.specs.append(spec)
                plan.splits[split].append(spec.id)


def _silence_clip(k: int, s: int) -> UttSpec:
    # Background noise only; drawn once per speaker slot so every split has balanced classes.
    uid = f"mini-ks-silence-{k:04d}"
    return UttSpec(id=uid, path=f"audio/ks/silence/{uid}.wav", kind="silence", seed=s, clip_s=1.0,
                   noise_dbfs=float(np.random.default_rng(s).uniform(-55, -28)), keyword=SILENCE)


def _keyword_clip(spk: MiniSpeaker, label: str, word: str, i: int, s: int) -> UttSpec:
    """A one-second clip of ``word`` (``label`` itself, or a non-keyword for ``_unknown_``) said by ``spk``."""
    uid = f"mini-ks-{spk.id}-{label.strip('_')}-{i:02d}"
    spec = _speech_spec(uid, f"audio/ks/{spk.id}/{uid}.wav", spk, word + ".", s, keyword=label)
    return replace(spec, clip_s=1.0, lead_s=0.0, trail_s=0.0, emotion=None,
                   noise_dbfs=float(np.random.default_rng(s + 1).uniform(-60, -38)))


def _plan_pool(plan: MiniPlan, c: dict, grammar: SentenceGrammar, seed: int) -> None:
    """The pretraining pool: unlabelled sentences of its own (no transcript shared with a labelled split) by the
    training-side speakers and the pool-only voices; none by a held-out (test) speaker."""
    pool_speakers = TRAIN_SPEAKERS + POOL_SPEAKERS
    said = {normalize_transcript(s.text) for s in plan.specs}
    pool_text = iter(grammar.unique_sentences(c["pool"], exclude=said))
    for i in range(c["pool"]):
        spk = pool_speakers[i % len(pool_speakers)]
        uid = f"mini-pool-{spk.id}-{i // len(pool_speakers):04d}"
        plan.specs.append(_pool_spec(uid, spk, _punctuate(next(pool_text)), _seed_for(seed, 6, i)))
        plan.splits["pretrain"].append(uid)


def _asv_trials(cut_ids: list[str], speaker_of: dict[str, str], rng: np.random.Generator
                ) -> list[tuple[int, str, str]]:
    """Every same-speaker pair as a target trial and as many random different-speaker pairs."""
    by_spk: dict[str, list[str]] = {}
    for cid in cut_ids:
        by_spk.setdefault(speaker_of[cid], []).append(cid)
    targets = [(1, a, b) for ids in by_spk.values() for i, a in enumerate(ids) for b in ids[i + 1:]]
    nontargets: set[tuple[str, str]] = set()
    max_nontargets = sum(len(a) * len(b) for i, a in enumerate(by_spk.values())
                         for b in list(by_spk.values())[i + 1:])
    while len(nontargets) < min(len(targets), max_nontargets):
        a, b = rng.choice(len(cut_ids), 2, replace=False)
        if speaker_of[cut_ids[a]] != speaker_of[cut_ids[b]]:
            nontargets.add((cut_ids[a], cut_ids[b]))
    trials = targets + [(0, a, b) for a, b in sorted(nontargets)]
    order = rng.permutation(len(trials))
    return [trials[i] for i in order]


# ----------------------------------------------------------------------------------------------- manifests

def _make_cut(spec: UttSpec, out_dir: Path, num_samples: int, phones: str, alignment=()):
    """The cut of one utterance; ``alignment`` [(symbol, start s, duration s)] becomes the supervision's
    ``alignment["phone"]`` (times relative to the cut, which starts at 0 of its recording)."""
    from lhotse import AudioSource, Recording, SupervisionSegment
    from lhotse.cut import MonoCut
    from lhotse.supervision import AlignmentItem

    duration = num_samples / SAMPLE_RATE
    rec = Recording(id=spec.id, sources=[AudioSource(type="file", channels=[0], source=str(out_dir / spec.path))],
                    sampling_rate=SAMPLE_RATE, num_samples=num_samples, duration=duration)
    custom = {}
    if spec.kind == "speech":
        custom["phones"] = phones
    for key in ("emotion", "keyword", "session"):
        if getattr(spec, key) is not None:
            custom[key] = getattr(spec, key)
    if spec.rt60 > 0:
        custom["rt60"] = round(spec.rt60, 3)
    text = normalize_transcript(spec.text) if spec.kind == "speech" else ""
    sup = SupervisionSegment(id=spec.id, recording_id=spec.id, start=0.0, duration=duration, channel=0,
                             text=text, language="English", speaker=spec.speaker, gender=spec.gender,
                             custom=custom,
                             alignment={"phone": [AlignmentItem(*a) for a in alignment]} if alignment else None)
    return MonoCut(id=spec.id, start=0.0, duration=duration, channel=0, supervisions=[sup], recording=rec)


def _write_manifest(path: Path, cuts: list) -> None:
    """jsonl.gz with a zero gzip timestamp, so the same corpus gives the same bytes."""
    from speechssl.utils.io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            for cut in cuts:
                f.write((json.dumps(cut.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))

    atomic_write(path, write)


def _summary(cutsets: dict) -> str:
    lines = [f"{'split':<10} {'cuts':>6} {'minutes':>8} {'hours':>7} {'speakers':>8}"]
    for split, cuts in cutsets.items():
        secs = sum(c.duration for c in cuts)
        spk = {s.speaker for c in cuts for s in c.supervisions if s.speaker is not None}
        lines.append(f"{split:<10} {len(cuts):>6} {secs / 60:>8.2f} {secs / 3600:>7.3f} {len(spk):>8}")
    return "\n".join(lines)


def prepare_mini(out_dir, *, minutes: float = DEFAULT_MINUTES, seed: int = 0, num_jobs: int = 2) -> dict:
    """Synthesise the mini corpus into ``out_dir``; returns ``{split: CutSet}`` for every name in ``SPLITS``.

    ``minutes`` is roughly the length of the read-sentence pool (pretraining, ASR, SID, ASV); the emotion and
    keyword sets grow with it up to a cap. A finished corpus with the same (minutes, seed) is reused.
    """
    from speechssl.utils.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir).resolve()
    if num_jobs < 1:
        raise ValueError(f"num_jobs must be >= 1, got {num_jobs}")
    stamp_path = out_dir / ".mini_done.json"
    stamp = {"format_version": FORMAT_VERSION, "minutes": float(minutes), "seed": int(seed)}
    manifest = {split: out_dir / f"cuts_{split}.jsonl.gz" for split in SPLITS}
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and all(p.exists() for p in manifest.values()):
        from lhotse import CutSet

        print(f"mini corpus already prepared in {out_dir} (minutes={minutes}, seed={seed})", file=sys.stderr)
        return {split: CutSet.from_file(p) for split, p in manifest.items()}
    if stamp_path.exists():
        stamp_path.unlink()

    plan = plan_mini(minutes, seed)
    results = synthesize_specs(plan.specs, out_dir, num_jobs=num_jobs)
    from lhotse import CutSet  # imported after synthesis: the forked workers stay small

    by_id = {s.id: s for s in plan.specs}
    cuts_by_id = {cid: _make_cut(by_id[cid], out_dir, *results[cid]) for cid in by_id}
    cutsets = {}
    for split in SPLITS:
        cuts = [cuts_by_id[cid] for cid in plan.splits[split]]
        _write_manifest(manifest[split], cuts)
        cutsets[split] = CutSet.from_cuts(cuts)
    atomic_write_text(out_dir / "asv_trials.txt", "".join(f"{t} {a} {b}\n" for t, a, b in plan.trials))
    summary = _summary(cutsets)
    atomic_write_json(out_dir / "summary.json", {
        **stamp, "speakers": len(SPEAKERS), "trials": len(plan.trials),
        "splits": {s: {"cuts": len(c), "hours": round(sum(x.duration for x in c) / 3600, 4)}
                   for s, c in cutsets.items()}})
    atomic_write_json(stamp_path, stamp)
    print(f"mini corpus in {out_dir}: {len(SPEAKERS)} speakers "
          f"({len(TRAIN_SPEAKERS)} training side, {len(HELD_OUT_SPEAKERS)} held out) and {len(POOL_SPEAKERS)} "
          f"pretraining-pool voices, "
          f"{len(plan.trials)} ASV trials\n{summary}", file=sys.stderr)
    return cutsets
