"""ContentVec: the speaker change moves pitch and formants by the asked ratios and keeps length and labels; the
objective's loss falls on a fixed batch, its gradients reach encoder, predictor, speaker block and contrastive
projection; the contrastive loss matches a hand computation; pretraining resumes exactly through the trainer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _objective_checks import assert_resume_exact, metrics
from test_pretrain import CNN_SMALL, manifest  # noqa: F401 - the synthetic cuts with units (a fixture)

from speechssl.data.augment import AugmentConfig, Augmenter
from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective
from speechssl.models.objectives.contentvec import ContentVecObjective
from speechssl.signal import draw_speaker_ratios, speaker_change

SR = 16000


def _tone(f0: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 30) if f0 * k < 7000).astype(np.float32)


def _f0(x: np.ndarray) -> float:
    """Pitch by autocorrelation: the lag of the highest peak between 2 and 16 ms."""
    x = x[2000:-2000] - x[2000:-2000].mean()
    ac = np.correlate(x, x, "full")[len(x) - 1:]
    lo, hi = SR // 500, SR // 60
    return SR / (lo + int(np.argmax(ac[lo:hi])))


def test_speaker_change_identity_pitch_and_formant():
    x = torch.from_numpy(np.stack([_tone(200.0), _tone(120.0)]))
    lens = torch.tensor([16000, 12000])
    same = speaker_change(x, lens, torch.ones(2), torch.ones(2))
    assert torch.allclose(same, x * (torch.arange(16000) < lens[:, None]), atol=1e-5)  # ratio 1: the input
    up = speaker_change(x, torch.tensor([16000, 16000]), torch.ones(2), torch.tensor([1.25, 0.8])).numpy()
    assert _f0(up[0]) == pytest.approx(250.0, rel=0.02) and _f0(up[1]) == pytest.approx(96.0, rel=0.02)
    # formant shift: the pitch stays, the spectral envelope's peak moves by the ratio
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SR).astype(np.float32)
    spec = np.fft.rfft(noise)
    f = np.fft.rfftfreq(SR, 1 / SR)
    spec *= 1.0 / (1.0 + ((f - 1000.0) / 150.0) ** 2)  # one resonance at 1 kHz
    voiced = torch.from_numpy(np.stack([np.fft.irfft(spec, SR).astype(np.float32), _tone(150.0)]))
    moved = speaker_change(voiced, torch.tensor([SR, SR]), torch.tensor([1.3, 1.3]), torch.ones(2)).numpy()
    assert _f0(moved[1]) == pytest.approx(150.0, rel=0.02)

    def centroid(y):  # power-weighted mean frequency between 300 Hz and 3 kHz: 1 kHz for the input
        power, band = np.abs(np.fft.rfft(y)) ** 2, (f > 300) & (f < 3000)
        return (f[band] * power[band]).sum() / power[band].sum()

    assert centroid(moved[0]) / centroid(voiced[0].numpy()) == pytest.approx(1.3, rel=0.03)
    assert np.sqrt((moved[0] ** 2).mean()) == pytest.approx(float(voiced[0].pow(2).mean().sqrt()), rel=1e-4)


def test_ratios_and_augmenter():
    f, p = draw_speaker_ratios(4000, generator=torch.Generator().manual_seed(0))
    assert ((f >= 1 / 1.4 - 1e-6) & (f <= 1.4 + 1e-6)).all() and ((p >= 0.5 - 1e-6) & (p <= 2 + 1e-6)).all()
    assert (f > 1).float().mean().item() == pytest.approx(0.5, abs=0.05)  # inverted half of the time
    aug = Augmenter(AugmentConfig(enabled=True, speaker_prob=1.0, formant_ratio=[1.0, 1.0], pitch_ratio=[1.5, 1.5]))
    out, scale = aug.transform_wave(_tone(120.0), np.random.default_rng(1))
    assert scale == 1.0 and out.shape == (SR,) and _f0(out) in (pytest.approx(180.0, rel=0.02),
                                                              pytest.approx(80.0, rel=0.02))
    with pytest.raises(ValueError, match="augment.pitch_ratio"):
        Augmenter(AugmentConfig(enabled=True, speaker_prob=1.0, pitch_ratio=[0.0, 2.0]))


def _objective(**kw) -> ContentVecObjective:
    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", **CNN_SMALL)
    return build_objective("contentvec", enc, num_classes={"km": 7}, final_dim=32, ctr_ramp_steps=4, seed=0, **kw)


def _batch(B: int = 3, S: int = 16000) -> dict:
    from conftest import make_wav

    audio = torch.from_numpy(np.stack([make_wav(S, seed=i) for i in range(B)]))
    lens = torch.tensor([S - 2000 * i for i in range(B)])
    T = 49  # tiny CNN: 16000 samples -> 49 frames
    return {"audio": audio, "audio_lens": lens, "units": {"km": (torch.arange(T)[None] // 4 % 7).repeat(B, 1)}}


def test_loss_falls_and_gradients_reach_the_trained_parts():
    obj = _objective()
    obj.set_step(4)  # contrastive weight fully ramped up
    batch = _batch(B=2)
    out = obj(batch)
    out.loss.backward()
    for name in ("encoder.layers.0.attention.qkv.weight", "encoder.feature_extractor.conv_layers.0.conv.weight",
                 "final_proj.weight", "label_embs",
                 "speaker_film.weight", "speaker_ffn.0.weight", "ctr_proj.weight"):
        g = dict(obj.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert out.logs["ctr_weight"] == 1.0 and out.logs["ctr_frames"] > 0
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        obj._gen.manual_seed(0)  # the same views and mask every time: a fixed batch
        out = obj(batch)
        first = float(out.loss.detach()) if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.loss.detach()) < 0.6 * first
    assert out.logs["acc_ctr"] > 0.5


def test_contrastive_by_hand():
    obj = _objective()
    with torch.no_grad():
        obj.ctr_proj.weight.copy_(torch.eye(32, 64))
        obj.ctr_proj.bias.zero_()
    # two frames 45 degrees apart; version 2 holds the same two frames
    x1 = torch.zeros(1, 2, 64)
    x1[0, 0, 0] = 1.0
    x1[0, 1, :2] = 1.0
    loss, n, acc = obj.contrastive(x1, x1.clone(), torch.ones(1, 2, dtype=torch.bool))
    c = math.cos(math.pi / 4)
    expected = -math.log(math.exp(1 / 0.1) / (math.exp(1 / 0.1) + math.exp(c / 0.1)))  # every anchor alike
    assert n == 2 and acc == 1.0 and float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    obj.set_step(1)
    assert obj.ctr_lambda() == pytest.approx(0.25)  # 1 of 4 ramp steps


def test_speaker_embedding_ignores_gain_and_sees_formants():
    noisy = _tone(120.0) + 0.01 * np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    x = torch.from_numpy(np.stack([noisy] * 2))
    x[1] *= 3.0
    lens = torch.tensor([SR, SR])
    e = ContentVecObjective.speaker_embedding(x, lens)
    assert e.shape == (2, 160) and torch.allclose(e[0], e[1], atol=1e-3)  # gain is not the speaker
    moved = speaker_change(x[:1], lens[:1], torch.tensor([1.3]), torch.tensor([1.5]))
    assert (ContentVecObjective.speaker_embedding(moved, lens[:1]) - e[:1]).abs().max() > 0.1


def test_rejects_reconstruction():
    with pytest.raises(ValueError, match="recon_weight"):
        ContentVecObjective(build_encoder("small_hubert", num_layers=1), num_classes=5, recon_weight=1.0)


@pytest.mark.slow
def test_resume_exact_through_pretrain(manifest, tmp_path):  # noqa: F811 - the fixture imported above
    from speechssl.config import from_dict
    from speechssl.train.pretrain import PretrainConfig

    cfg = from_dict(PretrainConfig, {
        "data": {"train": [str(manifest)], "max_duration": 3.0, "units": ["l6"], "num_buckets": 2},
        "model": {"preset": "tiny_hubert", "overrides": CNN_SMALL},
        "objective": {"name": "contentvec", "kwargs": {"num_classes": {"l6": 5}, "final_dim": 32,
                                                       "ctr_ramp_steps": 2}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "linear", "warmup_steps": 1},
        "trainer": {"max_steps": 4, "log_every": 1, "ckpt_every": 2, "num_workers": 0, "progress": False}})
    out = tmp_path / "cv"
    assert_resume_exact(cfg, out)
    rec = metrics(out)
    assert rec[-1]["ctr_weight"] == 1.0 and "acc_ctr" in rec[-1]
