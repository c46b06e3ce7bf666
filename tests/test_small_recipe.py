"""The small-data recipe's pieces: corpus-level fbank normalisation, per-utterance normalised MFCC units, the
input statistics and the wall-clock budget of ``speechssl pretrain --minutes``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_wav

from speechssl.config import ConfigError
from speechssl.models import build_encoder
from speechssl.models.components import log_mel_fbank

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "ffn_dim": 128, "conv_pos": 16, "conv_pos_groups": 4}


def _encoder(norm: str):
    torch.manual_seed(0)
    return build_encoder("small_hubert", input_norm=norm, **SMALL).eval()


def test_global_input_norm_keeps_loudness_utterance_norm_removes_it():
    wav = torch.from_numpy(make_wav(16000))[None]
    for norm, invariant in (("utterance", True), ("global", False)):
        enc = _encoder(norm)
        if norm == "global":
            feats = log_mel_fbank(wav)[0]
            enc.feature_extractor.set_input_stats(feats.mean(0), feats.std(0))
        with torch.no_grad():
            a = enc(wav).hidden_states[0]
            b = enc(0.25 * wav).hidden_states[0]
        # a gain is a constant shift of every log-mel bin: per-utterance normalisation cancels it exactly
        assert torch.allclose(a, b, atol=1e-3) is invariant, norm


def test_global_input_stats_are_saved_and_checked(tmp_path):
    from speechssl import load_pretrained
    from speechssl.models.io import export_pretrained

    enc = _encoder("global")
    enc.feature_extractor.set_input_stats(torch.arange(80.0), torch.full((80,), 2.0))
    export_pretrained(enc, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    assert torch.equal(back.feature_extractor.input_mean, torch.arange(80.0))
    assert torch.equal(back.feature_extractor.input_std, torch.full((80,), 2.0))
    with pytest.raises(ValueError, match="input_norm"):
        _encoder("utterance").feature_extractor.set_input_stats(torch.zeros(80), torch.ones(80))
    with pytest.raises(ConfigError, match="input_norm"):
        build_encoder("small_hubert", input_norm="batch")


@pytest.fixture
def cuts_file(tmp_path):
    from lhotse import CutSet, Recording

    cuts = []
    for i in range(6):
        p = tmp_path / f"utt{i}.wav"
        sf.write(p, make_wav(16000 + 3200 * i, seed=i) * (0.2 + 0.15 * i), 16000)
        cuts.append(Recording.from_file(p, recording_id=f"utt{i}").to_cut())
    path = tmp_path / "cuts_train.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def test_mfcc_cmvn_units_are_normalised_per_utterance(cuts_file, tmp_path):
    from speechssl.data.loader import open_cuts
    from speechssl.train.units import FeatureReader, fit_kmeans, label_cuts

    cuts = list(open_cuts(cuts_file))
    feats = FeatureReader("mfcc_cmvn")(cuts)
    raw = FeatureReader("mfcc")(cuts)
    for f, r in zip(feats, raw):
        assert f.shape == r.shape and f.shape[1] == 39
        assert np.allclose(f.mean(0), 0, atol=1e-4) and np.allclose(f.std(0), 1, atol=1e-2)
    fit_kmeans(cuts_file, tmp_path / "km", feature="mfcc_cmvn", n_clusters=8, fraction=1.0, progress=False)
    import json

    assert json.loads((tmp_path / "km" / "kmeans.json").read_text())["meta"]["features"]["feature"] == "mfcc_cmvn"
    assert label_cuts(cuts_file, tmp_path / "km", tmp_path / "lab.jsonl.gz", name="mfcc", progress=False) == 6
    with pytest.raises(ValueError, match="layer"):
        FeatureReader("mfcc_cmvn", layer=2)


def _small_cfg(cuts_file, tmp_path):
    from speechssl.config import load_config
    from speechssl.train.pretrain import PretrainConfig

    lab = tmp_path / "lab.jsonl.gz"
    if not lab.exists():
        from speechssl.train.units import fit_kmeans, label_cuts

        fit_kmeans(cuts_file, tmp_path / "km", feature="mfcc_cmvn", n_clusters=8, fraction=1.0, progress=False)
        label_cuts(cuts_file, tmp_path / "km", lab, name="mfcc", progress=False)
    over = [f"data.train=[{lab}]", "objective.kwargs.num_classes={mfcc: 8}", "data.max_duration=4.0",
            "trainer.num_workers=0", "trainer.progress=false", "trainer.max_steps=2", "trainer.eval_every=0",
            "diagnostics.enabled=false"] + [f"model.overrides.{k}={v}" for k, v in SMALL.items()]
    return load_config(PretrainConfig, ROOT / "conf/pretrain/small_hubert.yaml", over)


def test_input_statistics_match_a_hand_computation(cuts_file, tmp_path):
    from speechssl.data.audio import load_cut_audio
    from speechssl.data.loader import open_cuts
    from speechssl.train.pretrain import build_model, set_input_statistics

    cfg = _small_cfg(cuts_file, tmp_path)
    model = build_model(cfg)
    set_input_statistics(cfg, model.encoder)
    frames = torch.cat([log_mel_fbank(torch.from_numpy(load_cut_audio(c))[None])[0] for c in open_cuts(cuts_file)])
    front = model.encoder.feature_extractor
    assert torch.allclose(front.input_mean, frames.mean(0), atol=1e-4)
    assert torch.allclose(front.input_std, frames.std(0, unbiased=False), atol=1e-3)


def test_budget_gives_steps_in_proportion_and_leaves_the_rng_alone(cuts_file, tmp_path):
    from speechssl.train.pretrain import steps_for_budget

    cfg = _small_cfg(cuts_file, tmp_path)
    state = torch.get_rng_state()
    short = steps_for_budget(cfg, 0.05, probe_steps=2)
    assert torch.equal(state, torch.get_rng_state())
    long = steps_for_budget(cfg, 5.0, probe_steps=2)
    assert short >= 1 and long > 20 * short  # 100x the minutes; timing noise allowed for
    with pytest.raises(ConfigError, match="minutes"):
        steps_for_budget(cfg, 0)


def test_small_recipe_parses_and_needs_data(tmp_path):
    import subprocess

    script = ROOT / "recipes/ssl/small.sh"
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert "--minutes" in out.stderr and "--train-split" in out.stderr
    out = subprocess.run(["bash", str(script), "--data", str(tmp_path), "--exp", str(tmp_path / "e")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "cuts_train.jsonl.gz" in out.stderr


def test_input_reconstruction_loss_learns_and_needs_fbank():
    from speechssl.models.objectives import build_objective

    enc = _encoder("global")
    enc.train()
    model = build_objective("hubert", enc, num_classes={"u": 5}, final_dim=16, recon_weight=1.0, mask_prob=0.3,
                            mask_length=2)
    wav = torch.from_numpy(np.stack([make_wav(16000, seed=i) for i in range(2)]))
    lens = torch.tensor([16000, 12800])
    T = int(enc.num_frames(torch.tensor([16000]))[0])
    batch = {"audio": wav, "audio_lens": lens, "units": {"u": torch.randint(0, 5, (2, T))}}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    recon = []
    for _ in range(30):
        step = model(batch)
        loss, logs = step.loss, step.logs
        opt.zero_grad()
        loss.backward()
        opt.step()
        recon.append(logs["loss_recon"])
    assert recon[-1] < 0.6 * recon[0], recon[::5]
    # L1 per frame and input dim: a hand check against the head's own output
    with torch.no_grad():
        out = enc(wav, lens)
        valid = ~out.padding_mask
        pred = model.recon_proj(out.last_hidden_state[valid])
        assert torch.allclose(model.reconstruction_loss(out.last_hidden_state, out.input_features, valid),
                              (pred - out.input_features[valid]).abs().mean(), atol=1e-6)
    with pytest.raises(ValueError, match="fbank"):
        build_objective("hubert", build_encoder("tiny_hubert", **SMALL), num_classes=5, recon_weight=1.0)
