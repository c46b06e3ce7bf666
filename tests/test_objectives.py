"""Objectives and quantizers: each objective overfits a tiny batch; Gumbel perplexity/diversity, random-projection
targets, negatives sampling and utterance mixing behave as specified."""
import math

import pytest
import torch
import torch.nn.functional as F

from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective, utterance_mix
from speechssl.models.objectives.wav2vec2 import sample_negatives
from speechssl.models.quantizers import GumbelVectorQuantizer, RandomProjectionQuantizer

# the tiny presets narrowed further (2 layers, 64 dims, 32-channel front end) so that 50 steps take seconds
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, feature_dropout=0.0, num_layers=2, hidden_size=64, num_heads=4,
                  ffn_dim=128, conv_layers=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2, conv_pos=16,
                  conv_pos_groups=8)
FBANK_SMALL = dict(NO_DROPOUT, conv_layers=[[32, 3, 2], [32, 3, 2]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def make_batch(synthetic_wav, lens=(9600, 8000), seed=0):
    T = max(lens)
    audio = torch.zeros(len(lens), T)
    for i, n in enumerate(lens):
        audio[i, :n] = torch.from_numpy(synthetic_wav(n, seed=seed + i))
    return {"audio": audio, "audio_lens": torch.tensor(lens)}


def random_units(enc, batch, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = int(enc.num_frames(torch.tensor([batch["audio"].shape[1]])))
    u = torch.randint(0, K, (len(batch["audio_lens"]), T), generator=g)
    frames = enc.num_frames(batch["audio_lens"])
    u[torch.arange(T)[None] >= frames[:, None]] = -100
    return u


def train(obj, batch, steps, lr=3e-3):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(obj.parameters(), lr=lr)
    hist = []
    for step in range(steps):
        obj.set_step(step)
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        hist.append({**out.logs, "sample_size": out.sample_size})
    return hist


# ----------------------------------------------------------------------------- quantizers
def test_gumbel_temperature_schedule_and_modes():
    q = GumbelVectorQuantizer(16, num_vars=8, groups=2, vq_dim=12, temp=(2.0, 0.5, 0.999995))
    assert q.curr_temp == 2.0
    q.set_step(100_000)
    assert q.curr_temp == pytest.approx(2.0 * 0.999995 ** 100_000)
    q.set_step(10_000_000)
    assert q.curr_temp == 0.5
    x = torch.randn(3, 5, 16)
    q.eval()
    a, b = q(x), q(x)
    assert torch.equal(a.x, b.x) and a.x.shape == (3, 5, 12) and a.codes.shape == (3, 5, 2)
    # eval picks the argmax codeword of each group
    logits = q.weight_proj(x).view(3, 5, 2, 8)
    assert torch.equal(a.codes, logits.argmax(-1))
    cv = q.codevectors.view(2, 8, 6)
    expect = torch.cat([cv[0][a.codes[..., 0]], cv[1][a.codes[..., 1]]], -1)
    torch.testing.assert_close(a.x, expect)
    # train: hard straight-through -> outputs are exact codewords, gradients reach the logits
    q.train()
    out = q(x)
    expect = torch.cat([cv[0][out.codes[..., 0]], cv[1][out.codes[..., 1]]], -1)
    torch.testing.assert_close(out.x, expect)
    out.x.sum().backward()
    assert q.weight_proj.weight.grad is not None and q.weight_proj.weight.grad.abs().sum() > 0


def test_gumbel_perplexity_and_diversity_loss():
    G, V = 2, 8
    q = GumbelVectorQuantizer(4, num_vars=V, groups=G, vq_dim=8).eval()
    with torch.no_grad():
        q.weight_proj.weight.zero_()
        q.weight_proj.bias.zero_()
    out = q(torch.randn(50, 4))  # uniform softmax: perplexity G*V, no diversity loss
    assert out.prob_perplexity.item() == pytest.approx(G * V, rel=1e-4)
    assert out.diversity_loss.item() == pytest.approx(0.0, abs=1e-4)
    assert out.code_perplexity.item() == pytest.approx(G, rel=1e-4)  # argmax of ties: one code per group
    with torch.no_grad():
        q.weight_proj.bias.view(G, V)[:, 3] = 50.0  # every frame picks code 3: perplexity G
    out = q(torch.randn(50, 4))
    assert out.prob_perplexity.item() == pytest.approx(G, rel=1e-3)
    assert out.diversity_loss.item() == pytest.approx((G * V - G) / (G * V), rel=1e-3)
    # the mask restricts the statistics to the selected frames
    m = torch.zeros(50, dtype=torch.bool)
    m[:3] = True
    assert q(torch.randn(50, 4), mask=m).prob_perplexity.item() == pytest.approx(G, rel=1e-3)


def test_random_projection_quantizer_is_frozen_and_cosine_nearest():
    q = RandomProjectionQuantizer(320, code_dim=16, codebook_size=64, seed=3)
    assert list(q.parameters()) == []
    torch.testing.assert_close(q.codebook.norm(dim=-1), torch.ones(1, 64))
    bound = math.sqrt(6 / (320 + 16))
    assert q.projection.abs().max() <= bound
    x = torch.randn(2, 7, 320)
    codes = q(x)
    assert codes.shape == (2, 7, 1)
    z = F.normalize(x @ q.projection[0], dim=-1)
    assert torch.equal(codes[..., 0], (z @ q.codebook[0].T).argmax(-1))
    assert torch.equal(RandomProjectionQuantizer(320, 16, 64, seed=3)(x), codes)
    assert not torch.equal(RandomProjectionQuantizer(320, 16, 64, seed=4).codebook, q.codebook)


def test_sample_negatives_same_utterance_never_self():
    utt = torch.tensor([0] * 5 + [1] * 3 + [2] * 1)
    idx = sample_negatives(utt, 200, torch.Generator().manual_seed(0))
    assert idx.shape == (9, 200)
    assert (utt[idx] == utt[:, None]).all()
    me = torch.arange(9)[:, None]
    assert not (idx[:8] == me[:8]).any()
    assert (idx[8] == 8).all()  # alone in its utterance: itself (masked to -inf by the loss)
    counts = torch.bincount(idx[0], minlength=5)[1:5].float()  # uniform over the 4 others
    assert (counts / 200 - 0.25).abs().max() < 0.1


# ----------------------------------------------------------------------------- objectives
def test_hubert_overfits_and_logs(synthetic_wav):
    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", **NO_DROPOUT)
    obj = build_objective("hubert", enc, num_classes={"km": 16}, final_dim=32)
    batch = make_batch(synthetic_wav)
    batch["units"] = {"km": random_units(enc, batch, 16)}
    hist = train(obj, batch, 50)
    assert hist[-1]["loss"] < 0.4 * hist[0]["loss"]
    assert max(h["acc_masked"] for h in hist[-5:]) > 0.75
    assert {"acc_masked", "acc_unmasked", "loss", "features_pen"} <= set(hist[-1])
    assert hist[-1]["sample_size"] == int(hist[-1]["masked_frames"]) > 0


def test_hubert_logits_are_cosine_over_all_units(synthetic_wav):
    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", **NO_DROPOUT)
    obj = build_objective("hubert", enc, num_classes=[7, 5], untie_final_proj=True, final_dim=32)
    x = torch.randn(6, 64)
    lg = obj.logits(x, 1)
    assert lg.shape == (6, 5)
    proj = obj.final_proj(x).view(6, 2, 32)[:, 1]
    emb = obj.label_embs[7:12]
    ref = F.cosine_similarity(proj[:, None], emb[None], dim=-1) / 0.1
    torch.testing.assert_close(lg, ref, rtol=1e-4, atol=1e-4)
    # two label sets in one batch, bf16 autocast: the loss stays fp32 and finite
    batch = make_batch(synthetic_wav)
    batch["units"] = {"kmeans": random_units(enc, batch, 7), "kmeans1": random_units(enc, batch, 5, seed=1)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(batch)
    loss, logs = out.loss, out.logs
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert "acc_masked_kmeans1" in logs


def test_hubert_rejects_collapse_pitfalls(synthetic_wav):
    enc = build_encoder("tiny_hubert", **NO_DROPOUT)
    with pytest.raises(ValueError, match="num_classes=0"):
        build_objective("hubert", enc, num_classes={"km": 0})
    obj = build_objective("hubert", enc, num_classes={"km": 4})
    batch = make_batch(synthetic_wav)
    u = random_units(enc, batch, 4)
    batch["units"] = {"km": torch.full_like(u, -100)}
    with pytest.raises(ValueError, match="every target in the batch is padding"):
        obj(batch)
    batch["units"] = {"km": u.clamp_min(0) + 4}
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        obj(batch)
    batch["units"] = {"other": u}
    with pytest.raises(KeyError, match="no label set 'km'"):
        obj(batch)


def test_build_objective_errors():
    enc = build_encoder("tiny_hubert", **NO_DROPOUT)
    with pytest.raises(ValueError, match="did you mean 'hubert'"):
        build_objective("hubbert", enc)
    with pytest.raises(ValueError, match="did you mean 'mask_prob'"):
        build_objective("wavlm", enc, num_classes=4, mask_prb=0.5)
    with pytest.raises(ValueError, match="fbank front end"):
        build_objective("bestrq", enc)


def test_utterance_mix_bounds_and_targets(synthetic_wav):
    lens = torch.tensor([16000, 12000, 9000, 16000, 5000, 14000])
    audio = torch.zeros(6, 16000)
    for i, n in enumerate(lens):
        audio[i, :n] = torch.from_numpy(synthetic_wav(int(n), seed=i))
    g = torch.Generator().manual_seed(0)
    seen = 0
    for _ in range(20):
        out, info = utterance_mix(audio, lens, mix_prob=0.7, generator=g)
        diff = out - audio
        for b in range(6):
            if not info.mixed[b]:
                assert torch.equal(diff[b], torch.zeros(16000))
                continue
            seen += 1
            s, L = int(info.start[b]), int(info.length[b])
            assert 0 < L <= 0.5 * int(lens[b])  # overlap at most half the primary
            assert int(info.source[b]) != b
            assert s + L <= int(lens[b])
            outside = torch.ones(16000, dtype=torch.bool)
            outside[s : s + L] = False
            assert diff[b][outside].abs().max() == 0  # padding and the rest untouched
            src = audio[int(info.source[b]), int(info.src_start[b]) : int(info.src_start[b]) + L]
            torch.testing.assert_close(diff[b, s : s + L], src * info.scale[b].float(), rtol=1e-4, atol=1e-6)
            p = audio[b, : lens[b]].double().pow(2).mean()
            n = diff[b, s : s + L].double().pow(2).mean()
            ratio = 10 * torch.log10(p / n)
            assert -5.0 - 1e-3 <= ratio.item() <= 5.0 + 1e-3
            assert ratio.item() == pytest.approx(info.ratio_db[b].item(), abs=1e-3)
    assert seen > 30


def test_wavlm_mixes_in_training_only_and_learns(synthetic_wav):
    torch.manual_seed(0)
    enc = build_encoder("tiny_wavlm", **NO_DROPOUT)
    obj = build_objective("wavlm", enc, num_classes=16, final_dim=32, mix_prob=1.0)
    batch = make_batch(synthetic_wav)
    units = random_units(enc, batch, 16)
    batch["units"] = {"kmeans": units}
    hist = train(obj, batch, 40)
    assert obj.last_mix is not None and obj.last_mix.mixed.all()
    assert torch.equal(batch["units"]["kmeans"], units)  # targets stay the primary's
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    obj.eval()
    obj(batch)
    assert obj.last_mix is None


def test_wav2vec2_overfits(synthetic_wav):
    torch.manual_seed(0)
    enc = build_encoder("tiny_wav2vec2", **NO_DROPOUT)
    obj = build_objective("wav2vec2", enc, final_dim=32, latent_vars=16, num_negatives=10, mask_length=5,
                          latent_temp=(2.0, 0.5, 0.99))
    batch = make_batch(synthetic_wav)
    hist = train(obj, batch, 60)
    mean = lambda key, hs: sum(h[key] for h in hs) / len(hs)  # noqa: E731  (masks change every step)
    assert mean("contrastive", hist[-5:]) < 0.65 * mean("contrastive", hist[:5])
    assert mean("acc", hist[-5:]) > max(0.45, mean("acc", hist[:5]) + 0.25)
    assert hist[-1]["temp"] == pytest.approx(2.0 * 0.99 ** 59)
    for h in hist:
        assert 1.0 <= h["prob_perplexity"] <= 32 and 1.0 <= h["code_perplexity"] <= 32
        assert h["loss"] == pytest.approx(h["contrastive"] + 0.1 * h["diversity"] + 10 * h["features_pen"], rel=1e-4)
    assert hist[-1]["sample_size"] == int(hist[-1]["masked_frames"]) > 0


def test_bestrq_overfits(synthetic_wav):
    torch.manual_seed(0)
    enc = build_encoder("tiny_bestrq", **FBANK_SMALL)
    obj = build_objective("bestrq", enc, codebook_size=64, mask_prob=0.02, mask_length=20)
    batch = make_batch(synthetic_wav, lens=(9600, 8000))
    hist = train(obj, batch, 50)
    assert hist[-1]["loss"] < 0.3 * hist[0]["loss"]
    assert max(h["acc_masked"] for h in hist[-5:]) > 0.8
    assert list(obj.quantizer.parameters()) == []
    # targets come from the clean input: masking does not change them
    from speechssl.models.components import FbankFrontend, log_mel_fbank

    feats = log_mel_fbank(batch["audio"], 80)
    norm = FbankFrontend.normalize(feats, batch["audio_lens"] // 160)
    codes = obj.targets(norm, 15)
    assert codes.shape == (2, 15, 1) and codes.max() < 64
    stacked = torch.nn.functional.pad(norm, (0, 0, 0, 60 - norm.shape[1])).reshape(2, 15, 320)
    assert torch.equal(codes, obj.quantizer(stacked))


def test_an_objective_class_registers_itself_by_name():
    """A new objective is one module: its class sets ``name`` (and ``predicts_units``) and is then buildable by
    name and checked by the pretraining config, with no registry or train/ code to edit."""
    from speechssl.config import ConfigError
    from speechssl.models.objectives import OBJECTIVES, Objective, build_objective
    from speechssl.train.pretrain import PretrainConfig, predicts_units

    class MaskedUnitsToy(Objective):
        name = "masked_units_toy"
        predicts_units = True

        def __init__(self, encoder, num_classes=4, mask_prob: float = 0.5):
            super().__init__(encoder, mask_prob=mask_prob, mask_length=2)
            self.num_classes = num_classes

    try:
        assert OBJECTIVES["masked_units_toy"] is MaskedUnitsToy and predicts_units("masked_units_toy")
        enc = torch.nn.Linear(2, 2)
        assert build_objective("masked_units_toy", enc, num_classes=7).num_classes == 7
        with pytest.raises(ValueError, match="has no option 'mask_len'"):
            build_objective("masked_units_toy", enc, mask_len=3)
        cfg = PretrainConfig()
        cfg.data.train, cfg.objective.name = ["x.jsonl.gz"], "masked_units_toy"
        with pytest.raises(ConfigError, match="data.units"):
            cfg.validate()
        with pytest.raises(ValueError, match="taken by"):
            type("Clash", (Objective,), {"name": "masked_units_toy"})
    finally:
        OBJECTIVES.pop("masked_units_toy", None)
    assert not predicts_units("wav2vec2") and predicts_units("hubert") and predicts_units("wavlm")
