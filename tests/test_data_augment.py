"""Augmentation keeps unit labels aligned: noise (CutMix), volume, pitch, speed with warped labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechssl.data.augment import AugmentConfig, Augmenter, build_augmenter, speed_perturb
from speechssl.data.dataset import SpeechDataset
from speechssl.constants import PAD_ID
from speechssl.data.labels import load_units
from speechssl.data.synthetic import write_synthetic_cuts


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return write_synthetic_cuts(tmp_path_factory.mktemp("sp"), 4, 1.0, 2.0, seed=2, units={"km": 0.02})


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    cuts = write_synthetic_cuts(tmp_path_factory.mktemp("nz"), 3, 0.4, 4.0, seed=9)
    for c in cuts:
        c.supervisions = []
    return cuts


def _plain(speech):
    return SpeechDataset(units=["km"], num_frames=lambda n: n // 320)[speech]


def test_disabled_by_default():
    assert build_augmenter(AugmentConfig()) is None
    assert build_augmenter(AugmentConfig(enabled=True)) is None  # nothing switched on


def test_noise_keeps_labels_and_length(speech, noise):
    aug = Augmenter(AugmentConfig(enabled=True, noise_prob=1.0, snr=[5.0, 5.0]), noise=noise)
    ref = _plain(speech)
    b = SpeechDataset(units=["km"], num_frames=lambda n: n // 320, augment=aug, seed=1)[speech]
    assert torch.equal(b["audio_lens"], ref["audio_lens"]) and b["cut_ids"] == ref["cut_ids"]
    assert torch.equal(b["units"]["km"], ref["units"]["km"])  # padding stays -100, labels unchanged
    diff = (b["audio"] - ref["audio"]).pow(2).sum(1) / ref["audio"].pow(2).sum(1)
    assert (diff > 0.05).all()  # noise really added (about -5 dB relative power)


def test_noise_mix_label_padding_not_real_id(speech, noise):
    aug = Augmenter(AugmentConfig(enabled=True, noise_prob=1.0), noise=noise)
    mixed = aug.transform_cuts(speech, np.random.default_rng(0))
    for m, c in zip(mixed, speech):
        assert m.duration == pytest.approx(c.duration)
        u = load_units(m, "km")
        assert np.array_equal(u[u != PAD_ID], load_units(c, "km"))


def test_volume_and_pitch_keep_length_and_labels(speech):
    ref = _plain(speech)
    aug = Augmenter(AugmentConfig(enabled=True, volume_prob=1.0, volume_db=[6.0, 6.0]))
    b = SpeechDataset(units=["km"], num_frames=lambda n: n // 320, augment=aug)[speech]
    assert torch.allclose(b["audio"], ref["audio"] * 10 ** (6 / 20), atol=1e-5)
    aug = Augmenter(AugmentConfig(enabled=True, pitch_prob=1.0, pitch_semitones=[3.0, 3.0]))
    b = SpeechDataset(units=["km"], num_frames=lambda n: n // 320, augment=aug)[speech.subset(first=1)]
    assert b["audio_lens"][0] == ref["audio_lens"][0]
    nf = b["units"]["km"].shape[1]
    assert torch.equal(b["units"]["km"][0], ref["units"]["km"][0, :nf])
    # pitch moved up 3 semitones: the spectral peak (f0 region) moves by ~2^(3/12)
    def peak(x):
        s = np.abs(np.fft.rfft(x[: 16000]))
        return np.argmax(s[20:800]) + 20
    assert peak(b["audio"][0].numpy()) > peak(ref["audio"][0].numpy())


@pytest.mark.parametrize("f", [0.8, 1.25])
def test_speed_warps_labels(speech, f):
    aug = Augmenter(AugmentConfig(enabled=True, speed_prob=1.0, speeds=[f]))
    ds = SpeechDataset(units=["km"], num_frames=lambda n: n // 320, augment=aug)
    b = ds[speech]
    for i, c in enumerate(b["cut_ids"]):
        n = int(speech[c].num_samples)
        assert abs(int(b["audio_lens"][i]) - n / f) <= 1
        nf = int(b["audio_lens"][i]) * 50 // 16000
        n_lab = len(load_units(speech[c], "km"))
        # frame i of the sped-up audio is at original time i/50*f: label floor(i*f)
        exp = [int(np.floor(j * f + 1e-6)) % 97 if np.floor(j * f + 1e-6) < n_lab else PAD_ID for j in range(nf)]
        assert b["units"]["km"][i, :nf].tolist() == exp
        assert (b["units"]["km"][i, nf:] == PAD_ID).all()


def test_speed_perturb_length():
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    assert abs(len(speed_perturb(x, 1.1)) - 16000 / 1.1) <= 1


def test_bad_config_errors(noise):
    with pytest.raises(ValueError, match="noise_cuts"):
        Augmenter(AugmentConfig(enabled=True, noise_prob=0.5))
    with pytest.raises(ValueError, match="speeds"):
        Augmenter(AugmentConfig(enabled=True, speed_prob=0.5, speeds=[0.0]))
    with pytest.raises(ValueError, match="volume_prob"):
        Augmenter(AugmentConfig(enabled=True, volume_prob=1.5))
