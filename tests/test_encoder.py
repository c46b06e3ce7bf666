"""Encoder family: shapes, frame arithmetic, WavLM buckets, batch invariance, gates, pruned layouts, presets."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from speechssl.config import ConfigError
from speechssl.models import Encoder, EncoderConfig, EncoderGates, build_encoder, get_preset, list_presets
from speechssl.models.components import relative_position_buckets

REPO = Path(__file__).resolve().parents[1]
SMALL_CONV = [[32, 10, 5], [32, 3, 2], [32, 3, 2], [32, 2, 2]]


def small_cfg(**kw) -> EncoderConfig:
    args = dict(model_type="hubert", conv_layers=[list(l) for l in SMALL_CONV], hidden_size=64, num_layers=2,
                num_heads=4, ffn_dim=96, conv_pos=8, conv_pos_groups=4, dropout=0.0, attention_dropout=0.0,
                feature_dropout=0.0, layerdrop=0.0)
    args.update(kw)
    return EncoderConfig(**args)


@pytest.mark.parametrize("name", ["tiny_hubert", "tiny_wav2vec2", "tiny_wavlm", "tiny_bestrq"])
def test_tiny_presets_forward_backward(name, synthetic_wav):
    torch.manual_seed(0)
    enc = build_encoder(name).train()
    wav = torch.stack([torch.from_numpy(synthetic_wav(8000, seed=s)) for s in range(2)])
    lens = torch.tensor([8000, 6001])
    mask = torch.zeros(2, int(enc.num_frames(torch.tensor([8000]))[0]), dtype=torch.bool)
    mask[:, 3:8] = True
    out = enc(wav, lens, mask_indices=mask)
    T = mask.shape[1]
    assert len(out.hidden_states) == enc.num_layers + 1
    assert all(h.shape == (2, T, enc.hidden_size) for h in out.hidden_states)
    assert out.lengths.tolist() == enc.num_frames(lens).tolist()
    assert out.padding_mask.sum(1).tolist() == [0, T - int(out.lengths[1])]
    assert out.extract_features.shape[:2] == (2, T) and out.features_pen.ndim == 0
    loss = out.last_hidden_state.pow(2).mean() + out.features_pen
    loss.backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert enc.mask_emb.grad.abs().sum() > 0  # masked frames used the mask embedding
    assert enc.downsample_rate == (640 if name == "tiny_bestrq" else 320)
    if name == "tiny_bestrq":
        assert out.input_features.shape == (2, T, 320)


@pytest.mark.parametrize("name", ["wav2vec2_base", "wav2vec2_large", "hubert_base", "hubert_large", "wavlm_base",
                                  "wavlm_large", "bestrq"])
def test_large_presets_build_on_meta_and_run_shapes(name):
    with torch.device("meta"):
        enc = build_encoder(name).eval()
        out = enc(torch.empty(2, 16000), torch.tensor([16000, 12000]))
    assert len(out.hidden_states) == enc.num_layers + 1
    assert out.hidden_states[-1].shape[-1] == enc.hidden_size
    n = sum(p.numel() for p in enc.parameters())
    # exact counts of transformers' Wav2Vec2Model/HubertModel/WavLMModel for the same configs (test_interop checks)
    expected = {"wav2vec2_base": 94_371_712, "hubert_base": 94_371_712, "wavlm_base": 94_381_936,
                "wav2vec2_large": 315_438_720, "hubert_large": 315_438_720, "wavlm_large": 315_456_704,
                "bestrq": 90_608_000}[name]
    assert n == expected, n


def test_presets_match_yaml_files():
    for name in list_presets():
        path = REPO / "conf" / "model" / f"{name}.yaml"
        assert path.is_file(), f"missing {path}"
        data = yaml.safe_load(path.read_text())
        assert data == get_preset(name).to_dict(), name
        assert get_preset(str(path)) == get_preset(name)


def test_unknown_preset_and_bad_config_errors():
    with pytest.raises(KeyError, match="tiny_hubert"):
        build_encoder("tiny_hubrt")
    with pytest.raises(ConfigError, match="num_layer"):
        build_encoder({"num_layer": 3})
    with pytest.raises(ConfigError, match="layer_heads"):
        build_encoder(small_cfg(layer_heads=[[0, 1]]))
    with pytest.raises(ConfigError, match="hidden_size"):
        build_encoder(small_cfg(num_heads=5))
    # choice fields: from a dict (the config loader) and from code (EncoderConfig.validate)
    for key, value in [("frontend", "mfcc"), ("input_norm", "speaker"), ("padding_rule", "fairseq"),
                       ("extractor_mode", "batch_norm"), ("model_type", "data2vec")]:
        with pytest.raises(ConfigError, match=f"'{key}' must be one of"):
            build_encoder({key: value})
        with pytest.raises(ConfigError, match=f"'{key}' must be one of"):
            build_encoder(small_cfg(**{key: value}))


@pytest.mark.parametrize("n", [401, 999, 4001, 12345, 16001])
def test_num_frames_matches_cnn_arithmetic(n):
    enc = build_encoder(small_cfg()).eval()
    expected = n
    for _, k, s in SMALL_CONV:
        expected = (expected - k) // s + 1
    with torch.no_grad():
        out = enc(torch.randn(1, n))
    assert out.hidden_states[0].shape[1] == expected == int(enc.num_frames(torch.tensor([n]))[0])
    # full 7-layer Base layout: floor((n - k) / s) + 1 per layer
    base = build_encoder("tiny_hubert")
    m = n
    for k, s in [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]:
        m = max(0, (m - k) // s + 1)
    assert int(base.num_frames(torch.tensor([n]))[0]) == m


FBANK_CONV = [[32, 3, 2], [32, 5, 3]]


def fbank_frames_by_hand(n: int, layers) -> int:
    """10 ms log-mel frames, then each subsampling conv with padding kernel // 2."""
    t = n // 160
    for _, k, s in layers:
        t = max(0, (t + 2 * (k // 2) - k) // s + 1)
    return t


@pytest.mark.parametrize("frontend", ["cnn", "fbank"])
def test_num_frames_is_the_encoders_output_length(frontend):
    # every length over a range: the frames of an unpadded utterance, and the valid frames of a padded batch
    if frontend == "cnn":
        enc = build_encoder(small_cfg()).eval()
        lengths = list(range(400, 4400, 37))
    else:
        enc = build_encoder(small_cfg(frontend="fbank", conv_layers=FBANK_CONV, n_mels=16)).eval()
        lengths = list(range(160, 8160, 71))
        assert [int(enc.num_frames(n)) for n in lengths] == [fbank_frames_by_hand(n, FBANK_CONV) for n in lengths]
    torch.manual_seed(0)
    wav = torch.randn(len(lengths), max(lengths))
    lens = torch.tensor(lengths)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            out = enc(wav[i : i + 1, :n])
            assert out.hidden_states[0].shape[1] == int(enc.num_frames(n)) == int(enc.num_frames(lens)[i]), n
        batch = enc(wav, lens)
    assert batch.hidden_states[0].shape[1] == int(enc.num_frames(max(lengths)))
    assert batch.lengths.tolist() == enc.num_frames(lens).tolist()
    assert len(set(batch.lengths.tolist())) > 8  # the range covers many frame counts
    if frontend == "fbank":
        feats = torch.randn(len(lengths), max(lengths) // 160, 16)
        with torch.no_grad():
            by_features = enc(None, lens // 160, features=feats)
        assert by_features.lengths.tolist() == enc.num_frames_from_features(lens // 160).tolist() \
            == enc.num_frames(lens).tolist()
    else:
        with pytest.raises(ValueError, match="frontend 'fbank'"):
            enc.num_frames_from_features(lens)


def test_padding_rules_differ_only_on_padded_batches():
    # fairseq_block counts a frame valid when any sample of its block is; the frame count of an utterance
    # (num_frames) is the CNN's under both rules
    from speechssl.models.frames import block_valid_frames

    torch.manual_seed(0)
    cnn = build_encoder(small_cfg()).eval()
    block = build_encoder(small_cfg(padding_rule="fairseq_block")).eval()
    block.load_state_dict(cnn.state_dict())
    lengths = list(range(1200, 4000, 53))
    wav, lens = torch.randn(len(lengths), 4000), torch.tensor(lengths)
    with torch.no_grad():
        a, b = cnn(wav, lens), block(wav, lens)
        T = a.hidden_states[0].shape[1]
        assert b.lengths.tolist() == block_valid_frames(lens, 4000, T).tolist()
        assert a.lengths.tolist() == cnn.num_frames(lens).tolist() == block.num_frames(lens).tolist()
        assert (b.lengths >= a.lengths).all() and (b.lengths > a.lengths).any()
        for i in (0, 7):  # unpadded, both rules give the same frames and outputs
            n = lengths[i]
            x, y = cnn(wav[i : i + 1, :n]), block(wav[i : i + 1, :n], lens[i : i + 1])
            assert y.lengths.tolist() == [x.hidden_states[0].shape[1]] == [int(cnn.num_frames(n))]
            torch.testing.assert_close(x.last_hidden_state, y.last_hidden_state)


def test_relative_position_buckets_hand_computed():
    rel = torch.tensor([0, -1, 1, -79, -80, -160, 160, 400, -800, 800, 5000, -5000])
    # 320 buckets: 160 per direction (positive offsets +160); exact below 80; then 80 + floor(log(r/80)/log(10)*80)
    exp = [0, 1, 161, 79, 80, 80 + math.floor(math.log(2) / math.log(10) * 80),
           160 + 80 + math.floor(math.log(2) / math.log(10) * 80), 160 + 80 + math.floor(math.log(5) / math.log(10) * 80),
           159, 319, 319, 159]
    assert relative_position_buckets(rel, 320, 800).tolist() == exp
    assert exp[5] == 104 and exp[7] == 295


@pytest.mark.parametrize("relative", [False, True])
def test_layer_norm_mode_is_batch_invariant(relative):
    torch.manual_seed(0)
    cfg = small_cfg(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True, normalize_waveform=True,
                    relative_position=relative, model_type="wavlm" if relative else "wav2vec2", num_buckets=32,
                    max_distance=64)
    enc = build_encoder(cfg).eval()
    a, b = torch.randn(6001), torch.randn(9000)
    batch = torch.zeros(2, 9000)
    batch[0, :6001], batch[1] = a, b
    with torch.no_grad():
        alone = enc(a[None])
        both = enc(batch, torch.tensor([6001, 9000]))
    n = alone.hidden_states[0].shape[1]
    assert int(both.lengths[0]) == n
    for x, y in zip(alone.hidden_states, both.hidden_states):
        torch.testing.assert_close(x[0], y[0, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.last_hidden_state[0], both.last_hidden_state[0, :n], atol=1e-5, rtol=1e-5)


def test_group_norm_mode_depends_on_padding():
    """Documented limitation: GroupNorm statistics span the padded tail (as in fairseq/HF Base)."""
    torch.manual_seed(0)
    enc = build_encoder(small_cfg()).eval()
    a = torch.randn(6001)
    with torch.no_grad():
        alone = enc(a[None]).hidden_states[-1][0]
        padded = enc(torch.cat([a, torch.zeros(3000)])[None], torch.tensor([6001])).hidden_states[-1][0, :alone.shape[0]]
    assert (alone - padded).abs().max() > 1e-4


def test_all_ones_gates_equal_no_gates():
    torch.manual_seed(0)
    enc = build_encoder(small_cfg(relative_position=True, model_type="wavlm", num_buckets=32, max_distance=64)).eval()
    u = enc.prunable_units()
    assert u == {"conv": [32] * 4, "heads": [4, 4], "ffn_units": [96, 96], "num_layers": 2}
    gates = EncoderGates(conv=[torch.ones(c) for c in u["conv"]], heads=[torch.ones(h) for h in u["heads"]],
                         attn=[torch.ones(()) for _ in range(2)], ffn_units=[torch.ones(f) for f in u["ffn_units"]],
                         ffn=[torch.ones(()) for _ in range(2)])
    wav, lens = torch.randn(2, 8000), torch.tensor([8000, 6000])
    with torch.no_grad():
        ref = enc(wav, lens)
        gated = enc(wav, lens, gates=gates)
    for x, y in zip(ref.hidden_states, gated.hidden_states):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    # zero gates switch the blocks off: layer 1 with attn=ffn=0 is just its two LayerNorms
    gates.attn[1], gates.ffn[1] = torch.zeros(()), torch.zeros(())
    with torch.no_grad():
        out = enc(wav, lens, gates=gates)
    layer = enc.layers[1]
    expected = layer.final_layer_norm(layer.layer_norm(out.hidden_states[1]))
    torch.testing.assert_close(out.hidden_states[2], expected)


def _materialise_heads(full: Encoder, keep: list[list[int]]) -> Encoder:
    """Slice heads out of a full model by hand (the layout contract compress relies on)."""
    cfg = copy.deepcopy(full.config)
    cfg.layer_heads = keep
    small = Encoder(cfg).eval()
    sd = full.state_dict()
    dh = cfg.hidden_size // cfg.num_heads
    new = {}
    for k, v in sd.items():
        if ".attention." in k and k.startswith("layers."):
            i = int(k.split(".")[1])
            rows = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in keep[i]]) if keep[i] else torch.zeros(0).long()
            if k.endswith("qkv.weight") or k.endswith("qkv.bias"):
                D = cfg.hidden_size
                v = torch.cat([v[j * D:(j + 1) * D][rows] for j in range(3)], 0)
            elif k.endswith("out_proj.weight"):
                v = v[:, rows]
            elif k.endswith("gru_rel_pos_const"):
                v = v[keep[i]]
            if not keep[i]:
                continue
        new[k] = v
    small.load_state_dict(new, strict=True)
    return small


def test_wavlm_pruned_heads_keep_original_bias_columns():
    torch.manual_seed(0)
    full = build_encoder(small_cfg(relative_position=True, model_type="wavlm", num_buckets=32, max_distance=64,
                                   num_layers=3)).eval()
    with torch.no_grad():  # make the per-head constants distinct so a wrong column would show
        for layer in full.layers:
            layer.attention.gru_rel_pos_const.copy_(torch.linspace(0.5, 2.0, 4))
        full.rel_pos.rel_attn_embed.weight.normal_()
    keep = [[1, 3], [0, 1, 2, 3], [2]]
    gates = EncoderGates(heads=[torch.tensor([float(h in k) for h in range(4)]) for k in keep])
    small = _materialise_heads(full, keep)
    wav, lens = torch.randn(2, 7000), torch.tensor([7000, 5000])
    with torch.no_grad():
        ref = full(wav, lens, gates=gates)
        out = small(wav, lens)
    for x, y in zip(ref.hidden_states, out.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert small.prunable_units()["heads"] == [2, 4, 1]


def test_heterogeneous_layers_round_trip(tmp_path):
    from speechssl import export_pretrained, load_pretrained

    torch.manual_seed(0)
    cfg = small_cfg(conv_layers=[[16, 10, 5], [24, 3, 2], [8, 3, 2], [32, 2, 2]], num_layers=3,
                    layer_heads=[[0, 2], [], [1, 2, 3]], layer_ffn_dims=[40, 0, 7], relative_position=True,
                    model_type="wavlm", num_buckets=32, max_distance=64)
    enc = build_encoder(cfg).eval()
    assert enc.layers[1].attention is None and enc.layers[1].feed_forward is None
    assert enc.prunable_units() == {"conv": [16, 24, 8, 32], "heads": [2, 0, 3], "ffn_units": [40, 0, 7],
                                    "num_layers": 3}
    export_pretrained(enc, tmp_path / "m", meta={"note": "pruned"})
    back = load_pretrained(tmp_path / "m")
    assert not back.training and back.config == enc.config
    wav = torch.randn(2, 6000)
    with torch.no_grad():
        a, b = enc(wav, torch.tensor([6000, 4000])), back(wav, torch.tensor([6000, 4000]))
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="per-layer"):
        export_pretrained(enc, tmp_path / "hf", format="hf")


def test_output_attentions_match_sdpa_path():
    torch.manual_seed(0)
    enc = build_encoder(small_cfg(relative_position=True, model_type="wavlm", num_buckets=32, max_distance=64)).eval()
    wav, lens = torch.randn(2, 8000), torch.tensor([8000, 5000])
    with torch.no_grad():
        a = enc(wav, lens)
        b = enc(wav, lens, output_attentions=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    p = b.attentions[0]
    assert p.shape == (2, 4, a.hidden_states[0].shape[1], a.hidden_states[0].shape[1])
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    assert p[1, :, :, int(a.lengths[1]):].abs().max() == 0  # no attention to padded keys


def test_dropout_and_layerdrop_only_in_train_mode():
    torch.manual_seed(0)
    enc = build_encoder(small_cfg(dropout=0.1, layerdrop=0.5, num_layers=4))
    wav = torch.randn(1, 8000)
    enc.eval()
    with torch.no_grad():
        e1, e2 = enc(wav).hidden_states[-1], enc(wav).hidden_states[-1]
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    enc.train()
    torch.manual_seed(1)
    outs = [enc(wav).hidden_states for _ in range(4)]
    assert all(len(h) == 5 for h in outs)
    assert any(not torch.equal(outs[0][-1], o[-1]) for o in outs[1:])
    # a dropped layer passes its input through unchanged
    assert any(torch.equal(o[i], o[i + 1]) for o in outs for i in range(4))


def test_feature_grad_mult_scales_cnn_gradient():
    torch.manual_seed(0)
    wav = torch.randn(1, 6000)
    grads = []
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        enc = build_encoder(small_cfg(feature_grad_mult=mult)).train()
        enc(wav).last_hidden_state.sum().backward()
        grads.append(enc.feature_extractor.conv_layers[0].conv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0] * 0.1, rtol=1e-4, atol=1e-7)
    enc = build_encoder(small_cfg(feature_grad_mult=0.0)).train()
    enc(wav).last_hidden_state.sum().backward()
    assert enc.feature_extractor.conv_layers[0].conv.weight.grad is None


def test_fbank_features_input_equals_waveform_path():
    torch.manual_seed(0)
    enc = build_encoder("tiny_bestrq").eval()
    from speechssl.models.components import log_mel_fbank

    wav, lens = torch.randn(2, 16000), torch.tensor([16000, 11000])
    feats = log_mel_fbank(wav)
    with torch.no_grad():
        a = enc(wav, lens)
        b = enc(None, lens // 160, features=feats)
    assert feats.shape == (2, 100, 80)
    assert a.lengths.tolist() == [25, 17] == enc.num_frames(lens).tolist()
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y)
    # normalised input features: zero mean / unit variance over valid frames
    valid = b.input_features[0].reshape(-1, 80)
    torch.testing.assert_close(valid.mean(0), torch.zeros(80), atol=1e-4, rtol=0)


def test_wavlm_training_attention_path_matches_eval_kernel():
    """In grad mode WavLM uses an explicit baddbmm attention; with dropout off it must equal the SDPA path."""
    torch.manual_seed(0)
    enc = build_encoder(small_cfg(relative_position=True, model_type="wavlm", num_buckets=32, max_distance=64))
    wav, lens = torch.randn(2, 7000), torch.tensor([7000, 5200])
    enc.train()  # all dropouts are 0 in small_cfg, so train == eval numerically
    out = enc(wav, lens)
    out.last_hidden_state.sum().backward()
    assert enc.rel_pos.rel_attn_embed.weight.grad.abs().sum() > 0
    assert enc.layers[1].attention.gru_rel_pos_const.grad.abs().sum() > 0
    with torch.no_grad():
        ref = enc.eval()(wav, lens)
    for x, y in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(x.detach(), y, atol=1e-5, rtol=1e-5)


def test_wavlm_training_bias_gradients_equal_through_sdpa(monkeypatch):
    """The CPU baddbmm path and SDPA with the trainable bias as attn_mask (what CUDA runs) give the same
    outputs and gradients, the relative-position embedding and the gate parameters included."""
    from speechssl.models.components import SelfAttention

    torch.manual_seed(0)
    enc = build_encoder(small_cfg(relative_position=True, model_type="wavlm", num_buckets=32, max_distance=64))
    wav, lens = torch.randn(2, 7000), torch.tensor([7000, 5200])
    enc.train()
    grads = []
    for by_bmm in (True, False):
        monkeypatch.setattr(SelfAttention, "cpu_bias_by_bmm", by_bmm)
        enc.zero_grad(set_to_none=True)
        out = enc(wav, lens)
        (out.last_hidden_state ** 2).mean().backward()
        grads.append((out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()
                                                       if p.grad is not None}))
    (h_bmm, g_bmm), (h_sdpa, g_sdpa) = grads
    torch.testing.assert_close(h_bmm, h_sdpa, atol=1e-5, rtol=1e-5)
    assert g_bmm.keys() == g_sdpa.keys() and "rel_pos.rel_attn_embed.weight" in g_sdpa
    for name in g_bmm:
        torch.testing.assert_close(g_bmm[name], g_sdpa[name], atol=1e-5, rtol=1e-4, msg=name)
