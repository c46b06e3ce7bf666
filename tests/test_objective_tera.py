"""TERA: the alteration policy by hand-checked counts, the L1 loss on altered elements only, learning on a fixed
batch, gradients into what the paper trains, and exact resume through ``speechssl pretrain``."""
from __future__ import annotations

import pytest
import torch
from _objective_checks import assert_ddp_ranks_agree, assert_resume_exact, metrics
from test_objectives import make_batch, train
from test_pretrain import SMALL, manifest  # noqa: F401  (the synthetic-cuts fixture)

from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FBANK_TINY = dict(SMALL, dropout=0.0, attention_dropout=0.0, feature_dropout=0.0, conv_layers=[[64, 3, 2]])


def _tera(**kw):
    torch.manual_seed(0)
    return build_objective("tera", build_encoder("small_hubert", **FBANK_TINY), **kw)


def test_one_span_of_seven_frames_hand_checked():
    """30 frames, P_T 0.15, W_T 7: round(30 * 0.15 / 7) = round(0.64) = 1 span start, so exactly 7 consecutive
    frames are altered; with the zero policy they are 0 and nothing else changes (frequency and noise off)."""
    obj = _tera(freq_prob=0.0, noise_prob=0.0, span_policy=(1.0, 0.0), seed=3)
    norm = torch.randn(1, 40, 80)
    norm[:, 30:] = 0.0  # padding
    alt = obj.alter(norm, torch.tensor([30]))
    t = alt.time[0].nonzero().view(-1)
    assert t.numel() == 7 and torch.equal(t, torch.arange(int(t[0]), int(t[0]) + 7)) and int(t[-1]) < 30
    assert torch.all(alt.altered[0, t] == 0)
    keep = ~alt.time[0]
    assert torch.equal(alt.altered[0, keep], norm[0, keep])
    assert torch.equal(alt.label[0], alt.time[0, :, None].expand(40, 80))  # loss on the span's frames, all bins
    assert int(alt.policy[0]) == 0


def test_span_count_policy_frequency_block_and_noise():
    obj = _tera(seed=0, noise_prob=0.0)
    lens = torch.tensor([700, 350])
    norm = torch.randn(2, 700, 80)
    norm[1, 350:] = 0
    alt = obj.alter(norm, lens)
    # starts: round(700 * 0.15 / 7) = 15 and round(350 * 0.15 / 7) = round(7.5) = 8 (Python rounds half to even);
    # overlapping spans make the count at most 105 and 56 frames
    for b, (n_starts, L) in enumerate([(15, 700), (8, 350)]):
        n = int(alt.time[b].sum())
        assert 7 < n <= 7 * n_starts and not alt.time[b, L:].any()
        # frequency: one block of 0 .. 16 consecutive bins, zero on every valid frame, all in the loss
        bins = (alt.label[b] & ~alt.time[b, :, None]).any(0).nonzero().view(-1)
        assert bins.numel() <= int(80 * 0.2)
        if bins.numel():
            assert torch.equal(bins, torch.arange(int(bins[0]), int(bins[0]) + bins.numel()))
            assert torch.all(alt.altered[b, :L, bins] == 0) and not alt.label[b, L:].any()
    # the 80/10/10 policy over many utterances
    many = _tera(seed=1, freq_prob=0.0, noise_prob=0.0)
    pol = many.alter(torch.randn(400, 50, 8)[..., :1].expand(400, 50, 80).contiguous(), torch.full((400,), 50)).policy
    frac = torch.bincount(pol, minlength=3).float() / 400
    assert abs(frac[0] - 0.8) < 0.06 and abs(frac[1] - 0.1) < 0.05 and abs(frac[2] - 0.1) < 0.05
    # magnitude: noise of std 0.2 on every valid frame, no new loss positions
    noisy = _tera(seed=2, time_prob=0.0, freq_prob=0.0, noise_prob=1.0, loss_on="all")
    x = torch.zeros(1, 5000, 80)
    a = noisy.alter(x, torch.tensor([4000]))
    assert a.altered[0, :4000].std().item() == pytest.approx(0.2, rel=0.02) and torch.all(a.altered[0, 4000:] == 0)


