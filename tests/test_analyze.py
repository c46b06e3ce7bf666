"""Layer analysis: unit quality by hand, linear probes on informative and uninformative states, the speaker
split, analyze_layer on synthetic utterances, and `speechssl analyze` end to end on tone "phones"."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from speechssl.analysis import analyze_layer, best_layer, chance_accuracy, probe_accuracy, unit_quality
from speechssl.analysis.layers import AnalyzeSettings
from speechssl.analysis.states import Utterance, split_by_speaker

# tiny probes and models: per-op overhead dominates, and a second OpenMP thread only adds waits on a busy machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_unit_quality_by_hand():
    """Counts (phone, unit): (0,0) x3, (0,1) x1, (1,1) x2, (2,1) x2, plus padding pairs that must not count.
    Phone purity sum_u max_p P = 3/8 + 2/8; cluster purity sum_p max_u P = 3/8 + 2/8 + 2/8;
    PNMI = I / H(phone) with I = 3/8 ln 2 + 1/8 ln 0.4 + 2 * 2/8 ln 1.6 and H(phone) = 1.5 ln 2."""
    phones = np.array([0, 0, 0, 0, 1, 1, 2, 2, -1, 1])
    units = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, -100])
    q = unit_quality(units, phones)
    assert q["phone_purity"] == pytest.approx(5 / 8)
    assert q["cluster_purity"] == pytest.approx(7 / 8)
    mi = 3 / 8 * math.log(2) + 1 / 8 * math.log(0.4) + 0.5 * math.log(1.6)
    assert q["pnmi"] == pytest.approx(mi / (1.5 * math.log(2)))
    # one unit per phone: everything is 1; one unit for everything: PNMI 0, phone purity = the majority share
    assert unit_quality(phones[:8], phones[:8]) == pytest.approx({"pnmi": 1.0, "phone_purity": 1.0,
                                                                  "cluster_purity": 1.0})
    flat = unit_quality(np.zeros(8, dtype=int), phones[:8])
    assert flat["pnmi"] == pytest.approx(0.0) and flat["phone_purity"] == pytest.approx(0.5)


def _phones(n: int, rng) -> np.ndarray:
    return rng.choice(6, size=n, p=[0.3, 0.25, 0.15, 0.12, 0.1, 0.08])


def test_phone_probe_reads_a_one_hot_and_not_noise():
    rng = np.random.default_rng(0)
    y_tr, y_te = _phones(3000, rng), _phones(1000, rng)
    onehot = lambda y: np.eye(16, dtype=np.float32)[y] + 0.3 * rng.standard_normal((len(y), 16)).astype(np.float32)  # noqa: E731
    chance = chance_accuracy(y_tr, y_te)
    assert 0.25 < chance < 0.35  # the most frequent phone's share
    assert probe_accuracy(onehot(y_tr), y_tr, onehot(y_te), y_te) > chance + 0.5
    noise_tr = rng.standard_normal((3000, 16)).astype(np.float32)
    noise_te = rng.standard_normal((1000, 16)).astype(np.float32)
    assert probe_accuracy(noise_tr, y_tr, noise_te, y_te) < chance + 0.04


def test_split_by_speaker_holds_out_some_of_every_speaker():
    from types import SimpleNamespace

    def cut(i, spk):
        sup = SimpleNamespace(speaker=spk, text=None, custom=None)
        return SimpleNamespace(id=f"{spk}-{i}", supervisions=[sup])

    cuts = [cut(i, s) for s in ("a", "b", "c") for i in range(8)] + [cut(0, "lonely")]
    train, held = split_by_speaker(cuts, 0.25, seed=0)
    assert len(train) + len(held) == len(cuts)
    for s in ("a", "b", "c"):
        assert sum(c.id.startswith(s) for c in held) == 2 and sum(c.id.startswith(s) for c in train) == 6
    assert [c.id for c in held if c.id.startswith("lonely")] == []
    again = split_by_speaker(list(reversed(cuts)), 0.25, seed=0)[1]
    assert sorted(c.id for c in again) == sorted(c.id for c in held)  # depends on ids and seed, not order
    assert sorted(c.id for c in split_by_speaker(cuts, 0.25, seed=1)[1]) != sorted(c.id for c in held)


def _utterances(n: int, rng, speakers=("s0", "s1", "s2", "s3")) -> list[Utterance]:
    """Hidden state 0 is noise; state 1 is a noisy one-hot of the frame's phone plus a speaker offset."""
    out = []
    for i in range(n):
        spk = speakers[i % len(speakers)]
        phones = _phones(40, rng)
        phones[:3] = -1  # unlabelled frames
        informative = np.eye(16, dtype=np.float32)[np.clip(phones, 0, None)]
        informative[:, 8 + speakers.index(spk)] += 1.0
        states = np.stack([rng.standard_normal((40, 16)), informative + 0.2 * rng.standard_normal((40, 16))])
        out.append(Utterance(f"u{i}", torch.from_numpy(states.astype(np.float32)), phones, spk))
    return out


def test_analyze_layer_separates_an_informative_layer_from_noise():
    rng = np.random.default_rng(1)
    train, held = _utterances(48, rng), _utterances(16, rng)
    s = AnalyzeSettings(n_clusters=24, max_frames=5000)  # a unit per (phone, speaker): the offsets are as large
    noise, info = analyze_layer(train, held, 0, s), analyze_layer(train, held, 1, s)
    assert info["phone_acc"] > 0.9 and noise["phone_acc"] < 0.36
    assert info["speaker_acc"] > 0.9 and noise["speaker_acc"] < 0.6  # 4 speakers: chance 0.25
    assert info["pnmi"] > 0.6 and noise["pnmi"] < 0.15
    assert info["phone_purity"] > noise["phone_purity"] + 0.3
    report = {"models": [{"name": "m", "reference": False}],
              "table": [{"model": "m", "layer": 0, **noise}, {"model": "m", "layer": 1, **info}]}
    assert best_layer(report, "pnmi") == 1 and best_layer(report, "phone_acc") == 1


