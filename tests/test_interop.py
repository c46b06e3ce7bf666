"""Checkpoint interop: Hugging Face parity (load and export), fairseq import, speechssl format, config mapping."""
from __future__ import annotations

import argparse

import pytest
import torch

transformers = pytest.importorskip("transformers")

from speechssl import export_pretrained, load_pretrained  # noqa: E402
from speechssl.config import ConfigError  # noqa: E402
from speechssl.models import build_encoder, get_preset  # noqa: E402
from speechssl.models.convert_hf import config_from_hf, config_to_hf  # noqa: E402
from speechssl.models.frames import block_valid_frames  # noqa: E402
from speechssl.models.io import load_checkpoint_parts  # noqa: E402

HF = {
    "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
    "hubert": (transformers.HubertConfig, transformers.HubertModel),
    "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
}
ARCH_FIELDS = ["model_type", "frontend", "conv_layers", "extractor_mode", "conv_bias", "hidden_size", "num_layers",
               "num_heads", "ffn_dim", "layer_norm_first", "conv_pos", "conv_pos_groups", "relative_position",
               "num_buckets", "max_distance", "feature_proj_layer_norm", "layer_heads", "layer_ffn_dims"]


def small_hf(model_type: str, layer_norm: bool, seed: int = 0):
    """A random-init transformers model: hidden 64, 2 layers, 3-layer CNN of 32 channels."""
    torch.manual_seed(seed)
    C, M = HF[model_type]
    cfg = C(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, do_stable_layer_norm=layer_norm,
            feat_extract_norm="layer" if layer_norm else "group", conv_bias=layer_norm,
            num_buckets=32, max_bucket_distance=64)
    model = M(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm / GroupNorm affine params, so a swapped norm would show
        for name, p in model.named_parameters():
            if "layer_norm" in name or "gru_rel_pos_const" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(lengths=(6001, 4400)):
    g = torch.Generator().manual_seed(1)
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=g)
    lens = torch.tensor(lengths)
    mask = (torch.arange(wav.shape[1])[None] < lens[:, None]).long()
    return wav, lens, mask


def fairseq_frame_mask(lens: torch.Tensor, num_samples: int, num_frames: int) -> torch.Tensor:
    """fairseq HuBERT's forward_padding_mask, step by step: the sample padding mask cut to a multiple of the frame
    count, one block per frame, a frame padding only when all of its block is. Returns valid frames (True)."""
    pad = torch.arange(num_samples)[None] >= lens[:, None]
    extra = num_samples % num_frames
    if extra:
        pad = pad[:, :-extra]
    return ~pad.view(pad.shape[0], num_frames, -1).all(-1)


def run_hf(hf, wav, mask, padding_rule="cnn", **kw):
    """transformers' forward; with padding_rule "fairseq_block" it is fairseq HuBERT/WavLM's forward: the same
    modules and maths (the import tests check that on unpadded input), with fairseq's frame mask in place of
    transformers' CNN length arithmetic."""
    if padding_rule == "fairseq_block":
        lens = mask.sum(-1)
        hf._get_feature_vector_attention_mask = lambda n, am, **_: fairseq_frame_mask(lens, wav.shape[1], n)
    try:
        return hf(wav, attention_mask=mask, output_hidden_states=True, **kw)
    finally:
        hf.__dict__.pop("_get_feature_vector_attention_mask", None)


def assert_states_close(hf_states, ours, lengths=None, atol=1e-4):
    assert len(hf_states) == len(ours)
    for i, (a, b) in enumerate(zip(hf_states, ours)):
        if lengths is None:
            err = (a - b).abs().max().item()
        else:
            err = max((a[j, :n] - b[j, :n]).abs().max().item() for j, n in enumerate(lengths.tolist()))
        assert err < atol, f"hidden state {i}: max abs diff {err}"