def test_loss_is_mean_l1_on_altered_elements(synthetic_wav):
    obj = _tera(seed=5)
    obj.eval()  # no dropout: the loss can be recomputed from the parts
    batch = make_batch(synthetic_wav, lens=(9600, 8000))
    g = torch.Generator().manual_seed(5)
    obj._gen = g
    out = obj(batch)
    obj._gen = torch.Generator().manual_seed(5)
    norm, flens = obj._features(batch)
    alt = obj.alter(norm, flens)
    enc = obj.encoder(None, flens, features=obj._encoder_input(alt.altered))
    T = enc.last_hidden_state.shape[1]
    sel = obj._stack(alt.label, T) & ~enc.padding_mask[..., None]
    err = (obj.head(enc.last_hidden_state) - obj._stack(norm, T)).abs()
    assert out.sample_size == int(sel.sum()) > 0
    assert out.loss.item() == pytest.approx(err[sel].mean().item(), rel=1e-5)
    # with global normalisation the encoder sees exactly the altered frames
    front = obj.encoder.feature_extractor
    assert front.input_norm == "global"
    back = front.apply_norm(obj._encoder_input(alt.altered), flens)
    valid = (torch.arange(norm.shape[1])[None] < flens[:, None])[..., None]
    assert torch.allclose(back * valid, alt.altered * valid, atol=1e-5)


def test_learns_on_a_fixed_batch_and_trains_encoder_and_head(synthetic_wav):
    obj = _tera(seed=0)
    batch = make_batch(synthetic_wav, lens=(9600, 8000))
    out = obj(batch)
    out.loss.backward()
    for name, p in obj.named_parameters():  # the front end, the transformer and the prediction network
        if name.startswith(("encoder.feature_extractor", "encoder.layers", "encoder.feature_projection", "head")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    obj.zero_grad()
    hist = train(obj, batch, 40, lr=2e-3)
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert last < 0.6 * first
    assert all(h["sample_size"] == int(h["altered_elements"]) for h in hist)


def test_rejects_a_waveform_encoder_and_bad_options():
    with pytest.raises(ValueError, match="fbank"):
        build_objective("tera", build_encoder("tiny_wav2vec2", **SMALL))
    with pytest.raises(ValueError, match="span_policy"):
        _tera(span_policy=(0.9, 0.2))
    with pytest.raises(ValueError, match="time_prob"):
        _tera(time_prob=1.5)


def _cfg(manifest, steps, **trainer):  # noqa: F811
    from speechssl.config import load_config
    from speechssl.train.pretrain import PretrainConfig

    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "pretrain" / "tera.yaml"
    sets = [f"data.train=[{manifest}]", "data.max_duration=3.0", "data.num_buckets=2", f"trainer.max_steps={steps}",
            "trainer.log_every=1", "trainer.progress=false", "trainer.eval_every=0",
            "schedule.warmup_ratio=0.0", "schedule.warmup_steps=1"]
    sets += [f"model.overrides.{k}={v}" for k, v in FBANK_TINY.items() if k != "conv_layers"]
    sets += [f"trainer.{k}={v}" for k, v in trainer.items()]
    return load_config(PretrainConfig, conf, sets)


def test_resume_through_the_trainer_is_exact(manifest, tmp_path):  # noqa: F811
    """4 steps with checkpoints at 2 and 4; roll back to step 2 as a crash would, resume: identical losses."""
    from speechssl import load_pretrained

    out = tmp_path / "tera"
    assert_resume_exact(_cfg(manifest, 4, ckpt_every=2, num_workers=0), out)
    recs = metrics(out)
    assert all("altered_elements" in r for r in recs if r["split"] == "train")
    enc = load_pretrained(out / "final")
    assert enc.config.frontend == "fbank" and enc.config.input_norm == "global"


def test_two_processes_train_identically(tmp_path):
    """DDP over 2 gloo processes: both ranks end with the same weights (trainer.ddp_find_unused on: TERA alters
    the input itself and never uses the encoder's mask embedding)."""
    assert_ddp_ranks_agree(tmp_path, "tera", "small_hubert", FBANK_TINY, {"seed": None}, find_unused=True)
