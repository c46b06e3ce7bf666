"""Distillation: DistilHuBERT student construction, padding-free loss, layer-to-layer maps, the distill/prune runs."""
from __future__ import annotations

import json

import pytest
import torch

from speechssl.compress.distill import (
    HeadDistiller, LayerDistiller, build_distilhubert_student, copy_teacher, distill_loss,
)
from speechssl.models import build_encoder

MICRO_CONV = [[32, 10, 5], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 2, 2], [32, 2, 2]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def micro(model_type="hubert", **kw):
    base = dict(model_type=model_type, num_layers=4, hidden_size=64, num_heads=4, ffn_dim=128,
                conv_layers=[list(c) for c in MICRO_CONV], conv_pos=16, conv_pos_groups=4, dropout=0.0,
                attention_dropout=0.0, feature_dropout=0.0, relative_position=model_type == "wavlm",
                num_buckets=32, max_distance=64)
    base.update(kw)
    torch.manual_seed(0)
    return build_encoder(base).eval()


def test_distill_loss_ignores_padded_frames():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    valid = torch.arange(10)[None] < torch.tensor([10, 6])[:, None]
    loss, l1, cos = distill_loss(pred, target, valid)
    pred2, target2 = pred.clone(), target.clone()
    pred2[1, 6:] = 1e3 * torch.randn(4, 8)
    target2[1, 6:] = -7.0
    loss2, _, _ = distill_loss(pred2, target2, valid)
    assert torch.equal(loss, loss2)
    # value check against a direct computation on the valid frames
    p, t = pred[valid], target[valid]
    ref = (p - t).abs().mean() - torch.nn.functional.logsigmoid(torch.nn.functional.cosine_similarity(p, t, -1)).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    neg, _, _ = distill_loss(pred, target, valid, cos_type="neg")
    assert torch.allclose(neg, (p - t).abs().mean() - torch.nn.functional.cosine_similarity(p, t, -1).mean())
    with pytest.raises(ValueError, match="no valid frames"):
        distill_loss(pred, target, torch.zeros(2, 10, dtype=torch.bool))


def test_student_copies_teacher_front_end_and_first_layers():
    teacher = micro("wavlm")
    student = build_distilhubert_student(teacher, num_layers=2, feature_grad_mult=0.1).eval()
    assert student.num_layers == 2 and student.config.feature_grad_mult == 0.1
    wav = 0.1 * torch.randn(2, 8000)
    lens = torch.tensor([8000, 5000])
    with torch.no_grad():
        t, s = teacher(wav, lens), student(wav, lens)
    for i in range(3):  # hidden states 0..2 are the same computation
        assert torch.allclose(t.hidden_states[i], s.hidden_states[i], atol=1e-6)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ValueError, match="num_layers"):
        build_distilhubert_student(teacher, num_layers=9)


def test_head_distiller_loss_independent_of_padding_values_and_teacher_frozen():
    # layer-norm CNN + pre-LN: valid frames never see padded samples, so padding values cannot leak in
    teacher = micro("wav2vec2", extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True)
    student = build_distilhubert_student(teacher, num_layers=2)
    model = HeadDistiller(student, teacher, target_layers=[2, 4]).eval()
    torch.manual_seed(1)
    wav = 0.1 * torch.randn(2, 9000)
    lens = torch.tensor([9000, 5000])
    wav[1, 5000:] = 0.0
    step = model({"audio": wav, "audio_lens": lens})
    loss1, logs = step.loss, step.logs
    wav2 = wav.clone()
    wav2[1, 5000:] = torch.randn(4000)  # garbage in the padding
    loss2 = model({"audio": wav2, "audio_lens": lens}).loss
    assert abs(loss1.item() - loss2.item()) < 1e-5
    assert {"loss", "l1_2", "cos_2", "l1_4", "cos_4"} <= set(logs)
    model.train()
    loss = model({"audio": wav, "audio_lens": lens}).loss
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p is q for p in model.parameters() for q in teacher.parameters())  # teacher not in the tree
    assert student.layers[0].attention.qkv.weight.grad is not None
    assert "teacher" not in "".join(model.state_dict())


