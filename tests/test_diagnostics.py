"""Collapse diagnostics: effective rank, temporal std, unit prior, PNMI / purity, the monitor's warnings, phone
frame labels from a Lhotse alignment, and a tiny pretraining run that logs them to metrics.jsonl."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from speechssl.train.diagnostics import (
    CollapseMonitor, effective_rank, layer_diagnostics, pnmi, purity, temporal_std, unit_statistics,
)

# tiny matrices: a second OpenMP thread only waits on a busy 2-core machine (LAPACK spins)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_effective_rank_of_random_and_low_rank_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 64, generator=g)
    assert 0.9 * 64 < effective_rank(x) <= 64
    low = torch.randn(2000, 3, generator=g) @ torch.randn(3, 64, generator=g)
    assert 2.5 < effective_rank(low) < 3.05
    assert effective_rank(torch.ones(100, 64)) == pytest.approx(1.0, abs=1e-3)
    # [B, T, D] with lengths: only valid frames count (padding filled with a different random direction)
    h = torch.zeros(2, 10, 8)
    h[:, :6] = torch.randn(8, generator=g)
    h[1, 6:] = torch.randn(4, 8, generator=g)
    assert effective_rank(h, torch.tensor([6, 6])) == pytest.approx(1.0, abs=1e-3)


def test_temporal_std():
    g = torch.Generator().manual_seed(1)
    const = torch.randn(3, 1, 16, generator=g).expand(3, 20, 16)  # a vector per utterance, constant in time
    assert temporal_std(const, torch.tensor([20, 12, 5])) == pytest.approx(0.0, abs=1e-12)
    x = torch.randn(3, 4000, 16, generator=g)
    assert temporal_std(x, torch.tensor([4000, 4000, 4000])) == pytest.approx(1.0, abs=0.03)
    # padding frames (here huge) do not count; one-frame utterances are left out
    x[:, 100:] = 1e3
    assert temporal_std(x, torch.tensor([100, 100, 1])) == pytest.approx(1.0, abs=0.15)
    assert math.isnan(temporal_std(x, torch.tensor([1, 1, 0])))


def test_unit_statistics():
    s = unit_statistics(np.array([3, 3, 3, 1, -100, -100]))  # padding left out
    assert s["prior_acc"] == pytest.approx(0.75) and s["used_units"] == 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s["prior_entropy"] == pytest.approx(h) and s["perplexity"] == pytest.approx(math.exp(h))
    assert unit_statistics(np.arange(8))["prior_entropy"] == pytest.approx(math.log(8))


def test_pnmi_and_purity():
    rng = np.random.default_rng(0)
    phones = rng.integers(0, 30, 5000)
    assert pnmi(phones, phones) == pytest.approx(1.0)
    assert pnmi((phones * 7 + 3) % 31, phones) == pytest.approx(1.0)  # any relabelling of the phones
    assert purity(phones, phones) == pytest.approx((1.0, 1.0))
    assert pnmi(rng.integers(0, 50, 200_000), rng.integers(0, 30, 200_000)) < 0.01
    # hand-checked: P(p, u) = {(0, 0): 1/2, (0, 1): 1/4, (1, 1): 1/4}
    units, ph = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    h_phone = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = (0.5 * math.log(0.5 / (0.75 * 0.5)) + 0.25 * math.log(0.25 / (0.75 * 0.5))
          + 0.25 * math.log(0.25 / (0.25 * 0.5)))
    assert pnmi(units, ph) == pytest.approx(mi / h_phone)  # 0.3837
    assert purity(units, ph) == pytest.approx((0.5 + 0.25, 0.5 + 0.25))  # max_p per unit; max_u per phone
    # padding on either side is left out; one phone only: undefined
    assert pnmi(np.array([0, 0, 1, 1, 5]), np.array([0, 0, 0, 1, -1])) == pytest.approx(mi / h_phone)
    assert math.isnan(pnmi(np.array([0, 1]), np.array([2, 2])))
    with pytest.raises(ValueError, match="aligned"):
        pnmi(np.arange(3), np.arange(4))


def _record(tstd, erank, **extra):
    rec = {f"layer{i}_tstd": t for i, t in enumerate(tstd)}
    rec.update({f"layer{i}_erank": r for i, r in enumerate(erank)})
    rec.update(extra)
    return rec


def test_monitor_warns_on_collapse_and_a_loss_at_the_prior():
    healthy = _record([0.92, 0.8, 0.7, 0.6, 0.5], [141, 120, 90, 60, 40], diag_loss_masked=3.2,
                      units_prior_entropy=4.49)
    m = CollapseMonitor()
    for _ in range(5):
        assert m.update(healthy) == []
    w = CollapseMonitor().update(_record([0.92, 0.8, 0.5, 0.01, 0.0003], [141, 120, 90, 20, 3]))
    assert "layer 4 collapsed: temporal std 0.0003 < 0.01 x layer 0's (0.92)" in w
    assert "effective rank of layer 4 fell to 3 (layer 0: 141)" in w
    assert not any("layer 3" in x for x in w) and len(w) == 2
    # a dead CNN: layer 0 itself is constant
    assert any("layer 0 collapsed" in x for x in CollapseMonitor().update(_record([1e-7, 1e-7], [1, 1])))
    # the loss stuck at the prior: warned once it has stayed there for `patience` evaluations
    m = CollapseMonitor(patience=3, loss_tolerance=0.02)
    stuck = _record([0.9, 0.8], [50, 40], diag_loss_masked=4.48, units_prior_entropy=4.49)
    assert m.update(stuck) == [] and m.update(stuck) == []
    w = m.update(stuck)
    assert w == ["masked loss 4.48 has stayed within 2% of the unit prior entropy 4.49 for 3 evaluations: "
                 "the model predicts the label prior only"]
    assert m.update(healthy) == [] and m.update(stuck) == []  # the streak restarts
    # a dead model's loss sits a little above the prior (its predictions are near the prior, not equal to it)
    above = dict(stuck, diag_loss_masked=3.85, units_prior_entropy=3.71)
    m = CollapseMonitor(patience=2)
    assert m.update(above) == [] and m.update(above) == [
        "masked loss 3.85 has stayed above the unit prior entropy 3.71 for 2 evaluations: the model predicts the "
        "label prior only"]
    assert CollapseMonitor(patience=1).update(dict(stuck, diag_loss_masked=4.43)) == []  # 1.3% below: learning


def test_layer_diagnostics_on_an_encoder():
    from conftest import make_wav

    from speechssl.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", num_layers=2, hidden_size=32, num_heads=2, ffn_dim=64, conv_pos=16,
                        conv_pos_groups=4, conv_layers=[[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2)
    enc.train()
    wav = torch.from_numpy(np.stack([make_wav(16000, seed=0), make_wav(16000, seed=1)]))
    rec = layer_diagnostics(enc, {"audio": wav, "audio_lens": torch.tensor([16000, 8000])})
    assert enc.training  # mode restored
    assert sorted(rec) == sorted(f"layer{i}_{k}" for i in range(3) for k in ("tstd", "erank"))
    assert all(rec[f"layer{i}_tstd"] > 0.05 and 2 < rec[f"layer{i}_erank"] <= 32 for i in range(3)), rec


def test_phone_frame_labels_from_an_alignment(tmp_path):
    from lhotse import AudioSource, Recording, SupervisionSegment
    from lhotse.cut import MonoCut
    from lhotse.supervision import AlignmentItem

    from speechssl.data.labels import alignment_frame_labels, has_alignment

    rec = Recording(id="r", sources=[AudioSource(type="file", channels=[0], source="/x.wav")], sampling_rate=16000,
                    num_samples=16000, duration=1.0)
    ali = [AlignmentItem("sil", 0.0, 0.1), AlignmentItem("k", 0.1, 0.05), AlignmentItem("æ", 0.15, 0.15),
           AlignmentItem("t", 0.3, 0.1)]
    sup = SupervisionSegment(id="r", recording_id="r", start=0.0, duration=1.0, alignment={"phone": ali})
    cut = MonoCut(id="r", start=0.0, duration=1.0, channel=0, supervisions=[sup], recording=rec)
    lab = alignment_frame_labels(cut, 25, frame_rate=50)  # frame centres 0.01, 0.03, ...
    assert lab[:5] == ["sil"] * 5 and lab[5:8] == ["k", "k", "æ"] and lab[8:15] == ["æ"] * 7
    assert lab[15:20] == ["t"] * 5 and lab[20:] == [None] * 5
    assert alignment_frame_labels(cut, 3, frame_rate=50, gap="sil")[0] == "sil"
    # a truncated cut: the items stay on the recording's time axis, frames count from the new start
    late = cut.truncate(offset=0.1, duration=0.5)
    assert alignment_frame_labels(late, 4, frame_rate=50)[:4] == ["k", "k", "æ", "æ"]
    assert has_alignment(cut) and not has_alignment(cut.drop_alignments())
    with pytest.raises(KeyError, match="no 'phone' alignment"):
        alignment_frame_labels(cut.drop_alignments(), 3)


def test_label_statistics_with_a_synthetic_alignment(tmp_path):
    """PNMI of units equal to the phones is 1 on cuts that carry a phone alignment."""
    from lhotse import NumpyFilesWriter, Recording
    from lhotse.supervision import AlignmentItem, SupervisionSegment

    import soundfile as sf
    from conftest import make_wav

    from speechssl.data.labels import store_units
    from speechssl.train.diagnostics import label_statistics

    cuts = []
    with NumpyFilesWriter(str(tmp_path / "u")) as w:
        for i in range(3):
            sf.write(tmp_path / f"u{i}.wav", make_wav(16000, seed=i), 16000)
            cut = Recording.from_file(tmp_path / f"u{i}.wav", recording_id=f"u{i}").to_cut()
            units = (np.arange(50) // 5 + i) % 4  # 100 ms phones, ids shifted per cut
            ali = [AlignmentItem(f"p{u}", j * 0.1, 0.1) for j, u in enumerate(units[::5])]
            cut.supervisions = [SupervisionSegment(id=f"u{i}", recording_id=f"u{i}", start=0, duration=1.0,
                                                   alignment={"phone": ali})]
            cuts.append(store_units(cut, units.astype(np.int64), w, "l6", 0.02))
    st = label_statistics(cuts, ["l6"])
    assert st["units_l6_pnmi"] == pytest.approx(1.0) and st["units_l6_cluster_purity"] == pytest.approx(1.0)
    assert st["units_l6_used_units"] == 4 and st["units_prior_entropy"] == pytest.approx(math.log(4), abs=0.01)


def test_pretrain_logs_diagnostics(tmp_path):
    """A 2-step HuBERT run with trainer.eval_every=1 and no data.valid: layer keys, unit prior and the objective's
    numbers on the fixed batch land in metrics.jsonl; report draws the diagnostics PNG."""
    import soundfile as sf
    from conftest import make_wav
    from lhotse import CutSet, NumpyFilesWriter, Recording

    from speechssl.config import from_dict
    from speechssl.data.labels import store_units
    from speechssl.train.plots import plot_diagnostics, read_warnings
    from speechssl.train.pretrain import PretrainConfig, run_pretrain

    cuts = []
    with NumpyFilesWriter(str(tmp_path / "units")) as w:
        for i in range(4):
            n = 16000 + 3200 * i
            sf.write(tmp_path / f"utt{i}.wav", make_wav(n, seed=i), 16000)
            cut = Recording.from_file(tmp_path / f"utt{i}.wav", recording_id=f"utt{i}").to_cut()
            cuts.append(store_units(cut, (np.arange(n // 320) // 3 % 5).astype(np.int64), w, "l6", 0.02))
    CutSet.from_cuts(cuts).to_file(tmp_path / "cuts.jsonl.gz")
    small = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "ffn_dim": 64, "conv_pos": 16,
             "conv_pos_groups": 4, "conv_layers": [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2}
    cfg = from_dict(PretrainConfig, {
        "data": {"train": [str(tmp_path / "cuts.jsonl.gz")], "max_duration": 4.0, "units": ["l6"], "num_buckets": 2},
        "model": {"preset": "tiny_hubert", "overrides": small},
        "objective": {"name": "hubert", "kwargs": {"num_classes": {"l6": 5}, "final_dim": 16}},
        "schedule": {"warmup_steps": 1},
        "trainer": {"max_steps": 2, "log_every": 1, "eval_every": 1, "ckpt_every": 100, "ckpt_at_end": False,
                    "num_workers": 0, "progress": False},
        "diagnostics": {"num_cuts": 3, "max_seconds": 1.5, "tstd_min": 10.0},  # tstd_min: force a warning
    })
    out = tmp_path / "exp"
    run_pretrain(cfg, out)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in recs if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [1, 2]
    for r in valid:
        for i in range(3):
            assert r[f"layer{i}_tstd"] > 0 and r[f"layer{i}_erank"] >= 1
        assert r["units_prior_entropy"] == pytest.approx(math.log(5), abs=0.05)
        assert 0.2 <= r["units_prior_acc"] <= 0.25 and "diag_acc_masked" in r and "diag_loss_masked" in r
        assert r["collapse_warnings"] >= 3  # every layer's std is below 10
    warned = read_warnings(out)
    assert [s for s, _ in warned] == [1, 2] and "temporal std" in warned[0][1][0]
    png = plot_diagnostics(out, tmp_path / "diag.png")
    assert png is not None and png.stat().st_size > 1000
    # the diagnostics leave the training streams alone: same train losses without them
    cfg.diagnostics.enabled = False
    run_pretrain(cfg, tmp_path / "plain")
    plain = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in plain] == [r["loss"] for r in recs if r["split"] == "train"]
    # the same masks at every evaluation (numbers move only when the model does), global RNG untouched
    from speechssl.train.pretrain import _diagnostics, build_model

    model = build_model(cfg)
    diag = _diagnostics(cfg, model.encoder, tmp_path / "d.jsonl")
    rng = torch.get_rng_state()
    a, b = diag(model, 1), diag(model, 2)
    assert a == b and torch.equal(rng, torch.get_rng_state())


def test_mini_corpus_phone_alignment_matches_the_audio():
    """eSpeak's phoneme events give each speech cut of the mini corpus a phone alignment covering the clip:
    silences are quiet, phones line up with the synthesised words, and it survives the manifest round trip."""
    pytest.importorskip("espeakng_loader")
    from lhotse.cut import MonoCut

    from speechssl.data.corpora import mini
    from speechssl.data.labels import alignment_frame_labels

    plan = mini.plan_mini(0.3, seed=3)
    sent = next(s for s in plan.specs if s.kind == "speech" and s.clip_s is None)
    keyword = next(s for s in plan.specs if s.kind == "speech" and s.clip_s is not None)
    for spec in (sent, keyword):
        wav, words, ali = mini.render(spec)
        ends = [st + du for _, st, du in ali]
        assert ali[0][0] == "sil" and ali[0][1] == 0 and ends[-1] == pytest.approx(wav.size / 16000, abs=1e-4)
        assert all(abs(ali[i + 1][1] - ends[i]) < 2e-5 for i in range(len(ali) - 1))  # contiguous, in order
        phones = [sym for sym, _, _ in ali if sym != "sil"]
        assert abs(len(phones) - sum(len(w) for w in words)) <= 2 + len(words) // 3, (phones, words)

        def rms(sel):
            seg = np.concatenate([wav[int(st * 16000): int((st + du) * 16000)] for sym, st, du in ali if sel(sym)])
            return float(np.sqrt(np.mean(seg ** 2)))

        assert rms(lambda s: s == "sil") < 0.25 * rms(lambda s: s != "sil"), spec.id
        cut = MonoCut.from_dict(mini._make_cut(spec, Path("/x"), wav.size, "", ali).to_dict())
        lab = alignment_frame_labels(cut, wav.size // 320, frame_rate=50)
        # a phone shorter than a frame may fall between two frame centres
        assert None not in lab and lab[0] == "sil" and set(lab) <= set(phones) | {"sil"}
        assert len(set(lab) - {"sil"}) >= 0.8 * len(set(phones))
    silence = next(s for s in plan.specs if s.kind == "silence")
    assert mini.render(silence)[2] == []


def test_diagnostics_config_and_schedule(tmp_path):
    from speechssl.config import ConfigError, from_dict
    from speechssl.train.pretrain import PretrainConfig, _diagnostics, _make_evaluate

    base = {"data": {"train": ["x.jsonl.gz"]}, "objective": {"name": "bestrq"},
            "trainer": {"max_steps": 100, "eval_every": 10}}
    cfg = from_dict(PretrainConfig, {**base, "diagnostics": {"every": 30}})
    d = _diagnostics(cfg, None, tmp_path / "metrics.jsonl")
    assert [s for s in range(10, 101, 10) if d.due(s)] == [30, 60, 90, 100]  # multiples of 30 and the last
    with pytest.raises(ConfigError, match="diagnostics.num_cuts"):
        from_dict(PretrainConfig, {**base, "diagnostics": {"num_cuts": 0}})
    with pytest.raises(ConfigError, match="did you mean 'num_cuts'"):
        from_dict(PretrainConfig, {**base, "diagnostics": {"num_cut": 4}})
    # no data.valid: an evaluate callback only when trainer.eval_every is set and diagnostics are on
    assert _make_evaluate(cfg, None, tmp_path, lambda: 0) is not None
    off = from_dict(PretrainConfig, {**base, "diagnostics": {"enabled": False}})
    assert _make_evaluate(off, None, tmp_path, lambda: 0) is None
    final_only = from_dict(PretrainConfig, {**base, "trainer": {"max_steps": 100}})
    assert _make_evaluate(final_only, None, tmp_path, lambda: 0) is None
