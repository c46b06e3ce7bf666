"""Speaker DINO: multi-crop segments lie inside their utterance, the loss matches a hand computation and falls on a
fixed batch, only the student gets gradients, the teacher follows the EMA formula (checked by hand) through the
trainer's set_step, the center moves by its momentum, and pretraining resumes exactly with teacher and center in
the checkpoint."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from test_pretrain import CNN_SMALL, manifest  # noqa: F401 - the synthetic cuts (a fixture)
from test_resume import _losses

from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective
from speechssl.models.objectives.dino import DinoObjective, multi_crop, stats_pool

HEAD = {"embed_dim": 32, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16, "long_seconds": 1.0,
        "short_seconds": 0.5, "short_crops": 2}


def _objective(**kw) -> DinoObjective:
    torch.manual_seed(0)
    return build_objective("dino", build_encoder("tiny_hubert", **CNN_SMALL), **{**HEAD, **kw})


def _batch(B: int = 3, S: int = 24000) -> dict:
    from conftest import make_wav

    audio = torch.from_numpy(np.stack([make_wav(S, seed=i) for i in range(B)]))
    return {"audio": audio, "audio_lens": torch.tensor([S - 6000 * i for i in range(B)])}


def test_multi_crop_segments_come_from_their_utterance():
    audio = torch.arange(3 * 100, dtype=torch.float32).view(3, 100) + 1  # values encode (utterance, sample)
    lens = torch.tensor([100, 60, 20])
    crops, seg = multi_crop(audio, lens, 30 / 16000, 2, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 30) and seg.tolist() == [30, 30, 20] * 2
    for row in range(6):
        b, n = row % 3, int(seg[row])
        x = crops[row, :n]
        start = int(x[0] - 1 - 100 * b)
        assert torch.equal(x, audio[b, start:start + n]) and start + n <= int(lens[b])  # inside the valid part
        assert (crops[row, n:] == 0).all()


def test_dino_loss_by_hand():
    obj = _objective(out_dim=2)
    obj.center.copy_(torch.tensor([0.5, 0.0]))
    obj.step = 10**6  # past the warm-up: teacher temperature 0.07
    teacher = torch.tensor([[0.5, 0.0], [1.0, 0.0]])  # 2 long crops of one utterance
    student = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2]])  # 2 long + 1 short
    t = [torch.softmax((teacher[i] - obj.center) / 0.07, -1) for i in range(2)]
    s = [torch.log_softmax(student[j] / 0.1, -1) for j in range(3)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(float(-(t[i] * s[j]).sum()) for i, j in pairs) / 4
    assert float(obj.dino_loss(student, teacher, 3, 2)) == pytest.approx(expected, rel=1e-6)
    # teacher 0 minus the center is uniform: its part is log 2 against a uniform student
    assert float(-(t[0] * s[0]).sum()) == pytest.approx(math.log(2), rel=1e-6)


def test_teacher_temperature_and_momentum_schedules():
    obj = _objective(teacher_temp_warmup_steps=10, momentum_steps=100)
    obj.step = 5
    assert obj.teacher_temperature() == pytest.approx(0.055)  # halfway from 0.04 to 0.07
    assert obj.momentum(0) == pytest.approx(0.996) and obj.momentum(50) == pytest.approx(0.998)
    assert obj.momentum(100) == pytest.approx(1.0)


def test_gradients_reach_the_student_only_and_ema_by_hand():
    obj = _objective(teacher_momentum=0.9)
    obj.train()
    out = obj(_batch())
    out.loss.backward()
    for name in ("encoder.layers.0.attention.qkv.weight", "encoder.feature_extractor.conv_layers.0.conv.weight",
                 "embed.proj.weight", "head.mlp.0.weight", "head.prototypes"):
        g = dict(obj.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None for p in obj.teacher_parameters())
    assert not obj.teacher_encoder.training and obj.encoder.training
    # an optimiser step moves the student; set_step(1) then applies teacher <- 0.9 teacher + 0.1 student
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    t_before = obj.teacher_embed.proj.weight.detach().clone()
    s_now = obj.embed.proj.weight.detach().clone()
    assert not torch.equal(t_before, s_now)
    obj.set_step(1)
    assert torch.allclose(obj.teacher_embed.proj.weight, 0.9 * t_before + 0.1 * s_now, atol=1e-7)
    assert int(obj.ema_updates) == 1
    obj.set_step(1)  # the same update again (a skipped step): no second EMA
    assert torch.allclose(obj.teacher_embed.proj.weight, 0.9 * t_before + 0.1 * s_now, atol=1e-7)


def test_center_moves_by_its_momentum():
    obj = _objective()
    obj.train()
    teacher = torch.randn(6, 64)
    obj.update_center(teacher)
    assert torch.allclose(obj.center, 0.1 * teacher.mean(0), atol=1e-6)
    obj.eval()
    before = obj.center.clone()
    obj(_batch(B=2))
    assert torch.equal(obj.center, before)  # evaluation leaves it alone


def test_loss_falls_on_a_fixed_batch():
    # teacher and center held (momenta 1): the student alone must move towards the teacher's targets (with both
    # moving, DINO's loss may rise while the center flattens the teacher)
    obj = _objective(seed=0, teacher_momentum=1.0, center_momentum=1.0, short_crops=1)
    obj.train()
    batch = _batch(B=2)
    opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(12):
        obj.set_step(step)
        obj._gen.manual_seed(0)  # the same crops every time
        out = obj(batch)
        # CE(t, s) = H(t) + KL(t || s) and every teacher crop is in as many pairs: the KL is what the student cuts
        losses.append(float(out.loss.detach()) - out.logs["teacher_entropy"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_stats_pool_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    pooled = stats_pool(x, torch.tensor([[False, False, True]]))
    assert pooled.tolist() == [[2.0, 1.0]]


@pytest.mark.slow
def test_resume_exact_with_teacher_and_center(manifest, tmp_path):  # noqa: F811 - the fixture imported above
    from safetensors.torch import load_file

    from speechssl.config import from_dict
    from speechssl.train.pretrain import PretrainConfig, run_pretrain

    cfg = from_dict(PretrainConfig, {
        "data": {"train": [str(manifest)], "max_duration": 4.0, "num_buckets": 2},
        "model": {"preset": "tiny_hubert", "overrides": CNN_SMALL},
        "objective": {"name": "dino", "kwargs": {**HEAD, "teacher_temp_warmup_steps": 2, "momentum_steps": 4}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "linear", "warmup_steps": 1},
        "trainer": {"max_steps": 4, "log_every": 1, "ckpt_every": 2, "num_workers": 0, "progress": False}})
    out = tmp_path / "dino"
    run_pretrain(cfg, out)
    ref = _losses(out)
    state2 = load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    assert int(state2["ema_updates"]) == 1 and state2["center"].abs().sum() > 0  # teacher state is saved
    assert "teacher_encoder.layers.0.attention.qkv.weight" in state2
    final = load_file(str(out / "checkpoints" / "step-4" / "model.safetensors"))
    shutil.rmtree(out / "checkpoints" / "step-4")
    shutil.rmtree(out / "final")
    run_pretrain(cfg, out, resume=True)
    assert len(ref) == 4 and _losses(out) == ref
    again = load_file(str(out / "checkpoints" / "step-4" / "model.safetensors"))
    for k in ("center", "teacher_embed.proj.weight", "embed.proj.weight"):
        assert torch.equal(final[k], again[k]), k
    # the exported extractor: teacher weights from the objective part, scored on trials over the same cuts
    from lhotse import CutSet

    from speechssl.superb.embeddings import dino_extractor, evaluate

    wav = torch.from_numpy(np.stack([np.zeros(16000, np.float32)]))
    extract, n_params = dino_extractor(out / "final", "teacher")
    teacher = extract(wav, torch.tensor([16000]))
    student = dino_extractor(out / "final", "student")[0](wav, torch.tensor([16000]))
    assert teacher.shape == (1, 32) and not torch.allclose(teacher, student)
    # the CNN encoder has no buffers: every teacher_encoder / teacher_embed entry is a parameter
    assert n_params == sum(v.numel() for k, v in again.items() if k.startswith(("teacher_encoder.", "teacher_embed.")))
    ids = [c.id for c in CutSet.from_file(manifest)]
    trials = tmp_path / "trials.txt"
    trials.write_text("".join(f"{int(i % 2 == j % 2)} {ids[i]} {ids[j]}\n" for i in range(4) for j in range(4, 8)))
    rec = evaluate(str(out / "final"), manifest, trials, tmp_path / "asv", name="dino")
    assert rec["task"] == "asv" and rec["upstream"] == "dino" and 0.0 <= rec["value"] <= 1.0
    assert rec["scores"]["num_trials"] == 16 and (tmp_path / "asv" / "results.json").is_file()


def test_score_trials_by_hand():
    from speechssl.superb.embeddings import score_trials

    emb = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.8, 0.6]), "c": torch.tensor([0.0, 1.0])}
    # scores: a-b 0.8 (target), a-c 0.0 (non-target), b-c 0.6 (non-target): a threshold in (0.6, 0.8) splits them
    got = score_trials(emb, [(1, "a", "b"), (0, "a", "c"), (0, "b", "c")])
    assert got["eer"] == 0.0 and got["num_trials"] == 3
    swapped = score_trials(emb, [(0, "a", "b"), (1, "a", "c"), (1, "b", "c")])
    assert swapped["eer"] >= 0.5  # every target scores below the non-target: no better than chance
    with pytest.raises(ValueError, match="no embedding"):
        score_trials(emb, [(1, "a", "zz")])


@pytest.mark.slow
def test_two_processes_train_identically(tmp_path):
    """DDP over 2 gloo processes through the shared trainer: both ranks end with the same student, teacher (EMA of
    identical students) and center (``trainer.ddp_find_unused`` on: DINO never uses the mask embedding)."""
    from _objective_checks import assert_ddp_ranks_agree

    assert_ddp_ranks_agree(tmp_path, "dino", "tiny_hubert", CNN_SMALL, {**HEAD, "short_crops": 1}, find_unused=True)
