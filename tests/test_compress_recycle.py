"""Recycle-and-Distill: attention-map-reusing layers, the student built from a teacher, masking distillation,
export/load, the HF refusal and the `speechssl distill` run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_compress_distill import micro  # the tiny HuBERT/WavLM teachers

from speechssl.compress.recycle import (
    MaskingDistiller, alternate_reuse, build_recycle_student, masking_distill_loss,
)
from speechssl.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


BATCH = {"audio": 0.1 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(1)),
         "audio_lens": torch.tensor([8000, 5600])}


def test_reusing_layer_has_no_query_key_parameters():
    teacher = micro()
    student = build_recycle_student(teacher)
    assert student.config.attn_reuse == alternate_reuse(4) == [-1, 0, -1, 2]
    for i in (1, 3):
        names = {n for n, _ in student.layers[i].attention.named_parameters()}
        assert names == {"v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias"}
    assert "qkv.weight" in dict(student.layers[0].attention.named_parameters())
    saved = sum(p.numel() for p in teacher.parameters()) - sum(p.numel() for p in student.parameters())
    assert saved == 2 * 2 * (64 * 64 + 64)  # q and k (weight + bias) of two layers
    # initialised from the teacher: the value rows of the fused qkv
    assert torch.equal(student.layers[1].attention.v_proj.weight, teacher.layers[1].attention.qkv.weight[128:])
    assert torch.equal(student.layers[0].attention.qkv.weight, teacher.layers[0].attention.qkv.weight)


def _attention_by_hand(attn, x, valid):
    """Softmax(QK^T / sqrt(Dh)) of a computing layer, masked keys excluded: [B, H, T, T]."""
    B, T, _ = x.shape
    q, k, _ = attn.qkv(x).view(B, T, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / attn.head_dim ** 0.5
    return scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)


@pytest.mark.parametrize("model_type", ["hubert", "wavlm"])
def test_reused_map_output_matches_recomputation_by_hand(model_type):
    student = build_recycle_student(micro(model_type), [-1, 0, 0, -1]).eval()
    with torch.no_grad():
        out = student(BATCH["audio"], BATCH["audio_lens"], output_attentions=True)
        valid = ~out.padding_mask
        h = out.hidden_states
        if model_type == "hubert":  # no position bias: layer 0's map is plain scaled dot-product attention
            assert torch.allclose(out.attentions[0], _attention_by_hand(student.layers[0].attention, h[0], valid),
                                  atol=1e-5)
        amap = out.attentions[0]
        assert torch.equal(out.attentions[1], amap) and torch.equal(out.attentions[2], amap)
        for i in (1, 2):  # post-LN layer applying layer 0's map to its own values, by hand
            layer = student.layers[i]
            a = layer.attention
            B, T, _ = h[i].shape
            v = a.v_proj(h[i]).view(B, T, a.heads, a.head_dim).transpose(1, 2)
            att = a.out_proj((amap @ v).transpose(1, 2).reshape(B, T, -1))
            x = layer.layer_norm(h[i] + att)
            ffn = layer.feed_forward.output_dense(F.gelu(layer.feed_forward.intermediate_dense(x)))
            expect = layer.final_layer_norm(x + ffn)
            assert torch.allclose(h[i + 1], expect, atol=1e-5)


def test_attn_reuse_config_is_validated_naming_the_key():
    with pytest.raises(ConfigError, match=r"attn_reuse\[1\]"):
        micro(attn_reuse=[-1, 2, -1, -1])  # a later layer
    with pytest.raises(ConfigError, match=r"attn_reuse\[2\]"):
        micro(attn_reuse=[-1, 0, 1, -1])  # a layer that itself reuses
    with pytest.raises(ConfigError, match="entries"):
        micro(attn_reuse=[-1, 0])
    with pytest.raises(ConfigError, match="layerdrop"):
        micro(attn_reuse=[-1, 0, -1, 2], layerdrop=0.1)


def test_masking_loss_splits_frames_and_ignores_padding():
    pred = torch.zeros(1, 4, 2)
    clean = torch.ones(1, 4, 2)
    masked_t = torch.full((1, 4, 2), 2.0)
    valid = torch.tensor([[True, True, True, False]])
    masked = torch.tensor([[True, False, False, True]])  # the padded frame is "masked" but never counts
    lm, lu = masking_distill_loss(pred, clean, masked_t, valid, masked)
    assert lm.item() == pytest.approx(1.0 / 3) and lu.item() == pytest.approx(2 * 4.0 / 3)


def test_masking_distillation_reduces_loss_on_a_fixed_batch():
    teacher = micro()
    model = MaskingDistiller(build_recycle_student(teacher), teacher, mask_prob=0.5, mask_length=4).train()
    assert model.weights == [0.1, 0.1, 0.1, 1.0]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(3)  # the same mask every step
        out = model(BATCH)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert 0.2 < out.logs["mask_frac"] < 0.8
    assert losses[-1] < 0.6 * losses[0]


def test_export_load_round_trip_and_hf_refused(tmp_path):
    from speechssl.models.io import export_pretrained, load_pretrained

    student = build_recycle_student(micro("wavlm")).eval()
    export_pretrained(student, tmp_path / "s", format="speechssl")
    loaded = load_pretrained(tmp_path / "s")
    assert loaded.config.attn_reuse == [-1, 0, -1, 2]
    with torch.no_grad():
        a = student(BATCH["audio"], BATCH["audio_lens"]).hidden_states[-1]
        b = loaded(BATCH["audio"], BATCH["audio_lens"]).hidden_states[-1]
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="attn_reuse"):
        export_pretrained(student, tmp_path / "hf", format="hf")


def test_recycle_configs_and_distill_cli(tmp_path):
    from speechssl.cli.main import main
    from speechssl.compress.distill import DistillConfig
    from speechssl.config import load_config
    from speechssl.data.synthetic import write_synthetic_cuts
    from speechssl.models.io import export_pretrained, load_pretrained

    for path in ("conf/distill/recycle.yaml", "conf/distill/mini_recycle.yaml"):
        assert load_config(DistillConfig, path, ["teacher=x"]).loss.method == "recycle"
    cuts = write_synthetic_cuts(tmp_path / "data", num_cuts=6, min_duration=0.5, max_duration=1.0)
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    export_pretrained(micro("hubert", num_layers=3), tmp_path / "teacher", format="speechssl")
    (tmp_path / "empty.yaml").write_text("{}\n")
    out = tmp_path / "recycle"
    rc = main(["distill", "--out", str(out), "--config", str(tmp_path / "empty.yaml"),
               "--set", f"teacher={tmp_path / 'teacher'}", "--set", f"data.train=[{tmp_path / 'cuts.jsonl.gz'}]",
               "--set", "data.max_duration=2", "--set", "trainer.num_workers=0", "--set", "trainer.log_every=1",
               "--set", "trainer.progress=false", "--set", "loss.method=recycle",
               "--set", "loss.target_layers=[1,2,3]", "--set", "loss.mask_length=2", "--set", "trainer.max_steps=2"])
    assert rc == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "masked_3" in last and "unmasked_1" in last
    student = load_pretrained(out / "final")
    assert student.num_layers == 3 and student.config.attn_reuse == [-1, 0, -1]
    assert json.loads((out / "final" / "config.json").read_text())["meta"]["method"] == "recycle_and_distill"
