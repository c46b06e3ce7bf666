"""The eSpeak NG mini corpus: splits, fields, speakers, trials, audio, prosody classes and determinism."""
from __future__ import annotations

import threading
from collections import Counter, defaultdict

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from speechssl.data.corpora import mini  # noqa: E402
from speechssl.data.corpora.espeak import ESpeakError, ESpeakNG, Prosody, get_engine  # noqa: E402
from speechssl.data.corpora.mini_text import (  # noqa: E402
    KS_CLASSES, SentenceGrammar, normalize_transcript, vocabulary,
)

MINUTES = 0.3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    cutsets = mini.prepare_mini(out, minutes=MINUTES, seed=3, num_jobs=2)
    return out, {split: list(cs) for split, cs in cutsets.items()}


def _sup(cut):
    assert len(cut.supervisions) == 1, cut.id
    return cut.supervisions[0]


def _f0_and_rms(x: np.ndarray, sr: int = 16000) -> tuple[float, float]:
    """Median autocorrelation pitch over loud frames, and RMS over the same frames."""
    f0s, rms = [], []
    for s in range(0, len(x) - 640, 320):
        fr = x[s: s + 640]
        r = float(np.sqrt(np.mean(fr ** 2)))
        if r < 0.01:
            continue
        rms.append(r)
        fr = fr - fr.mean()
        ac = np.correlate(fr, fr, "full")[639:]
        k = sr // 500 + int(np.argmax(ac[sr // 500: sr // 60]))
        if ac[k] > 0.3 * ac[0]:
            f0s.append(sr / k)
    return float(np.median(f0s)), float(np.mean(rms))


def test_all_splits_written_with_fields(corpus):
    out, cs = corpus
    for split in mini.SPLITS:
        assert (out / f"cuts_{split}.jsonl.gz").is_file(), split
        assert len(cs[split]) > 0, split
    for split, cuts in cs.items():
        for cut in cuts:
            sup = _sup(cut)
            if split.startswith("ks_") and sup.custom["keyword"] == "_silence_":
                assert sup.text == "" and sup.speaker is None
                continue
            assert sup.speaker in {s.id for s in mini.SPEAKERS + mini.POOL_SPEAKERS}
            assert sup.text and sup.text == normalize_transcript(sup.text) and sup.text.upper() == sup.text
            phones = sup.custom["phones"].split()
            assert len(phones) >= 2, cut.id  # even "go" has two phones
            assert not any(ch in sup.custom["phones"] for ch in "ˈˌ"), "stress marks must be stripped"
            if split.startswith("er_"):
                assert sup.custom["emotion"] in mini.EMOTIONS
                assert 1 <= sup.custom["session"] <= 5
            if split.startswith("ks_"):
                assert sup.custom["keyword"] in KS_CLASSES
    # The manifests on disk are the ones returned.
    from lhotse import CutSet

    assert [c.id for c in CutSet.from_file(out / "cuts_asr_dev.jsonl.gz")] == [c.id for c in cs["asr_dev"]]


def test_speakers_and_split_design(corpus):
    _, cs = corpus
    spk = {split: {_sup(c).speaker for c in cuts} - {None} for split, cuts in cs.items()}
    assert len(set().union(*spk.values())) >= 16
    # the pretraining pool: training-side and pool-only voices, never a held-out (test) speaker
    assert spk["pretrain"] == {s.id for s in mini.TRAIN_SPEAKERS + mini.POOL_SPEAKERS}
    assert not spk["pretrain"] & {s.id for s in mini.HELD_OUT_SPEAKERS}
    assert spk["sid_train"] == spk["sid_dev"] == spk["sid_test"] and len(spk["sid_train"]) >= 16
    assert spk["asr_test"] - spk["asr_train"], "some ASR test speakers must be unseen in training"
    assert spk["asr_test"] & spk["asr_train"], "ASR test also covers seen speakers"
    assert not spk["asv_test"] & spk["asv_train"]
    assert not spk["ks_test"] & spk["ks_train"] and not spk["ks_dev"] & spk["ks_train"]
    # Every transcript is used once: no test sentence was seen in training.
    text = {split: [_sup(c).text for c in cuts] for split, cuts in cs.items()}
    assert len(set(text["asr_train"])) == len(text["asr_train"])
    assert not set(text["asr_train"]) & (set(text["asr_dev"]) | set(text["asr_test"]))
    assert not set(text["sid_train"]) & set(text["sid_test"])
    # ER follows the IEMOCAP session protocol: sessions 1-3 train, 4 dev, 5 test.
    sessions = {split: {_sup(c).custom["session"] for c in cs[split]} for split in ("er_train", "er_dev", "er_test")}
    assert sessions == {"er_train": {1, 2, 3}, "er_dev": {4}, "er_test": {5}}
    # Pretraining never sees evaluation audio.
    evaluation = {c.id for s in ("asr_dev", "asr_test", "er_dev", "er_test", "ks_dev", "ks_test", "asv_test")
                  for c in cs[s]}
    assert not {c.id for c in cs["pretrain"]} & evaluation
    # The pool is its own audio: no cut or transcript of a labelled split, and half of it reverberant.
    labelled = {c.id for s, cuts in cs.items() if s != "pretrain" for c in cuts}
    assert not {c.id for c in cs["pretrain"]} & labelled
    assert not set(text["pretrain"]) & {t for s, ts in text.items() if s != "pretrain" for t in ts}
    rooms = [_sup(c).custom.get("rt60", 0.0) for c in cs["pretrain"]]
    assert 0.25 < np.mean([r > 0 for r in rooms]) < 0.75 and all(r == 0 or 0.15 <= r <= 0.6 for r in rooms)