def test_layer_distiller_identity_maps_start_at_optimum():
    teacher = micro("hubert")
    model = LayerDistiller(copy_teacher(teacher), teacher, student_layers=[0, 2, 4], cos_type="neg").eval()
    wav = 0.1 * torch.randn(2, 8000)
    step = model({"audio": wav, "audio_lens": torch.tensor([8000, 6000])})
    loss, logs = step.loss, step.logs
    assert abs(loss.item() - (-3.0)) < 1e-4  # L1 = 0 and cos = 1 for each of 3 pairs
    assert logs["l1_2"] < 1e-5
    with pytest.raises(ValueError, match="out of range"):
        LayerDistiller(copy_teacher(teacher), teacher, student_layers=[0, 7])


def _tiny_setup(tmp_path):
    from speechssl.data.synthetic import write_synthetic_cuts
    from speechssl.models.io import export_pretrained

    cuts = write_synthetic_cuts(tmp_path / "data", num_cuts=6, min_duration=0.5, max_duration=1.0)
    manifest = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(manifest)
    export_pretrained(micro("hubert", num_layers=3), tmp_path / "teacher", format="speechssl")
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    common = ["--config", str(cfg), "--set", f"teacher={tmp_path / 'teacher'}", "--set",
              f"data.train=[{manifest}]", "--set", "data.max_duration=2", "--set", "trainer.num_workers=0",
              "--set", "trainer.log_every=1", "--set", "trainer.progress=false"]
    return common


def test_distill_cli_end_to_end(tmp_path):
    from speechssl.cli.main import main
    from speechssl.models.io import load_pretrained

    common = _tiny_setup(tmp_path)
    out = tmp_path / "distil"
    rc = main(["distill", "--out", str(out), *common, "--set", "loss.target_layers=[1,2,3]",
               "--set", "trainer.max_steps=3"])
    assert rc == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and "l1_3" in lines[-1]
    student = load_pretrained(out / "final")
    assert student.num_layers == 2
    meta = json.loads((out / "final" / "config.json").read_text())["meta"]
    assert meta["method"] == "distilhubert"
    o = student(0.1 * torch.randn(1, 8000), torch.tensor([8000]))
    assert len(o.hidden_states) == 3 and o.lengths.tolist() == [student.num_frames(torch.tensor([8000])).item()]
    # a config error names the key
    assert main(["distill", "--out", str(tmp_path / "bad"), *common, "--set", "loss.target_layers=[9]"]) == 2