@pytest.mark.parametrize("layer_norm", [False, True], ids=["group_postln", "layer_preln"])
@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert", "wavlm"])
def test_hf_parity_load_and_export(model_type, layer_norm, tmp_path):
    hf = small_hf(model_type, layer_norm)
    hf.save_pretrained(tmp_path / "hf")
    enc = load_pretrained(tmp_path / "hf")
    assert not enc.training and enc.config.model_type == model_type
    assert enc.config.layer_norm_first == layer_norm and enc.downsample_rate == 20
    # single utterance
    wav, lens, mask = batch((6001,))
    with torch.no_grad():
        ref = hf(wav, output_hidden_states=True)
        out = enc(wav)
    assert_states_close(ref.hidden_states, out.hidden_states)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.extract_features, ref.extract_features if model_type != "hubert"
                               else hf.feature_projection.layer_norm(hf.feature_extractor(wav).transpose(1, 2)),
                               atol=1e-5, rtol=0)
    # padded batch with attention masks
    wav, lens, mask = batch()
    with torch.no_grad():
        ref = hf(wav, attention_mask=mask, output_hidden_states=True)
        out = enc(wav, lens)
    n_hf = hf._get_feat_extract_output_lengths(lens)
    assert out.lengths.tolist() == n_hf.tolist() == enc.num_frames(lens).tolist()
    assert_states_close(ref.hidden_states, out.hidden_states, out.lengths)
    # export back and reload with transformers
    export_pretrained(enc, tmp_path / "out", format="hf")
    again = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        ref2 = again(wav, attention_mask=mask, output_hidden_states=True)
    assert_states_close(ref.hidden_states, ref2.hidden_states, atol=1e-6)


def test_hf_mask_indices_match_mask_time_indices(tmp_path):
    hf = small_hf("hubert", False)
    hf.save_pretrained(tmp_path / "hf")
    enc = load_pretrained(tmp_path / "hf")
    wav, lens, mask = batch((6001,))
    T = int(enc.num_frames(lens)[0])
    mt = torch.zeros(1, T, dtype=torch.bool)
    mt[0, 5:15] = True
    with torch.no_grad():
        ref = hf(wav, mask_time_indices=mt, output_hidden_states=True)
        out = enc(wav, mask_indices=mt)
    assert_states_close(ref.hidden_states, out.hidden_states)


def test_hf_attentions_and_prefixed_checkpoints(tmp_path):
    torch.manual_seed(0)
    base = small_hf("hubert", True)
    ctc = transformers.HubertForCTC(transformers.HubertConfig(**{**base.config.to_dict(), "vocab_size": 7})).eval()
    ctc.hubert.load_state_dict(base.state_dict())
    ctc.save_pretrained(tmp_path / "ctc")
    # older HF dirs hold pytorch_model.bin with 'hubert.*' keys (transformers 5 only writes safetensors)
    (tmp_path / "ctc" / "model.safetensors").unlink()
    torch.save(ctc.state_dict(), tmp_path / "ctc" / "pytorch_model.bin")
    enc = load_pretrained(tmp_path / "ctc")
    wav, lens, mask = batch((5000,))
    with torch.no_grad():
        ref = base(wav, output_hidden_states=True, output_attentions=True)
        out = enc(wav, output_attentions=True)
    assert_states_close(ref.hidden_states, out.hidden_states)
    for a, b in zip(ref.attentions, out.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    parts = load_checkpoint_parts(tmp_path / "ctc")
    assert set(parts["lm_head"]) == {"weight", "bias"} and parts["lm_head"]["weight"].shape == (7, 64)


@pytest.mark.parametrize("preset,model_type,layer_norm", [
    ("wav2vec2_base", "wav2vec2", False), ("hubert_base", "hubert", False), ("wavlm_base", "wavlm", False),
    ("wav2vec2_large", "wav2vec2", True), ("hubert_large", "hubert", True), ("wavlm_large", "wavlm", True),
])
def test_hf_base_and_large_configs_map_to_presets(preset, model_type, layer_norm):
    C, M = HF[model_type]
    kw = {} if not layer_norm else dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096, do_stable_layer_norm=True,
                                        feat_extract_norm="layer", conv_bias=True)
    hf_cfg = C(**kw)
    ours = config_from_hf(hf_cfg.to_dict())
    want = get_preset(preset)
    for f in ARCH_FIELDS:
        assert getattr(ours, f) == getattr(want, f), f
    # and back: transformers builds a model with exactly our parameter count (meta device, no memory)
    back = C(**config_to_hf(want))
    with torch.device("meta"):
        n_hf = sum(p.numel() for p in M(back).parameters())
        n_ours = sum(p.numel() for p in build_encoder(preset).parameters())
    assert n_hf == n_ours
    if preset == "hubert_base":
        assert n_ours == 94_371_712  # ~94.4M, as the reference says


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["hubert", "wavlm"])
def test_hf_base_full_forward_parity(model_type, tmp_path):
    torch.manual_seed(0)
    C, M = HF[model_type]
    hf = M(C()).eval()
    hf.save_pretrained(tmp_path / "hf")
    enc = load_pretrained(tmp_path / "hf")
    wav = torch.randn(1, 32000)
    with torch.no_grad():
        ref = hf(wav, output_hidden_states=True)
        out = enc(wav)
    assert_states_close(ref.hidden_states, out.hidden_states)


