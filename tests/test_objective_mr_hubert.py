"""MR-HuBERT: the 20/40/20 ms encoder's frame counts, the two-resolution loss learning, gradients reaching every
stack, the resampling blocks and both heads, and exact resume through ``speechssl pretrain``."""
from __future__ import annotations

import pytest
import torch
from _objective_checks import assert_resume_exact, metrics
from test_pretrain import CNN_SMALL, _cfg, manifest  # noqa: F401  (manifest is a fixture)

from speechssl.models import build_encoder
from speechssl.models.mr_encoder import MREncoder, low_res_frames
from speechssl.models.objectives import build_objective
from speechssl.train.contract import StepOutput

SMALL6 = {**CNN_SMALL, "num_layers": 3, "dropout": 0.0, "attention_dropout": 0.0, "feature_dropout": 0.0}
LENS = torch.tensor([16000, 12345, 8000])


def _objective(**kw):
    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", **SMALL6)
    return build_objective("mr_hubert", enc, num_classes=7, final_dim=32, mask_length=3, seed=0, **kw)


def _batch():
    g = torch.Generator().manual_seed(1)
    units = (torch.arange(49)[None].repeat(3, 1) // 3 + torch.arange(3)[:, None]) % 7
    return {"audio": torch.randn(3, 16000, generator=g), "audio_lens": LENS, "units": {"kmeans": units}}


def test_frame_counts_at_both_resolutions():
    obj = _objective()
    enc = obj.encoder
    assert isinstance(enc, MREncoder) and enc.stacks == (1, 1, 1) and enc.num_layers == 3
    # by hand: 16000 samples -> 3199, 1599, 799, 399, 199 (k3 s2 convs), 99, 49 (k2 s2): 20 ms frames
    # 12345 -> 2468, 1233, 616, 307, 153, 76, 38;  8000 -> 1599, 799, 399, 199, 99, 49, 24
    assert enc.num_frames(LENS).tolist() == [49, 38, 24]
    assert low_res_frames(enc.num_frames(LENS)).tolist() == [25, 19, 12]  # ceil(n / 2) at 40 ms
    enc.eval()
    with torch.no_grad():
        out = enc(_batch()["audio"], LENS)
    assert [h.shape[1] for h in out.hidden_states] == [49] * 4  # every layer on the 20 ms grid
    low = enc.low_resolution(out.hidden_states)
    assert low.shape == (3, 25, 64)
    assert torch.equal(out.hidden_states[2], low.repeat_interleave(2, 1)[:, :49])
    assert out.lengths.tolist() == [49, 38, 24]


def test_low_resolution_targets_are_every_other_label_and_masks_follow():
    obj = _objective()
    b = _batch()
    tg = obj.targets(b, 49)
    assert torch.equal(tg["kmeans@40ms"], b["units"]["kmeans"][:, ::2])
    out = obj(b)
    assert isinstance(out, StepOutput) and out.sample_size == out.logs["masked_frames"]
    # 40 ms frame j is masked when 20 ms frame 2j is: about half as many masked frames
    assert 0.35 * out.sample_size <= out.logs["masked_frames_40ms"] <= 0.65 * out.sample_size


def test_loss_falls_on_a_fixed_batch():
    obj = _objective()
    b = _batch()
    opt = torch.optim.Adam(obj.parameters(), lr=2e-3)
    first = None
    for _ in range(25):
        out = obj(b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.6 * first
    assert out.logs["acc_masked"] > 0.4 and out.logs["acc_masked_40ms"] > 0.4


def test_gradients_reach_every_stack_the_resampling_and_both_heads():
    obj = _objective()
    obj(_batch()).loss.backward()
    enc = obj.encoder
    for name in ("layers.0", "layers.1", "layers.2", "downsample.conv", "upsample.conv", "feature_extractor"):
        g = [p.grad for n, p in enc.named_parameters() if n.startswith(name)]
        assert g and all(x is not None and x.abs().sum() > 0 for x in g), name
    d = obj.final_dim
    w = obj.final_proj.weight.grad  # untied: rows [0, d) 20 ms head, [d, 2d) 40 ms head
    assert w[:d].abs().sum() > 0 and w[d:].abs().sum() > 0
    e = obj.label_embs.grad  # 7 embeddings per resolution
    assert e[:7].abs().sum() > 0 and e[7:].abs().sum() > 0


def test_without_the_low_resolution_loss_its_head_gets_no_gradient():
    obj = _objective(low_res_weight=0.0)
    obj(_batch()).loss.backward()
    assert obj.final_proj.weight.grad[obj.final_dim:].abs().sum() == 0


def test_options_are_checked():
    enc = build_encoder("tiny_hubert", **{**SMALL6, "num_layers": 4})
    with pytest.raises(ValueError, match="stacks"):
        build_objective("mr_hubert", enc, num_classes=7)
    with pytest.raises(ValueError, match="stacks"):
        build_objective("mr_hubert", enc, num_classes=7, stacks=[1, 1, 1])
    with pytest.raises(ValueError, match="one label set"):
        build_objective("mr_hubert", enc, num_classes={"a": 3, "b": 4}, stacks=[1, 2, 1])
    with pytest.raises(ValueError, match="adapter_kernel"):
        build_objective("mr_hubert", enc, num_classes=7, stacks=[1, 2, 1], adapter_kernel=2)


def test_pretrain_resumes_exactly(manifest, tmp_path):  # noqa: F811
    """4 steps with checkpoints at 2 and 4; roll back to step 2 as a crash would, resume: identical losses."""
    cfg = _cfg(manifest, "wavlm", steps=4, data={"max_duration": 3.0}, trainer={"ckpt_every": 2})
    cfg.model.preset, cfg.model.overrides = "tiny_hubert", {**CNN_SMALL, "num_layers": 3}
    cfg.objective.name = "mr_hubert"
    cfg.objective.kwargs = {"num_classes": {"l6": 5}, "final_dim": 32, "mask_length": 3}
    out = tmp_path / "mr"
    assert_resume_exact(cfg, out)
    rec = metrics(out)[-1]
    assert "acc_masked_40ms" in rec
    from safetensors import safe_open

    with safe_open(str(out / "final" / "model.safetensors"), framework="pt") as f:
        assert any(k.startswith("downsample.") for k in f.keys())


def test_model_directory_round_trip(tmp_path):
    """export_pretrained writes the layer order, load_pretrained builds the same MREncoder (same outputs)."""
    import json

    from speechssl.models.io import export_pretrained, load_pretrained

    enc = _objective().encoder.eval()
    export_pretrained(enc, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mr"]["stacks"] == list(enc.stacks)
    back = load_pretrained(tmp_path / "m")
    assert isinstance(back, MREncoder) and back.stacks == enc.stacks
    wav = _batch()["audio"]
    with torch.no_grad():
        assert torch.equal(enc(wav, LENS).last_hidden_state, back(wav, LENS).last_hidden_state)