def test_prune_cli_end_to_end_and_resume(tmp_path):
    from speechssl.cli.main import main
    from speechssl.models.io import load_pretrained

    common = _tiny_setup(tmp_path)
    out = tmp_path / "prune"
    args = ["prune", "--out", str(out), *common, "--set", "trainer.max_steps=5", "--set", "prune.warmup_steps=2",
            "--set", "prune.gate_lr=0.5", "--set", "prune.target=0.4", "--set", "finetune.max_steps=2"]
    assert main(args) == 0
    summary = json.loads((out / "pruned" / "prune_summary.json").read_text())
    pruned = load_pretrained(out / "final")
    assert sum(p.numel() for p in pruned.parameters()) == summary["params"]
    assert pruned.config.layer_heads is not None and pruned.config.layer_ffn_dims is not None
    assert (out / "stage1" / "metrics.jsonl").is_file() and (out / "metrics.jsonl").is_file()
    s1 = [json.loads(l) for l in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert {"sparsity", "target_sparsity", "lambda1", "expected_params"} <= set(s1[-1])
    # resume: both stages are done, nothing is retrained and the final model is unchanged
    before = (out / "final" / "model.safetensors").read_bytes()
    assert main(args + ["--resume"]) == 0
    assert (out / "final" / "model.safetensors").read_bytes() == before
    # finetune.max_steps=0: the materialised model is the final one
    out0 = tmp_path / "prune0"
    args0 = [a if a != str(out) else str(out0) for a in args] + ["--set", "finetune.max_steps=0"]
    assert main(args0) == 0
    assert (out0 / "final" / "model.safetensors").read_bytes() == (out0 / "pruned" / "model.safetensors").read_bytes()


def test_hf_teacher_distils_and_prunes(tmp_path):
    transformers = pytest.importorskip("transformers")
    from speechssl.compress.distill import load_teacher
    from speechssl.compress.materialize import materialize
    from speechssl.compress.prune import PruningGates

    cfg = transformers.HubertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                    conv_dim=[32] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    transformers.HubertModel(cfg).save_pretrained(tmp_path / "hf")
    teacher = load_teacher(str(tmp_path / "hf"))
    assert teacher.num_layers == 3 and not teacher.training
    model = HeadDistiller(build_distilhubert_student(teacher, 1), teacher, target_layers=[1, 3])
    step = model({"audio": 0.1 * torch.randn(2, 8000), "audio_lens": torch.tensor([8000, 7000])})
    loss, logs = step.loss, step.logs
    assert torch.isfinite(loss) and "l1_3" in logs
    g = PruningGates(teacher)
    with torch.no_grad():
        for p in g.log_alpha_parameters():
            p.normal_(0.0, 3.0)
    gates = g.eval()()
    small = materialize(teacher, gates)
    wav = 0.1 * torch.randn(1, 8000)
    with torch.no_grad():
        assert (teacher(wav, gates=gates).hidden_states[-1] - small(wav).hidden_states[-1]).abs().max() < 1e-5


def test_configs_validate_and_name_keys():
    from speechssl.compress.distill import DistillConfig
    from speechssl.compress.prune import PruneConfig
    from speechssl.config import ConfigError, load_config

    for cls in (DistillConfig, PruneConfig):
        with pytest.raises(ConfigError, match="teacher"):
            load_config(cls, None, [])
    with pytest.raises(ConfigError, match="prune.target"):
        load_config(PruneConfig, None, ["teacher=x", "prune.target=1.5"])
    with pytest.raises(ConfigError, match="prune.groups"):
        load_config(PruneConfig, None, ["teacher=x", "prune.groups=[heads,channels]"])
    with pytest.raises(ConfigError, match="loss.method"):
        load_config(DistillConfig, None, ["teacher=x", "loss.method=attention"])
    for path in ("conf/distill/distilhubert.yaml", "conf/distill/mini_distilhubert.yaml"):
        assert load_config(DistillConfig, path, ["teacher=x"]).loss.method == "heads"
    ref = load_config(PruneConfig, "conf/prune/dphubert.yaml", ["teacher=x"])
    assert (ref.prune.target, ref.prune.warmup_steps, ref.trainer.max_steps, ref.finetune.max_steps) == (
        0.75, 5000, 50000, 25000)
    assert load_config(PruneConfig, "conf/prune/mini_dphubert.yaml", ["teacher=x"]).prune.target == 0.5


def test_head_distillation_reduces_loss():
    teacher = micro("hubert")
    torch.manual_seed(0)
    model = HeadDistiller(build_distilhubert_student(teacher, 2), teacher, target_layers=[2, 4]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = {"audio": 0.1 * torch.randn(2, 8000), "audio_lens": torch.tensor([8000, 6400])}
    losses = []
    for _ in range(25):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_prune_stage1_resume_is_exact(tmp_path):
    """2 steps + resume + 2 steps == 4 steps straight: gates are sampled from the restored RNG state."""
    import shutil

    from speechssl.cli.main import main

    common = _tiny_setup(tmp_path)
    base = [*common, "--set", "prune.warmup_steps=2", "--set", "prune.gate_lr=0.5", "--set", "finetune.max_steps=0",
            "--set", "trainer.ckpt_every=2"]
    assert main(["prune", "--out", str(tmp_path / "a"), *base, "--set", "trainer.max_steps=4"]) == 0
    assert main(["prune", "--out", str(tmp_path / "b"), *base, "--set", "trainer.max_steps=2"]) == 0
    shutil.rmtree(tmp_path / "b" / "pruned")  # as if stopped inside stage 1
    assert main(["prune", "--out", str(tmp_path / "b"), *base, "--set", "trainer.max_steps=4", "--resume",
                 "--allow-schedule-change"]) == 0

    def losses(d):
        rows = [json.loads(l) for l in (d / "stage1" / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], round(r["loss"], 5), round(r["sparsity"], 6)) for r in rows if r.get("split") == "train"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert (tmp_path / "a" / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "final" / "model.safetensors").read_bytes()