def test_asv_trials_balanced_and_over_held_out_speakers(corpus):
    out, cs = corpus
    speaker = {c.id: _sup(c).speaker for c in cs["asv_test"]}
    train_speakers = {_sup(c).speaker for c in cs["asv_train"]}
    lines = [line.split() for line in (out / "asv_trials.txt").read_text().splitlines()]
    assert lines and all(len(t) == 3 and t[0] in ("0", "1") for t in lines)
    labels = Counter(t[0] for t in lines)
    assert labels["1"] == labels["0"] >= 8
    for label, a, b in lines:
        assert a in speaker and b in speaker and a != b
        assert (speaker[a] == speaker[b]) == (label == "1")
        assert speaker[a] not in train_speakers and speaker[b] not in train_speakers


def test_audio_durations_and_sample_rate(corpus):
    out, cs = corpus
    for split in ("asr_train", "ks_dev", "er_test", "asv_test"):
        for cut in cs[split][:12]:
            path = cut.recording.sources[0].source
            info = sf.info(path)
            assert info.samplerate == cut.sampling_rate == 16000
            assert info.frames == cut.num_samples == cut.recording.num_samples
            assert abs(cut.duration - info.frames / 16000) < 1e-6
            audio = cut.load_audio()
            assert audio.shape == (1, info.frames)
            assert 0.005 < float(np.sqrt(np.mean(audio ** 2))) < 0.5, cut.id
    sent = [c.duration for c in cs["asr_train"] + cs["asr_test"]]
    assert 1.0 < min(sent) and max(sent) < 7.0 and 1.8 < float(np.mean(sent)) < 4.5
    ks = [c.duration for s in ("ks_train", "ks_dev", "ks_test") for c in cs[s]]
    assert sum(abs(d - 1.0) < 1e-6 for d in ks) >= 0.9 * len(ks) and max(ks) < 1.6


def test_keyword_classes_complete_and_balanced(corpus):
    _, cs = corpus
    for split in ("ks_train", "ks_dev", "ks_test"):
        counts = Counter(_sup(c).custom["keyword"] for c in cs[split])
        assert set(counts) == set(KS_CLASSES), split
        assert len(set(counts.values())) == 1, counts
    words = {_sup(c).text for c in cs["ks_train"] if _sup(c).custom["keyword"] == "yes"}
    assert words == {"YES"}


def test_emotion_classes_differ_in_pitch_and_energy(corpus):
    _, cs = corpus
    by_class: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for cut in cs["er_train"] + cs["er_dev"] + cs["er_test"]:
        f0, rms = _f0_and_rms(cut.load_audio()[0])
        by_class[_sup(cut).custom["emotion"]].append((f0, rms, cut.duration))
    mean = {e: np.mean(np.array(v), axis=0) for e, v in by_class.items()}
    assert set(mean) == set(mini.EMOTIONS) and len({len(v) for v in by_class.values()}) == 1
    f0, rms = {e: m[0] for e, m in mean.items()}, {e: m[1] for e, m in mean.items()}
    assert f0["happy"] > 1.1 * f0["neutral"] and f0["sad"] < 0.92 * f0["neutral"]
    assert rms["angry"] > 1.2 * rms["neutral"] and rms["sad"] < 0.75 * rms["neutral"]
    # Duration alone does not give the class away: every class's duration range overlaps every other's.
    dur = {e: (min(x[2] for x in v), max(x[2] for x in v)) for e, v in by_class.items()}
    for a in dur:
        for b in dur:
            assert dur[a][0] < dur[b][1], (a, b, dur)


