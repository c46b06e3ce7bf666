"""vq-wav2vec: the k-means quantizer (hand-checked codes, perplexity, loss, straight-through gradient), the causal
context network, the contrastive loss recomputed by hand, the exported codes, gradients into what the paper
trains, and exact resume through ``speechssl pretrain``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _objective_checks import assert_ddp_ranks_agree, assert_resume_exact
from conftest import make_wav
from test_objectives import make_batch, train
from test_pretrain import CNN_SMALL, manifest  # noqa: F401  (the synthetic-cuts fixture)

from speechssl.constants import PAD_ID
from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective
from speechssl.models.objectives.vq_wav2vec import CausalConvContext, receptive_offset
from speechssl.models.quantizers import KMeansVectorQuantizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CNN_TINY = dict(CNN_SMALL, dropout=0.0, attention_dropout=0.0, feature_dropout=0.0)
SMALL_VQ = dict(num_vars=16, context_layers=[[32, 2, 1], [32, 3, 1], [32, 4, 1]], prediction_steps=4, offset=1)


def _vq(quantizer="gumbel", **kw):
    torch.manual_seed(0)
    return build_objective("vq_wav2vec", build_encoder("tiny_wav2vec2", **CNN_TINY), quantizer=quantizer,
                           **{**SMALL_VQ, **kw})


def test_kmeans_quantizer_codes_perplexity_and_loss_hand_checked():
    """Six frames whose projections are codewords: group 0 uses codewords 0, 0, 1, 1, 2, 2 (perplexity 3), group 1
    codeword 4 six times (perplexity 1): code perplexity 3 + 1 = 4, and the loss is 0 (every frame is a codeword)."""
    torch.manual_seed(0)
    q = KMeansVectorQuantizer(6, num_vars=5, groups=2, vq_dim=6, gamma=0.25)
    x = torch.randn(6, 6)
    z = q.project(x).detach()  # [6, 2, 3]
    with torch.no_grad():
        q.codebook[0, :3] = z[[0, 2, 4], 0]
        q.codebook[0, 3:] = 50.0  # far away
        q.codebook[1, :4] = 50.0
        q.codebook[1, 4] = z[:, 1].mean(0)
    x[1], x[3], x[5] = x[0] * 1.0001, x[2] * 1.0001, x[4] * 1.0001  # near copies: same group-0 codeword
    out = q(x)
    assert out.codes[:, 0].tolist() == [0, 0, 1, 1, 2, 2] and out.codes[:, 1].tolist() == [4] * 6
    assert out.code_perplexity.item() == pytest.approx(4.0, abs=1e-4)
    # loss = mse(q, z) + 0.25 * mse(z, q) = 1.25 * mse, by hand
    zq = q.project(x)
    expect = 1.25 * F.mse_loss(q.codebook[[0, 1], out.codes].float(), zq)
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-5)
    # straight-through: the forward value is the codeword, the gradient passes to z unchanged
    assert torch.allclose(out.x.view(6, 2, 3), q.codebook[[0, 1], out.codes], atol=1e-5)
    xg = x.clone().requires_grad_(True)
    o = q(xg)
    (o.x * torch.arange(6.0)).sum().backward()
    zg = x.clone().requires_grad_(True)
    (q.project(zg).reshape(6, 6) * torch.arange(6.0)).sum().backward()
    assert torch.allclose(xg.grad, zg.grad, atol=1e-6)


def test_context_network_is_causal_and_offset_auto():
    ctx = CausalConvContext(8, [[16, 2, 1], [16, 5, 1], [8, 3, 1]])
    x = torch.randn(2, 30, 8)
    y = x.clone()
    y[:, 17:] = torch.randn(2, 13, 8)  # change the future of frame 16
    assert torch.equal(ctx(x)[:, :17], ctx(y)[:, :17]) and not torch.equal(ctx(x)[:, 17:], ctx(y)[:, 17:])
    # fairseq's wav2vec encoder: receptive field 465 samples, stride 160 -> offset ceil(465 / 160) = 3
    layers = [[512, 10, 5], [512, 8, 4], [512, 4, 2], [512, 4, 2], [512, 4, 2], [512, 1, 1], [512, 1, 1], [512, 1, 1]]
    assert receptive_offset(layers) == 3
    with pytest.raises(ValueError, match="context_layers"):
        CausalConvContext(8, [[16, 3, 2]])


def test_contrastive_loss_recomputed_by_hand(synthetic_wav):
    obj = _vq("kmeans", prediction_steps=2, num_negatives=3, seed=7, offset="auto")
    assert obj.offset == 2  # receptive field 400 samples, stride 320: ceil(400 / 320)
    obj.eval()
    batch = make_batch(synthetic_wav, lens=(4800, 4000))
    out = obj(batch)
    obj._gen = torch.Generator().manual_seed(7)  # the same distractors again
    z, frames = obj.features(batch["audio"], batch["audio_lens"])
    T = z.shape[1]
    valid = torch.arange(T)[None] < frames[:, None]
    qo = obj.quantize(z, valid)
    c = obj.context(qo.x)
    neg = obj.sample_negatives(frames, T)
    pred = obj.step_proj(c).view(2, T, 2, -1)
    total, pairs = 0.0, 0
    for b in range(2):
        for t in range(T):
            for k in range(2):
                tgt = t + obj.offset + k
                if tgt >= int(frames[b]):
                    continue
                assert neg[b, tgt].tolist().count(tgt) == 0 and max(neg[b, tgt].tolist()) < int(frames[b])
                p = pred[b, t, k]
                total += F.softplus(-(p @ qo.x[b, tgt])).item()
                total += sum(F.softplus(p @ qo.x[b, j]).item() for j in neg[b, tgt].tolist())
                pairs += 1
    assert out.sample_size == pairs
    assert out.logs["contrastive"] == pytest.approx(total / pairs, rel=1e-4)
    assert out.loss.item() == pytest.approx(total / pairs + qo.loss.item(), rel=1e-4)


def test_codes_are_deterministic_per_frame_with_padding(synthetic_wav):
    for kind in ("gumbel", "kmeans"):
        obj = _vq(kind)
        obj.train()
        batch = make_batch(synthetic_wav, lens=(9600, 8000))
        codes = obj.codes(batch["audio"], batch["audio_lens"])
        frames = obj.encoder.num_frames(batch["audio_lens"])
        assert codes.shape == (2, int(obj.encoder.num_frames(torch.tensor([9600]))), 2) and codes.dtype == torch.long
        assert torch.all(codes[1, int(frames[1]):] == PAD_ID) and torch.all(codes[0] >= 0) and codes.max() < 16
        assert torch.equal(codes, obj.codes(batch["audio"], batch["audio_lens"])) and obj.quantizer.training


@pytest.mark.parametrize("kind", ["gumbel", "kmeans"])
def test_loss_falls_and_gradients_reach_cnn_quantizer_context(synthetic_wav, kind):
    obj = _vq(kind, seed=0, latent_temp=(2.0, 0.5, 0.99))
    batch = make_batch(synthetic_wav, lens=(9600, 8000))
    obj(batch).loss.backward()
    trained = ("encoder.feature_extractor", "quantizer", "context", "step_proj")
    for name, p in obj.named_parameters():
        if name.startswith(trained) and not name.endswith("codevectors"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        if name.startswith("encoder.layers"):  # the transformer is no part of vq-wav2vec
            assert p.grad is None, name
    if kind == "kmeans":
        assert obj.quantizer.codebook.grad.abs().sum() > 0
    obj.zero_grad()
    hist = train(obj, batch, 25, lr=2e-3)
    # from 11 ln 2 = 7.6 at zero scores down to about the floor of a predictor that ignores its context,
    # ln 11 + 10 ln 1.1 = 3.35 for 10 distractors; in 25 updates on this batch it gets no further than that
    assert hist[-1]["contrastive"] < 0.6 * hist[0]["contrastive"] and hist[-1]["contrastive"] < 3.6
    assert all(1.0 <= h["code_perplexity"] <= 32 for h in hist)


def test_rejects_fbank_encoder_and_bad_options():
    with pytest.raises(ValueError, match="frontend 'cnn'"):
        build_objective("vq_wav2vec", build_encoder("tiny_bestrq", num_layers=1))
    with pytest.raises(ValueError, match="quantizer"):
        _vq("product")
    with pytest.raises(ValueError, match="context_layers"):
        _vq(context_layers=[[32, 3, 2]])


def test_resume_through_the_trainer_is_exact(manifest, tmp_path):  # noqa: F811
    """4 steps with checkpoints at 2 and 4; roll back to step 2 as a crash would, resume: identical losses."""
    from pathlib import Path

    from speechssl.config import load_config
    from speechssl.train.pretrain import PretrainConfig

    conf = Path(__file__).resolve().parents[1] / "conf" / "pretrain" / "vq_wav2vec.yaml"
    sets = [f"data.train=[{manifest}]", "data.max_duration=3.0", "data.num_buckets=2", "trainer.max_steps=4",
            "trainer.log_every=1", "trainer.progress=false", "trainer.eval_every=0", "trainer.ckpt_every=2",
            "trainer.num_workers=0", "schedule.warmup_ratio=0.0", "schedule.warmup_steps=1",
            "objective.kwargs.context_layers=[[32,2,1],[32,3,1]]", "objective.kwargs.num_vars=16"]
    sets += [f"model.overrides.{k}={v}" for k, v in CNN_TINY.items() if k != "conv_layers"]
    sets.append("model.overrides.conv_layers=[[32,10,5],[32,8,4],[32,4,2],[32,4,2],[32,4,2]]")
    cfg = load_config(PretrainConfig, conf, sets)
    out = tmp_path / "vq"
    assert_resume_exact(cfg, out)
    # the units of the exported run: the objective rebuilt from final/ with the saved quantizer and context
    from speechssl.models.objectives.vq_wav2vec import VqWav2VecObjective

    obj = VqWav2VecObjective.from_pretrained(out / "final")
    assert not obj.training and obj.encoder.num_layers == 2
    wav = torch.from_numpy(make_wav(8000))[None]
    codes = obj.codes(wav)
    assert codes.shape == (1, int(obj.encoder.num_frames(torch.tensor([8000]))), 2) and codes.max() < 16
    heads = {k: v for k, v in obj.state_dict().items() if not k.startswith("encoder.")}
    from speechssl.models.io import load_checkpoint_parts

    saved = load_checkpoint_parts(out / "final")["objective"]
    assert sorted(saved) == sorted(heads) and all(torch.equal(saved[k], heads[k]) for k in heads)


def test_two_processes_train_identically(tmp_path):
    """DDP over 2 gloo processes: both ranks end with the same weights."""
    assert_ddp_ranks_agree(tmp_path, "vq_wav2vec", "tiny_wav2vec2", CNN_TINY, dict(SMALL_VQ, quantizer="kmeans"),
                           find_unused=True)
