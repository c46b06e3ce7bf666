"""OS-KDFT: AAM-softmax by hand, branch separation of the KD and FT losses, loss falls, CLI run and export."""
from __future__ import annotations

import json
import math

import pytest
import torch

from speechssl.compress.oskdft import OSKDFT, OskdftStudent
from speechssl.compress.speaker_heads import AAMSoftmax, XVectorHead
from speechssl.models import build_encoder

MICRO_CONV = [[32, 10, 5], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 2, 2], [32, 2, 2]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def micro(num_layers=4, **kw):
    base = dict(model_type="hubert", num_layers=num_layers, hidden_size=32, num_heads=4, ffn_dim=64,
                conv_layers=[list(c) for c in MICRO_CONV], conv_pos=16, conv_pos_groups=4, dropout=0.0,
                attention_dropout=0.0, feature_dropout=0.0)
    base.update(kw)
    torch.manual_seed(0)
    return build_encoder(base).eval()


def _batch(b=4):
    torch.manual_seed(1)
    lens = torch.tensor([8000, 7000, 6000, 8000][:b])
    audio = 0.1 * torch.randn(b, 8000)
    audio[1, 7000:] = 0.0
    audio[2, 6000:] = 0.0
    return {"audio": audio, "audio_lens": lens, "speaker": ["a", "b", "a", "c"][:b]}


def _model(ft_lower_grad=0.0, **kw):
    teacher = micro()
    torch.manual_seed(0)
    student = OskdftStudent(teacher, kd_layers=2, ft_layers=1, embed_dim=16, head_channels=32)
    return OSKDFT(student, teacher, {"a": 0, "b": 1, "c": 2}, 4, ft_lower_grad=ft_lower_grad, **kw)


def test_aam_softmax_by_hand():
    aam = AAMSoftmax(2, 2, margin=0.3, scale=10.0)
    with torch.no_grad():
        aam.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[math.cos(0.5), math.sin(0.5)]])  # angle 0.5 to class 0, pi/2 - 0.5 to class 1
    logits = aam.logits(emb, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(0.5 + 0.3), abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(10 * math.cos(math.pi / 2 - 0.5), abs=1e-5)
    loss, acc = aam(emb, torch.tensor([0]))
    a, b = 10 * math.cos(0.8), 10 * math.cos(math.pi / 2 - 0.5)
    assert loss.item() == pytest.approx(-a + math.log(math.exp(a) + math.exp(b)), abs=1e-5)
    assert acc.item() == 1.0  # cos(0.8)=0.697 > cos(1.07)=0.479


def test_xvector_head_ignores_padding():
    torch.manual_seed(0)
    head = XVectorHead(8, 6, 16).eval()
    x = torch.randn(2, 12, 8)
    pad = torch.arange(12)[None] >= torch.tensor([12, 7])[:, None]
    e = head(x, pad)
    x2 = x.clone()
    x2[1, 7:] = 1e3
    assert torch.allclose(e, head(x2, pad), atol=1e-5) and e.shape == (2, 6)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    parts = {"lower": model.student.lower, "upper": model.student.upper, "head": model.student.head,
             "kd_map": model.kd_map, "aam": model.aam}
    return {k: sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None) for k, m in parts.items()}


def test_kd_reaches_only_lower_and_ft_only_upper_and_head():
    model = _model()
    kd, ft, _ = model.losses(_batch())
    g_kd = _grads(model, kd)
    assert g_kd["lower"] > 0 and g_kd["kd_map"] > 0
    assert g_kd["upper"] == 0 and g_kd["head"] == 0 and g_kd["aam"] == 0
    kd, ft, _ = model.losses(_batch())
    g_ft = _grads(model, ft)
    assert g_ft["upper"] > 0 and g_ft["head"] > 0 and g_ft["aam"] > 0
    assert g_ft["lower"] == 0 and g_ft["kd_map"] == 0
    # joint training (ft_lower_grad=1) lets the speaker loss into the lower layers
    joint = _model(ft_lower_grad=1.0)
    _, ft, _ = joint.losses(_batch())
    assert _grads(joint, ft)["lower"] > 0


def test_ft_weight_warms_up():
    model = _model(ft_warmup_steps=4)
    model.set_step(0)
    assert model.ft_weight() == 0.25
    model.set_step(10)
    assert model.ft_weight() == 1.0


def test_loss_falls_on_fixed_batch():
    model = _model().train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch()
    losses = []
    for _ in range(15):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(out.logs) >= {"kd_loss", "ft_loss", "spk_acc"}


def test_cli_trains_and_exports_an_embedding_extractor(tmp_path):
    from speechssl.cli.main import main
    from speechssl.data.synthetic import write_synthetic_cuts
    from speechssl.models.io import export_pretrained
    from speechssl.superb.embeddings import embed_cuts, model_extractor, score_trials

    cuts = write_synthetic_cuts(tmp_path / "data", num_cuts=6, min_duration=0.5, max_duration=1.0, num_speakers=3)
    manifest = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(manifest)
    export_pretrained(micro(num_layers=3), tmp_path / "teacher", format="speechssl")
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    out = tmp_path / "os"
    rc = main(["oskdft", "--config", str(cfg), "--out", str(out), "--set", f"teacher={tmp_path / 'teacher'}",
               "--set", f"data.train=[{manifest}]", "--set", "data.max_duration=2", "--set", "trainer.num_workers=0",
               "--set", "trainer.log_every=1", "--set", "trainer.progress=false", "--set", "trainer.max_steps=2",
               "--set", "student.embed_dim=8", "--set", "student.head_channels=16"])
    assert rc == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "ft_loss" in last and "kd_loss" in last
    extract, n_params = model_extractor(str(out / "final"))
    emb = embed_cuts(extract, list(cuts))
    assert n_params > 0 and all(e.shape == (8,) for e in emb.values())
    ids = [c.id for c in cuts]
    scores = score_trials(emb, [(1, ids[0], ids[0]), (0, ids[0], ids[1])])
    assert scores["eer"] == 0.0  # an utterance against itself scores 1, above any other pair