def test_preprocessor_normalisation_flag(tmp_path):
    hf = small_hf("wav2vec2", True)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text('{"do_normalize": true}')
    enc = load_pretrained(tmp_path / "hf")
    assert enc.config.normalize_waveform
    wav, lens, mask = batch((6001, 4400))
    normed = torch.zeros_like(wav)
    for i, n in enumerate(lens.tolist()):  # what HF's feature extractor does before the model
        x = wav[i, :n]
        normed[i, :n] = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        ref = hf(normed, attention_mask=mask, output_hidden_states=True)
        out = enc(wav, lens)
    assert_states_close(ref.hidden_states, out.hidden_states, out.lengths)


# ---------------------------------------------------------------- fairseq

def hf_to_fairseq_names(sd: dict, layer_norm: bool) -> dict:
    """Write a transformers state dict with fairseq's names (the mapping of transformers' conversion script)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("feature_extractor.conv_layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            rest = rest.replace("conv.", "0.").replace("layer_norm.", "2.1." if layer_norm else "2.")
            out[f"feature_extractor.conv_layers.{i}.{rest}"] = v
        elif k.startswith("feature_projection.layer_norm."):
            out["layer_norm." + k.split(".")[-1]] = v
        elif k.startswith("feature_projection.projection."):
            out["post_extract_proj." + k.split(".")[-1]] = v
        elif k == "masked_spec_embed":
            out["mask_emb"] = v
        elif k.startswith("encoder.pos_conv_embed.conv."):
            name = k.split("conv.", 2)[-1]
            name = {"parametrizations.weight.original0": "weight_g",
                    "parametrizations.weight.original1": "weight_v"}.get(name, name)
            out["encoder.pos_conv.0." + name] = v
        elif k.startswith("encoder.layer_norm."):
            out[k] = v
        else:
            k = (k.replace(".attention.gru_rel_pos_linear", ".self_attn.grep_linear")
                  .replace(".attention.gru_rel_pos_const", ".self_attn.grep_a")
                  .replace(".attention.rel_attn_embed", ".self_attn.relative_attention_bias")
                  .replace(".attention.", ".self_attn.")
                  .replace(".feed_forward.intermediate_dense", ".fc1").replace(".feed_forward.output_dense", ".fc2"))
            k = k.replace(".layer_norm.", ".self_attn_layer_norm.")
            out[k] = v
    return out


@pytest.mark.parametrize("model_type,layer_norm", [("hubert", False), ("wav2vec2", True), ("wavlm", False)])
def test_fairseq_checkpoint_import(model_type, layer_norm, tmp_path):
    hf = small_hf(model_type, layer_norm)
    sd = hf_to_fairseq_names(hf.state_dict(), layer_norm)
    sd["final_proj.weight"] = torch.randn(16, 64)
    sd["label_embs_concat"] = torch.randn(10, 16)
    model_cfg = {
        "_name": model_type, "extractor_mode": "layer_norm" if layer_norm else "default",
        "conv_feature_layers": "[(32, 10, 5)] + [(32, 3, 2)] * 1 + [(32, 2, 2)]", "conv_bias": layer_norm,
        "encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 4,
        "layer_norm_first": layer_norm, "conv_pos": 16, "conv_pos_groups": 4, "feature_grad_mult": 0.1,
        "encoder_layerdrop": 0.05, "dropout_input": 0.1, "activation_fn": "gelu", "layer_type": "transformer",
    }
    if model_type == "wavlm":
        model_cfg.update(relative_position_embedding=True, num_buckets=32, max_distance=64)
    path = tmp_path / "ckpt.pt"
    torch.save({"cfg": {"model": model_cfg, "task": {"normalize": False}}, "model": sd}, path)
    enc = load_pretrained(path)
    assert enc.config.feature_grad_mult == 0.1 and enc.config.layerdrop == 0.05
    rule = enc.config.padding_rule  # fairseq HuBERT/WavLM mask by blocks, fairseq wav2vec 2.0 by CNN lengths
    assert rule == ("cnn" if model_type == "wav2vec2" else "fairseq_block")
    wav, lens, mask = batch()
    with torch.no_grad():
        ref = run_hf(hf, wav, mask, rule)
        out = enc(wav, lens)
    assert_states_close(ref.hidden_states, out.hidden_states, out.lengths)
    parts = load_checkpoint_parts(path)
    assert parts["final_proj"]["weight"].shape == (16, 64)
    assert torch.equal(parts["label_embs_concat"]["label_embs_concat"], sd["label_embs_concat"])


def test_a_missing_projection_is_named():
    from speechssl.models.convert_fairseq import state_dict_from_fairseq
    from speechssl.models.convert_hf import state_dict_from_hf

    hf_sd = small_hf("hubert", False).state_dict()
    fairseq_sd = hf_to_fairseq_names(hf_sd, False)
    ours, _ = state_dict_from_hf(hf_sd)
    assert torch.equal(ours["layers.1.attention.qkv.bias"], torch.cat(
        [hf_sd[f"encoder.layers.1.attention.{p}_proj.bias"] for p in "qkv"]))
    del hf_sd["encoder.layers.1.attention.k_proj.bias"], fairseq_sd["encoder.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(ConfigError, match=r"HF checkpoint lacks encoder\.layers\.1\.attention\.k_proj\.bias$"):
        state_dict_from_hf(hf_sd)
    with pytest.raises(ConfigError, match=r"lacks encoder\.layers\.0\.self_attn\.v_proj\.weight$"):
        state_dict_from_fairseq(fairseq_sd)


def test_fairseq_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"args": argparse.Namespace(encoder_layers=2), "model": {}}, path)
    with pytest.raises(ConfigError, match="weights_only=True.*\n.*Convert"):
        load_pretrained(path)


def test_speechssl_format_round_trip_and_parts(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("tiny_wavlm").eval()
    head = {"weight": torch.randn(8, 256)}
    export_pretrained(enc, tmp_path / "m", meta={"step": 3}, parts={"final_proj": head})
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "speechssl" and cfg["meta"] == {"step": 3} and cfg["encoder"]["model_type"] == "wavlm"
    back = load_pretrained(tmp_path / "m")
    wav = torch.randn(1, 8000)
    with torch.no_grad():
        torch.testing.assert_close(enc(wav).last_hidden_state, back(wav).last_hidden_state, atol=0, rtol=0)
    parts = load_checkpoint_parts(tmp_path / "m")
    assert torch.equal(parts["final_proj"]["weight"], head["weight"])
    # a corrupted config names the problem
    cfg["encoder"]["num_layers"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_layers: 4 -> 5"):  # the config saved with the weights disagrees
        load_pretrained(tmp_path / "m")
    from speechssl.models.io import save_state_dict

    save_state_dict(enc.state_dict(), tmp_path / "m" / "model.safetensors")  # an older dir: no stored config
    with pytest.raises(ConfigError, match="missing"):  # the parameter check still refuses it
        load_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------ fairseq padding rule (issue 13, item 12)

def test_block_valid_frames_is_fairseqs_forward_padding_mask():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        T = int(torch.randint(400, 9000, (1,), generator=g))
        Tp = int(torch.randint(1, T // 20 + 1, (1,), generator=g))
        lens = torch.randint(0, T + 1, (6,), generator=g)
        lens[0] = T
        assert block_valid_frames(lens, T, Tp).tolist() == fairseq_frame_mask(lens, T, Tp).sum(-1).tolist()


def _fairseq_ckpt(tmp_path, model_type="hubert", layer_norm=False):
    hf = small_hf(model_type, layer_norm)
    model_cfg = {
        "_name": model_type, "extractor_mode": "layer_norm" if layer_norm else "default",
        "conv_feature_layers": "[(32, 10, 5)] + [(32, 3, 2)] * 1 + [(32, 2, 2)]", "conv_bias": layer_norm,
        "encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 4,
        "layer_norm_first": layer_norm, "conv_pos": 16, "conv_pos_groups": 4,
    }
    if model_type == "wavlm":
        model_cfg.update(relative_position_embedding=True, num_buckets=32, max_distance=64)
    path = tmp_path / f"{model_type}.pt"
    torch.save({"cfg": {"model": model_cfg, "task": {"normalize": False}},
                "model": hf_to_fairseq_names(hf.state_dict(), layer_norm)}, path)
    return hf, path


@pytest.mark.parametrize("model_type,layer_norm", [("hubert", False), ("hubert", True), ("wavlm", False)])
def test_fairseq_padded_batch_follows_the_block_rule(model_type, layer_norm, tmp_path):
    hf, path = _fairseq_ckpt(tmp_path, model_type, layer_norm)
    enc = load_pretrained(path)
    assert enc.config.padding_rule == "fairseq_block"
    wav, lens, mask = batch((6001, 4400, 3001))
    with torch.no_grad():
        fairseq = run_hf(hf, wav, mask, "fairseq_block")
        cnn = run_hf(hf, wav, mask, "cnn")
        out = enc(wav, lens)
    T = out.hidden_states[0].shape[1]
    assert out.lengths.tolist() == block_valid_frames(lens, wav.shape[1], T).tolist()
    assert (out.lengths > enc.num_frames(lens)).any()  # the rules disagree on this batch, so the test can tell
    assert_states_close(fairseq.hidden_states, out.hidden_states, out.lengths, atol=1e-5)
    # the CNN rule (what a rule-blind import would compute) is measurably different near utterance ends
    gap = max((a[1:, :200] - b[1:, :200]).abs().max().item() for a, b in zip(cnn.hidden_states, out.hidden_states))
    assert gap > 1e-3
    # the rule survives a speechssl export; an HF export keeps transformers' own (CNN) rule, as HF dirs load
    export_pretrained(enc, tmp_path / "ours")
    assert load_pretrained(tmp_path / "ours").config.padding_rule == "fairseq_block"
    export_pretrained(enc, tmp_path / "hfdir", format="hf")
    assert load_pretrained(tmp_path / "hfdir").config.padding_rule == "cnn"


def test_fairseq_wav2vec2_and_transformers_checkpoints_keep_the_cnn_rule(tmp_path):
    hf, path = _fairseq_ckpt(tmp_path, "wav2vec2", True)
    assert load_pretrained(path).config.padding_rule == "cnn"
    hf.save_pretrained(tmp_path / "hf")
    assert load_pretrained(tmp_path / "hf").config.padding_rule == "cnn"


# ------------------------------------------------------- config.json edits that keep shapes (issue 13, item 10)

@pytest.mark.parametrize("edit,key", [({"num_heads": 8}, "num_heads"),
                                      ({"model_type": "wavlm"}, "model_type"),
                                      ({"layer_norm_eps": 1e-6}, "layer_norm_eps")])
def test_shape_keeping_config_edits_are_refused(edit, key, tmp_path):
    import json

    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert").eval()
    export_pretrained(enc, tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    original = cfg_file.read_text()
    cfg = json.loads(original)
    cfg["encoder"].update(edit)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{key}.*Restore config.json"):
        load_pretrained(tmp_path / "m")
    # training-only settings may change; the weights load under them
    cfg_file.write_text(original)
    cfg = json.loads(original)
    cfg["encoder"].update(layerdrop=0.0, dropout=0.0)
    cfg_file.write_text(json.dumps(cfg))
    assert load_pretrained(tmp_path / "m").config.layerdrop == 0.0


def test_dirs_without_the_stored_config_still_load(tmp_path):
    from speechssl.models.io import CONFIG_META_KEY, save_state_dict
    from safetensors import safe_open

    enc = build_encoder("tiny_hubert").eval()
    export_pretrained(enc, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert CONFIG_META_KEY in f.metadata()
    save_state_dict(enc.state_dict(), tmp_path / "m" / "model.safetensors")  # as speechssl wrote it before
    assert load_pretrained(tmp_path / "m").config.num_heads == enc.config.num_heads


def test_relabelled_model_type_cannot_export_to_hf(tmp_path):
    import dataclasses

    wavlm_no_bias = dataclasses.replace(get_preset("tiny_hubert"), model_type="wavlm")
    with pytest.raises(ConfigError, match="relative_position"):
        config_to_hf(wavlm_no_bias)
    with pytest.raises(ConfigError, match="relative_position"):
        export_pretrained(build_encoder(wavlm_no_bias), tmp_path / "x", format="hf")
    assert not (tmp_path / "x" / "model.safetensors").exists()


# ---------------------------------------------------- transformers' own pipeline on a padded batch (item 11)

@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("extractor_mode", ["layer_norm", "group_norm"])
def test_hf_pipeline_on_padded_batch(extractor_mode, normalize, tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", extractor_mode=extractor_mode, normalize_waveform=normalize,
                        conv_bias=extractor_mode == "layer_norm", num_layers=2).eval()
    export_pretrained(enc, tmp_path / "hf", format="hf")
    fe = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    wav, lens, _ = batch((16000, 9000))
    clips = [wav[i, :n].numpy() for i, n in enumerate(lens.tolist())]
    with torch.no_grad():
        ours = enc(wav, lens)
        piped = model(**fe(clips, padding=True, return_tensors="pt", sampling_rate=16000)).last_hidden_state
        masked = model(**fe(clips, padding=True, return_tensors="pt", sampling_rate=16000,
                            return_attention_mask=True)).last_hidden_state

    def err(h):
        return max((h[i, :n] - ours.last_hidden_state[i, :n]).abs().max().item()
                   for i, n in enumerate(ours.lengths.tolist()))

    if extractor_mode == "layer_norm":  # the exported preprocessor config alone gives speechssl's outputs
        assert err(piped) < 1e-4
    else:  # transformers' group-norm convention passes no mask: documented difference, the mask restores it
        assert err(piped) > 1e-2
    assert err(masked) < 1e-4