TONES = (300.0, 700.0, 1300.0, 2200.0)  # one pure tone per "phone"


def _tone_corpus(tmp_path, n_speakers=3, per_speaker=6):
    """Cuts of 1 s made of 100 ms tone "phones" (p0..p3) plus a little noise, with a phone alignment and a
    speaker; each speaker raises every tone by its own factor (a "voice")."""
    import soundfile as sf
    from lhotse import CutSet, Recording
    from lhotse.supervision import AlignmentItem, SupervisionSegment

    rng = np.random.default_rng(0)
    cuts, t = [], np.arange(1600) / 16000
    for s in range(n_speakers):
        for i in range(per_speaker):
            seq = rng.integers(0, len(TONES), size=10)
            wav = 0.3 * np.concatenate([np.sin(2 * np.pi * TONES[p] * (1 + 0.12 * s) * t) for p in seq])
            wav = (wav + 0.01 * rng.standard_normal(wav.size)).astype(np.float32)
            path = tmp_path / f"s{s}_{i}.wav"
            sf.write(path, wav, 16000)
            cut = Recording.from_file(path, recording_id=f"s{s}_{i}").to_cut()
            ali = [AlignmentItem(f"p{p}", j * 0.1, 0.1) for j, p in enumerate(seq)]
            cut.supervisions = [SupervisionSegment(id=cut.id, recording_id=cut.id, start=0, duration=1.0,
                                                   speaker=f"spk{s}", alignment={"phone": ali})]
            cuts.append(cut)
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def test_cli_writes_one_entry_per_model_and_layer(tmp_path, capsys):
    from speechssl.cli.main import main
    from speechssl.models.presets import get_preset

    cuts = _tone_corpus(tmp_path)
    out = tmp_path / "an"
    argv = ["analyze", "--model", "random:tiny_hubert", "--model", "fbank", "--cuts", str(cuts), "--out", str(out),
            "--n-clusters", "12", "--seeds", "0,1", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "analysis.json").read_text())
    states = get_preset("tiny_hubert").num_layers + 1
    keys = [(e["model"], e["layer"]) for e in report["table"]]
    assert keys == [("random_tiny_hubert", i) for i in range(states)] + [("fbank", 0)]
    assert len(report["rows"]) == 2 * len(keys) and all(e["seeds"] == 2 for e in report["table"])
    assert (out / "analysis.png").stat().st_size > 10_000 and (out / "analysis.md").is_file()
    assert [m["reference"] for m in report["models"]] == [False, True]
    # tones are linearly separable: with the phones aligned right, the probes and the units find them
    chance = report["models"][0]["chance"]
    assert 0.2 < chance["phone_acc"] < 0.45 and chance["speaker_acc"] == pytest.approx(1 / 3)
    for e in report["table"]:
        assert e["phone_acc"] > chance["phone_acc"] + 0.5, e
    enc = [e for e in report["table"] if e["model"] == "random_tiny_hubert"]
    assert all(e["speaker_acc"] > 0.8 and e["pnmi"] > 0.6 for e in enc), enc
    assert report["table"][-1]["speaker_acc"] is None  # FBANK: CMVN leaves no utterance mean to probe
    assert report["cuts_used"] == {"train": 12, "held_out": 6}
    capsys.readouterr()
    assert main(argv[:-1] + ["--select", "pnmi", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(report["best"]["pnmi"]["random_tiny_hubert"])


def test_cli_names_a_bad_layer_and_a_missing_model(tmp_path, capsys):
    from speechssl.cli.main import main

    cuts = _tone_corpus(tmp_path, n_speakers=2, per_speaker=2)
    base = ["analyze", "--cuts", str(cuts), "--out", str(tmp_path / "an"), "--no-progress", "--n-clusters", "2"]
    assert main(base + ["--model", "random:tiny_hubert", "--layers", "0,9"]) == 2
    assert "settings.layers [9]" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err


def test_eval_cuts_subsets_and_layers(tmp_path):
    """Explicit held-out cuts (one of a speaker the probe never saw), --max-utts and --layers."""
    from lhotse import CutSet

    from speechssl.analysis import AnalyzeSettings, analyze

    cuts = list(CutSet.from_file(_tone_corpus(tmp_path)))
    train = [c for c in cuts if not c.id.endswith(("_4", "_5"))]
    held = [c for c in cuts if c.id.endswith(("_4", "_5"))]
    held[0].supervisions[0].speaker = "stranger"
    CutSet.from_cuts(train).to_file(tmp_path / "train.jsonl.gz")
    CutSet.from_cuts(held).to_file(tmp_path / "held.jsonl.gz")
    s = AnalyzeSettings(n_clusters=4, max_utts=9, layers=[0, 2], progress=False)
    report = analyze(["random:tiny_hubert"], str(tmp_path / "train.jsonl.gz"), str(tmp_path / "held.jsonl.gz"), s)
    assert report["cuts_used"] == {"train": 9, "held_out": 6}
    assert [e["layer"] for e in report["table"]] == [0, 2]
    # the stranger's utterance is not a speaker-probe test item: chance is over the 5 others
    c = report["models"][0]["chance"]["speaker_acc"]
    assert abs(c * 5 - round(c * 5)) < 1e-9 and abs(c * 6 - round(c * 6)) > 1e-6
