"""Each corpus from a tiny fake tree in its real layout, through `speechssl prepare`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from speechssl.cli.main import main


def _wav(path: Path, seconds: float, seed: int, sr: int = 16000, fmt: str | None = None):
    from speechssl.data.synthetic import speechlike

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speechlike(int(seconds * sr), np.random.default_rng(seed), sr), sr, format=fmt)


def _load(out: Path, split: str) -> CutSet:
    return CutSet.from_file(out / f"cuts_{split}.jsonl.gz").to_eager()


def test_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech"
    for part, spk in (("dev-clean", "84"), ("test-clean", "61")):
        chap = root / part / spk / "121123"
        lines = []
        for i in range(2):
            uid = f"{spk}-121123-{i:04d}"
            _wav(chap / f"{uid}.flac", 1.0 + 0.25 * i, i, fmt="FLAC")
            lines.append(f"{uid} HELLO WORLD NUMBER {i}")
        (chap / f"{spk}-121123.trans.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["prepare", "librispeech", str(root), str(out), "--num-jobs", "1", "--check"]) == 0
    dev = _load(out, "dev-clean")
    assert len(dev) == 2 and len(_load(out, "test-clean")) == 2
    c = sorted(dev, key=lambda c: c.id)[1]
    assert c.supervisions[0].text == "HELLO WORLD NUMBER 1" and c.supervisions[0].speaker == "84"
    assert c.duration == pytest.approx(1.25)


def test_librilight_small(tmp_path):
    root = tmp_path / "librilight"
    book = root / "small" / "100" / "book_a"
    _wav(book / "chapter1.flac", 6.0, 0, fmt="FLAC")
    (book / "chapter1.json").write_text(json.dumps({"speaker": "100", "voice_activity": [[0.5, 2.5], [3.0, 5.8]]}))
    out = tmp_path / "out"
    assert main(["prepare", "librilight", str(root), str(out), "--parts", "small", "--max-segment", "2.0"]) == 0
    cuts = _load(out, "small")
    durs = sorted(round(c.duration, 2) for c in cuts)
    assert durs == [0.8, 2.0, 2.0]  # VAD segments 2.0 s and 2.8 s, the longer one split at 2 s
    assert all(c.supervisions and c.supervisions[0].speaker == "100" for c in cuts)


def test_voxceleb1(tmp_path):
    root = tmp_path / "vox1"
    meta = ["VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"]
    rel = []
    for k, (spk, split) in enumerate((("id10001", "dev"), ("id10002", "dev"), ("id10270", "test"),
                                      ("id10271", "test"))):
        meta.append(f"{spk}\tName_{k}\t{'m' if k % 2 else 'f'}\tUK\t{split}")
        for j in range(2):
            r = f"{spk}/vid{k}/{j + 1:05d}.wav"
            _wav(root / "wav" / r, 1.0, 10 * k + j)
            rel.append(r)
    (root / "vox1_meta.csv").write_text("\n".join(meta) + "\n")
    (root / "veri_test2.txt").write_text(
        "1 id10270/vid2/00001.wav id10270/vid2/00002.wav\n0 id10270/vid2/00001.wav id10271/vid3/00001.wav\n")
    (root / "iden_split.txt").write_text("\n".join(f"{1 + i % 3} {r}" for i, r in enumerate(rel)) + "\n")
    out = tmp_path / "out"
    assert main(["prepare", "voxceleb1", str(root), str(out), "--num-jobs", "1", "--check"]) == 0
    train, test = _load(out, "asv_train"), _load(out, "asv_test")
    assert {c.supervisions[0].speaker for c in train} == {"id10001", "id10002"}
    assert {c.supervisions[0].speaker for c in test} == {"id10270", "id10271"}
    trials = (out / "asv_trials.txt").read_text().split("\n")
    assert trials[0] == "1 id10270-vid2-00001 id10270-vid2-00002"
    assert trials[1].startswith("0 id10270-vid2-00001 id10271-vid3-00001")
    sid = [len(_load(out, s)) for s in ("sid_train", "sid_dev", "sid_test")]
    assert sid == [3, 3, 2]


def test_iemocap(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    emos = ["neu", "hap", "exc", "ang", "sad", "fru"]
    for n in range(1, 6):
        dialog = f"Ses0{n}F_impro01"
        evals, trans = [], []
        for i, e in enumerate(emos):
            utt = f"{dialog}_{'FM'[i % 2]}{i:03d}"
            _wav(root / f"Session{n}" / "sentences" / "wav" / dialog / f"{utt}.wav", 0.6, 100 * n + i)
            evals.append(f"[{i:.4f} - {i + 0.6:.4f}]\t{utt}\t{e}\t[2.5000, 2.5000, 2.5000]")
            trans.append(f"{utt} [{i:07.4f}-{i + 0.6:07.4f}]: Well, I'm here [LAUGHTER] now.")
        ev = root / f"Session{n}" / "dialog" / "EmoEvaluation"
        ev.mkdir(parents=True)
        (ev / f"{dialog}.txt").write_text("% header\n\n" + "\n\n".join(evals) + "\n")
        tr = root / f"Session{n}" / "dialog" / "transcriptions"
        tr.mkdir(parents=True)
        (tr / f"{dialog}.txt").write_text("\n".join(trans) + "\n")
    out = tmp_path / "out"
    assert main(["prepare", "iemocap", str(root), str(out), "--fold", "2", "--check"]) == 0
    allc = _load(out, "er_all")
    assert len(allc) == 25  # 5 sessions x 5 utterances in the 4 classes ("fru" left out)
    sup = {c.id: c.supervisions[0] for c in allc}
    s = sup["Ses01F_impro01_F002"]
    assert s.custom == {"emotion": "happy", "session": 1} and s.speaker == "Ses01F"
    assert sup["Ses01F_impro01_M001"].speaker == "Ses01M" and sup["Ses01F_impro01_M003"].custom["emotion"] == "angry"
    assert s.text == "WELL I'M HERE NOW"
    test = _load(out, "er_test")
    assert {c.supervisions[0].custom["session"] for c in test} == {2} and len(test) == 5
    n_train, n_dev = len(_load(out, "er_train")), len(_load(out, "er_dev"))
    assert n_train + n_dev == 20 and n_dev == 2
    from collections import Counter
    assert Counter(v.custom["emotion"] for v in sup.values()) == {"neutral": 5, "happy": 10, "angry": 5, "sad": 5}


def test_speechcommands_v001(tmp_path):
    root = tmp_path / "sc"
    train = root / "speech_commands_v0.01"
    files = {"yes": ["aaa_nohash_0", "bbb_nohash_0", "ccc_nohash_0"], "marvin": ["ddd_nohash_0"]}
    for w, names in files.items():
        for i, n in enumerate(names):
            _wav(train / w / f"{n}.wav", 1.0, i)
    _wav(train / "_background_noise_" / "white_noise.wav", 3.0, 7)
    _wav(train / "_background_noise_" / "running_tap.wav", 2.0, 8)
    (train / "validation_list.txt").write_text("yes/bbb_nohash_0.wav\n")
    (train / "testing_list.txt").write_text("yes/ccc_nohash_0.wav\n")
    test = root / "speech_commands_test_set_v0.01"
    _wav(test / "no" / "eee_nohash_0.wav", 1.0, 9)
    _wav(test / "_unknown_" / "bed_fff_nohash_0.wav", 1.0, 10)
    _wav(test / "_silence_" / "silence_0.wav", 1.0, 11)
    out = tmp_path / "out"
    assert main(["prepare", "speechcommands", str(root), str(out), "--check"]) == 0
    kw = lambda split: sorted(c.supervisions[0].custom["keyword"] for c in _load(out, split))
    # train: yes/aaa, marvin -> _unknown_, white noise in 3 one-second _silence_ windows
    assert kw("ks_train") == ["_silence_"] * 3 + ["_unknown_", "yes"]
    assert kw("ks_dev") == ["_silence_"] * 2 + ["yes"]  # running_tap.wav always goes to validation
    assert kw("ks_test") == ["_silence_", "_unknown_", "no"]
    yes = [c for c in _load(out, "ks_train") if c.supervisions[0].custom["keyword"] == "yes"][0]
    assert yes.supervisions[0].text == "YES"


def test_musan(tmp_path):
    root = tmp_path / "musan"
    _wav(root / "noise" / "free-sound" / "noise-free-sound-0000.wav", 2.0, 0)
    _wav(root / "noise" / "free-sound" / "noise-free-sound-0001.wav", 1.5, 1)
    out = tmp_path / "out"
    assert main(["prepare", "musan", str(root), str(out), "--parts", "noise"]) == 0
    assert sorted(c.duration for c in _load(out, "musan_noise")) == [1.5, 2.0]


def test_validate_reports_and_fails(tmp_path, capsys):
    from speechssl.data.synthetic import write_synthetic_cuts
    from speechssl.data.corpora.prepare import write_cuts

    cuts = write_synthetic_cuts(tmp_path / "a", 4, 1.0, 1.0)
    write_cuts(cuts, tmp_path / "cuts_asr_train.jsonl.gz")
    assert main(["prepare", "validate", str(tmp_path)]) == 0
    assert "asr_train" in capsys.readouterr().out
    (tmp_path / "a" / "wav" / "utt00002.wav").unlink()
    assert main(["prepare", "validate", str(tmp_path)]) == 1
    assert "utt00002" in capsys.readouterr().err
    assert main(["prepare", "validate", str(tmp_path), "--skip-bad"]) == 0
    assert len(_load(tmp_path, "asr_train")) == 3
    rep = json.loads((tmp_path / "validation.json").read_text())
    assert rep["asr_train"]["skipped"] == {"missing_file": 1}


def test_unknown_dir_is_clear_error(tmp_path, capsys):
    assert main(["prepare", "librispeech", str(tmp_path / "nope"), str(tmp_path / "o")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_prepare_mini_dispatches(tmp_path, monkeypatch):
    import speechssl.data.corpora.mini as mini

    calls = []
    monkeypatch.setattr(mini, "prepare_mini", lambda out, *, minutes=15.0, seed=0, num_jobs=2:
                        calls.append((out, minutes, seed, num_jobs)))
    assert main(["prepare", "mini", str(tmp_path / "m"), "--minutes", "0.5", "--seed", "3"]) == 0
    assert calls == [(str(tmp_path / "m"), 0.5, 3, 2)]  # a flag left out: the preparer's default
    with pytest.raises(SystemExit):
        main(["prepare", "mini", "a", "b"])


@pytest.mark.parametrize("argv, unsupported, supported", [
    (["voxceleb1", "C", "O", "--parts", "a,b"], "--parts", "--num-jobs"),
    (["musan", "C", "O", "--num-jobs", "4"], "--num-jobs", "--parts"),
    (["iemocap", "C", "O", "--version", "2", "--max-segment", "3"], "--version, --max-segment", "--fold --seed"),
    (["mini", "O", "--fold", "2"], "--fold", "--minutes --seed --num-jobs"),
    (["validate", "D", "--lexicon", "x.txt"], "--lexicon", "none"),
])
def test_unsupported_option_is_refused(tmp_path, capsys, monkeypatch, argv, unsupported, supported):
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", *argv]) == 2
    err = capsys.readouterr().err
    assert f"speechssl prepare {argv[0]}: {unsupported} does not apply to {argv[0]}; its options: {supported}" in err
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


def test_prepare_corpus_refuses_unknown_options(tmp_path):
    from speechssl.data.corpora.prepare import (
        CORPORA, UnsupportedOptionError, corpus_options, prepare_corpus, prepare_voxceleb1_cuts,
    )

    with pytest.raises(UnsupportedOptionError, match=r"corpus 'voxceleb1' does not take the option\(s\) 'parts'; "
                                                     r"its options are 'num_jobs'") as e:
        prepare_corpus("voxceleb1", tmp_path / "nope", tmp_path / "o", parts=["a"])
    assert (e.value.corpus, e.value.unsupported, e.value.supported) == ("voxceleb1", ["parts"], ["num_jobs"])
    assert corpus_options(prepare_voxceleb1_cuts) == ["num_jobs"]
    # every preparer names its options: none swallows the rest with **kwargs
    import inspect

    for name, fn in CORPORA.items():
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, name
        assert corpus_options(fn), name
    with pytest.raises(ValueError, match="unknown corpus 'timit'"):
        prepare_corpus("timit", tmp_path, tmp_path)


# ------------------------------------------------------------------------ LibriSpeech phones from a lexicon
LEXICON = """A\tAH0
A\tEY1
HELLO\tHH AH0 L OW1
HELLO\tHH EH0 L OW1
WORLD  W ER1 L D
don't\tD OW1 N T
NUMBER\tN AH1 M B ER0
"""


def _fake_librispeech(tmp_path: Path, texts: dict[str, list[str]]) -> Path:
    root = tmp_path / "LibriSpeech"
    for k, (part, utts) in enumerate(texts.items()):
        spk = str(84 + k)
        chap = root / part / spk / "121123"
        lines = []
        for i, text in enumerate(utts):
            uid = f"{spk}-121123-{i:04d}"
            _wav(chap / f"{uid}.flac", 0.5, 10 * k + i, fmt="FLAC")
            lines.append(f"{uid} {text}")
        (chap / f"{spk}-121123.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_librispeech_lexicon_phones(tmp_path, capsys):
    root = _fake_librispeech(tmp_path, {"dev-clean": ["HELLO WORLD", "A NUMBER DON'T", "HELLO ZYXX WORLD ZYXX"],
                                        "test-clean": ["WORLD A", "QWERTY"]})
    (tmp_path / "lex.txt").write_text(LEXICON)
    out = tmp_path / "out"
    assert main(["prepare", "librispeech", str(root), str(out), "--num-jobs", "1",
                 "--lexicon", str(tmp_path / "lex.txt")]) == 0
    printed = capsys.readouterr().out
    assert "dev-clean: phones for 2 of 3 cuts; 1 skipped" in printed and "ZYXX" in printed
    dev = {c.supervisions[0].text: c.supervisions[0].custom["phones"] for c in _load(out, "dev-clean")}
    # stress digits stripped, first pronunciation wins, lexicon words are case-insensitive
    assert dev == {"HELLO WORLD": "HH AH L OW W ER L D", "A NUMBER DON'T": "AH N AH M B ER D OW N T"}
    test = _load(out, "test-clean")
    assert [c.supervisions[0].custom["phones"] for c in test] == ["W ER L D AH"]
    rep = json.loads((out / "lexicon_report.json").read_text())
    assert rep["parts"]["dev-clean"] == {"cuts": 3, "skipped": 1, "oov_words": {"ZYXX": 2}}
    assert rep["parts"]["test-clean"] == {"cuts": 2, "skipped": 1, "oov_words": {"QWERTY": 1}}
    assert rep["phones"] == sorted({"HH", "AH", "L", "OW", "W", "ER", "D", "N", "M", "B", "T"})
    # the PR task reads what was written
    from speechssl.superb.train import load_examples

    ex = load_examples(str(out), "dev-clean", "phones")
    assert sorted(e.label for e in ex) == sorted(dev.values())


def test_librispeech_lexicon_keep_stress_and_oov_error(tmp_path, capsys):
    root = _fake_librispeech(tmp_path, {"dev-clean": ["HELLO WORLD", "HELLO ZYXX"]})
    (tmp_path / "lex.txt").write_text(LEXICON)
    out = tmp_path / "out"
    assert main(["prepare", "librispeech", str(root), str(out), "--num-jobs", "1", "--oov", "error",
                 "--lexicon", str(tmp_path / "lex.txt")]) == 1
    err = capsys.readouterr().err
    assert "84-121123-0001" in err and "ZYXX" in err
    assert not (out / "cuts_dev-clean.jsonl.gz").exists()
    # a second lexicon fills the gap; --keep-stress keeps the ARPAbet digits
    (tmp_path / "extra.txt").write_text("ZYXX Z IH1 K S\nHELLO HH AY1\n")
    assert main(["prepare", "librispeech", str(root), str(out), "--num-jobs", "1", "--oov", "error",
                 "--keep-stress", "--lexicon", str(tmp_path / "lex.txt"),
                 "--lexicon", str(tmp_path / "extra.txt")]) == 0
    phones = sorted(c.supervisions[0].custom["phones"] for c in _load(out, "dev-clean"))
    assert phones == ["HH AH0 L OW1 W ER1 L D", "HH AH0 L OW1 Z IH1 K S"]


def test_librispeech_lexicon_bad_input(tmp_path, capsys):
    from speechssl.data.corpora.prepare import read_lexicon

    root = _fake_librispeech(tmp_path, {"dev-clean": ["HELLO"]})
    assert main(["prepare", "librispeech", str(root), str(tmp_path / "o"),
                 "--lexicon", str(tmp_path / "nope.txt")]) == 1
    assert "nope.txt" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("HELLO HH AH0\nWORLD\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_lexicon(tmp_path / "bad.txt")
    assert main(["prepare", "voxceleb1", str(root), str(tmp_path / "o"), "--lexicon", str(tmp_path / "bad.txt")]) == 2