def test_deterministic_for_a_seed_and_job_count(corpus, tmp_path):
    out, cs = corpus
    plan = mini.plan_mini(MINUTES, seed=3)
    assert plan == mini.plan_mini(MINUTES, seed=3)
    assert plan.specs != mini.plan_mini(MINUTES, seed=4).specs
    ids = [c.id for split in mini.SPLITS for c in cs[split]]
    assert ids == [cid for split in mini.SPLITS for cid in plan.splits[split]]
    # Re-render a sample of every kind with 1 job, in another order, and compare bytes with the 2-job files.
    by_kind = defaultdict(list)
    for spec in plan.specs:
        by_kind[(spec.kind, spec.id.split("-")[1], spec.keyword == "_unknown_")].append(spec)
    sample = [s for specs in by_kind.values() for s in specs[:3]][::-1]
    again = mini.synthesize_specs(sample, tmp_path, num_jobs=1, progress=False)
    phones = {c.id: _sup(c).custom.get("phones", "") for split in mini.SPLITS for c in cs[split]}
    for spec in sample:
        assert (tmp_path / spec.path).read_bytes() == (out / spec.path).read_bytes(), spec.id
        assert again[spec.id][1] == phones[spec.id]
    # A finished corpus is reused, byte for byte the same manifests.
    before = (out / "cuts_pretrain.jsonl.gz").read_bytes()
    reused = mini.prepare_mini(out, minutes=MINUTES, seed=3, num_jobs=1)
    assert [c.id for c in reused["pretrain"]] == [c.id for c in cs["pretrain"]]
    assert (out / "cuts_pretrain.jsonl.gz").read_bytes() == before


def test_bad_arguments():
    with pytest.raises(ValueError, match="minutes"):
        mini.plan_mini(0.0)
    with pytest.raises(ValueError, match="num_jobs"):
        mini.prepare_mini("/nonexistent/never", minutes=1.0, num_jobs=0)


def test_transcript_normalisation_and_grammar():
    assert normalize_transcript("'Hello,' said John's dog -- didn't it?") == "HELLO SAID JOHN'S DOG DIDN'T IT"
    assert normalize_transcript("  the  cat\tsat. ") == "THE CAT SAT"
    g = SentenceGrammar(np.random.default_rng(0))
    sents = [normalize_transcript(s) for s in g.unique_sentences(300)]
    assert len(set(sents)) == 300
    lengths = [len(s.split()) for s in sents]
    assert min(lengths) >= 3 and max(lengths) <= 14 and 5 <= np.mean(lengths) <= 9
    vocab = vocabulary()
    assert 300 <= len(vocab) and {w for s in sents for w in s.split()} <= vocab


def test_espeak_wrapper():
    engine = get_engine()
    assert engine is get_engine() and engine.sample_rate == 22050
    wav = engine.synthesize("stop the train", "en-us+f2", Prosody(rate=200), seed=1)
    assert wav.dtype == np.int16 and 0.4 * 22050 < wav.size < 2.5 * 22050
    # In one process eSpeak carries wave-generator state over (hence the per-utterance fork in the corpus):
    # a repeat is the same speech up to a few pitch periods.
    again = engine.synthesize("stop the train", "en-us+f2", Prosody(rate=200), seed=1)
    assert abs(again.size - wav.size) < 0.03 * wav.size
    assert engine.synth_calls >= 2
    slow = engine.synthesize("stop the train", "en-us+f2", Prosody(rate=100), seed=1)
    assert slow.size > 1.5 * wav.size
    assert engine.phonemize("stop, the cat!", "en-us") == [["s", "t", "ɑː", "p"], ["ð", "ə"], ["k", "æ", "t"]]
    assert engine.phonemize("go", "en")[0][0] == "ɡ"
    with pytest.raises(ESpeakError, match="unknown eSpeak NG voice"):
        engine.synthesize("hello", "xx-nonexistent+f9")
    with pytest.raises(ValueError, match="empty"):
        engine.synthesize("   ", "en-us")
    errors = []
    t = threading.Thread(target=lambda: errors.append(_call_or_error(engine)))
    t.start()
    t.join()
    assert errors and isinstance(errors[0], ESpeakError) and "thread" in str(errors[0])
    assert isinstance(engine, ESpeakNG)


def _call_or_error(engine):
    try:
        engine.synthesize("hello", "en-us")
    except ESpeakError as e:
        return e
    return None


def test_espeak_server_is_bit_exact():
    from speechssl.data.corpora.espeak import ESpeakServer

    p = Prosody(rate=190, pitch=60, pitch_range=70, volume=90)
    with ESpeakServer() as server:
        a, sr, words = server.speak("the old farmer sold a basket.", "en+f3", p, seed=7, phone_text="the old farmer")
        server.speak("something else entirely?", "en-us+m2", Prosody(rate=120), seed=1)
        b, _, _ = server.speak("the old farmer sold a basket.", "en+f3", p, seed=7)
        with pytest.raises(ESpeakError, match="unknown eSpeak NG voice"):
            server.speak("hello", "xx-nonexistent")
        c, _, _ = server.speak("the old farmer sold a basket.", "en+f3", p, seed=7)  # still serving
    assert sr == 22050 and a.dtype == np.int16 and a.size > 22050
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert words == [["ð", "ɪ"], ["əʊ", "l", "d"], ["f", "ɑː", "m", "ə"]]  # "the" before a vowel
