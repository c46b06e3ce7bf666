"""Hugging Face transformers <-> speechssl: config mapping and state-dict renaming (Wav2Vec2 / HuBERT / WavLM).

Pure dict/tensor code: transformers is not imported here. The names follow transformers' modeling files
(``feature_extractor.conv_layers.N``, ``encoder.pos_conv_embed.conv``, ``encoder.layers.N.attention.q_proj`` ...);
q/k/v projections are concatenated into our fused ``qkv`` and split back on export.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import Tensor

from speechssl.config import ConfigError

from .encoder_config import EncoderConfig

__all__ = ["config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf", "fuse_qkv", "HF_MODEL_TYPES"]

HF_MODEL_TYPES = {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel", "wavlm": "WavLMModel"}
_PREFIXES = ("wav2vec2.", "hubert.", "wavlm.")


def config_from_hf(hf: dict[str, Any], preprocessor: Optional[dict[str, Any]] = None) -> EncoderConfig:
    """Map a transformers config.json dict to EncoderConfig; unsupported variants are clear errors."""
    mt = hf.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ConfigError(f"HF config model_type must be one of {sorted(HF_MODEL_TYPES)}, got {mt!r}")
    for key, ok in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
        if hf.get(key, "gelu") != ok:
            raise ConfigError(f"HF config '{key}'={hf.get(key)!r} is not supported (only {ok!r})")
    if hf.get("conv_pos_batch_norm", False):
        raise ConfigError("HF config 'conv_pos_batch_norm'=true (HuBERT-ECG style) is not supported")
    if hf.get("add_adapter", False):
        raise ConfigError("HF config 'add_adapter'=true is not supported (adapter layers are a fine-tuning head)")
    dims = hf.get("conv_dim", [512] * 7)
    kernels = hf.get("conv_kernel", [10, 3, 3, 3, 3, 2, 2])
    strides = hf.get("conv_stride", [5, 2, 2, 2, 2, 2, 2])
    if not len(dims) == len(kernels) == len(strides):
        raise ConfigError("HF config conv_dim / conv_kernel / conv_stride have different lengths")
    norm = hf.get("feat_extract_norm", "group")
    if norm not in ("group", "layer"):
        raise ConfigError(f"HF config 'feat_extract_norm' must be 'group' or 'layer', got {norm!r}")
    do_norm = bool((preprocessor or {}).get("do_normalize", False))
    return EncoderConfig(
        model_type=mt,
        frontend="cnn",
        conv_layers=[[int(c), int(k), int(s)] for c, k, s in zip(dims, kernels, strides)],
        extractor_mode="group_norm" if norm == "group" else "layer_norm",
        conv_bias=bool(hf.get("conv_bias", False)),
        normalize_waveform=do_norm,
        feature_grad_mult=1.0,
        feature_proj_layer_norm=bool(hf.get("feat_proj_layer_norm", True)) if mt == "hubert" else True,
        hidden_size=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        ffn_dim=int(hf.get("intermediate_size", 3072)),
        layer_norm_first=bool(hf.get("do_stable_layer_norm", False)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        dropout=float(hf.get("hidden_dropout", 0.1)),
        attention_dropout=float(hf.get("attention_dropout", 0.1)),
        activation_dropout=float(hf.get("activation_dropout", 0.1)),
        feature_dropout=float(hf.get("feat_proj_dropout", 0.0)),
        final_dropout=float(hf.get("final_dropout", 0.1)),
        layerdrop=float(hf.get("layerdrop", 0.1)),
        conv_pos=int(hf.get("num_conv_pos_embeddings", 128)),
        conv_pos_groups=int(hf.get("num_conv_pos_embedding_groups", 16)),
        relative_position=mt == "wavlm",
        num_buckets=int(hf.get("num_buckets", 320)),
        max_distance=int(hf.get("max_bucket_distance", 800)),
    )


def config_to_hf(cfg: EncoderConfig) -> dict[str, Any]:
    """EncoderConfig -> transformers config.json dict. Per-layer (pruned) sizes, attention-map reuse and the fbank
    front end have no transformers equivalent and raise ConfigError."""
    if cfg.frontend != "cnn" or cfg.model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"format='hf' supports CNN wav2vec2/hubert/wavlm encoders, not model_type="
                          f"{cfg.model_type!r} frontend={cfg.frontend!r}; use format='speechssl'")
    uniform_heads = cfg.layer_heads is None or all(list(h) == list(range(cfg.num_heads)) for h in cfg.layer_heads)
    uniform_ffn = cfg.layer_ffn_dims is None or all(f == cfg.ffn_dim for f in cfg.layer_ffn_dims)
    if not (uniform_heads and uniform_ffn):
        raise ConfigError("format='hf' cannot express per-layer head/FFN sizes (a pruned model); "
                          "use format='speechssl'")
    if cfg.attn_reuse is not None and any(j >= 0 for j in cfg.attn_reuse):
        raise ConfigError("format='hf' cannot express attention-map reuse (encoder config 'attn_reuse', a "
                          "Recycle-and-Distill student: its reusing layers have no query/key projections); "
                          "use format='speechssl'")
    if cfg.relative_position != (cfg.model_type == "wavlm"):
        # transformers builds WavLM with relative-position weights and the others without: a mismatch would load
        # with those weights drawn at random (or silently dropped)
        raise ConfigError(f"format='hf': model_type={cfg.model_type!r} with relative_position={cfg.relative_position} "
                          "has no transformers equivalent (its WavLM always has the gated relative position bias, "
                          "wav2vec2/HuBERT never); was config.json edited? use format='speechssl'")
    if not cfg.feature_proj_layer_norm and cfg.model_type != "hubert":
        raise ConfigError("feature_proj_layer_norm=false is only expressible for model_type 'hubert' in HF format")
    hf: dict[str, Any] = {
        "model_type": cfg.model_type,
        "architectures": [HF_MODEL_TYPES[cfg.model_type]],
        "conv_dim": [int(l[0]) for l in cfg.conv_layers],
        "conv_kernel": [int(l[1]) for l in cfg.conv_layers],
        "conv_stride": [int(l[2]) for l in cfg.conv_layers],
        "num_feat_extract_layers": len(cfg.conv_layers),
        "feat_extract_norm": "group" if cfg.extractor_mode == "group_norm" else "layer",
        "feat_extract_activation": "gelu",
        "conv_bias": cfg.conv_bias,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "gelu",
        "do_stable_layer_norm": cfg.layer_norm_first,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "feat_proj_dropout": cfg.feature_dropout,
        "final_dropout": cfg.final_dropout,
        "layerdrop": cfg.layerdrop,
        "num_conv_pos_embeddings": cfg.conv_pos,
        "num_conv_pos_embedding_groups": cfg.conv_pos_groups,
        "mask_time_prob": 0.05,
    }
    if cfg.model_type == "hubert":
        hf["feat_proj_layer_norm"] = cfg.feature_proj_layer_norm
    if cfg.model_type == "wavlm":
        hf["num_buckets"] = cfg.num_buckets
        hf["max_bucket_distance"] = cfg.max_distance
    return hf


def fuse_qkv(qkv: dict[int, dict[str, Tensor]], missing: str) -> dict[str, Tensor]:
    """Our fused ``layers.N.attention.qkv.{weight,bias}`` from separate projections: ``qkv[N]`` maps "qweight",
    "kbias" ... to tensors; rows are stacked q, k, v. A missing projection raises ConfigError with ``missing``
    formatted with ``layer`` (N) and ``name`` (e.g. ``k_proj.bias``)."""
    out: dict[str, Tensor] = {}
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            absent = [p for p in "qkv" if p + kind not in parts]
            if absent:
                raise ConfigError(missing.format(layer=i, name=f"{absent[0]}_proj.{kind}"))
            out[f"layers.{i}.attention.qkv.{kind}"] = torch.cat([parts[p + kind] for p in "qkv"], 0)
    return out


_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def state_dict_from_hf(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rename a transformers state dict to ours. Returns (encoder state dict, extra tensors not in the encoder:
    quantizer, project_q/hid, heads ...)."""
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in sd)), "")
    out: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for key, t in sd.items():
        if prefix:
            if not key.startswith(prefix):
                extra[key] = t
                continue
            key = key[len(prefix):]
        if key.startswith("feature_extractor.conv_layers.") or key.startswith("feature_projection."):
            out[key] = t
        elif key == "masked_spec_embed":
            out["mask_emb"] = t
        elif key.startswith("encoder.pos_conv_embed.conv."):
            name = key[len("encoder.pos_conv_embed.conv."):]
            name = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v",
                    "weight_g": "weight_g", "weight_v": "weight_v", "bias": "bias"}.get(name, name)
            if name == "weight":  # weight norm already folded: g = per-tap norm, v = w
                out["pos_conv.weight_v"] = t
                out["pos_conv.weight_g"] = torch.linalg.vector_norm(t, dim=(0, 1), keepdim=True)
            else:
                out["pos_conv." + name] = t
        elif key.startswith("encoder.layer_norm."):
            out[key[len("encoder."):]] = t
        elif (m := _LAYER_RE.match(key)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            am = re.match(r"^attention\.([qkv])_proj\.(weight|bias)$", rest)
            if am:
                qkv.setdefault(i, {})[am.group(1) + am.group(2)] = t
            elif rest == "attention.rel_attn_embed.weight":
                out["rel_pos.rel_attn_embed.weight"] = t
            elif rest == "attention.gru_rel_pos_const":
                out[f"layers.{i}.attention.gru_rel_pos_const"] = t.reshape(-1)
            else:
                out[f"layers.{i}.{rest}"] = t
        else:
            extra[key] = t
    out.update(fuse_qkv(qkv, "HF checkpoint lacks encoder.layers.{layer}.attention.{name}"))
    return out, extra


def state_dict_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our encoder state dict -> transformers names (bare model, no 'hubert.' prefix)."""
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key.startswith("feature_extractor.") or key.startswith("feature_projection."):
            out[key] = t
        elif key == "mask_emb":
            out["masked_spec_embed"] = t
        elif key.startswith("pos_conv."):
            name = key[len("pos_conv."):]
            name = {"weight_g": "parametrizations.weight.original0",
                    "weight_v": "parametrizations.weight.original1"}.get(name, name)
            out["encoder.pos_conv_embed.conv." + name] = t
        elif key.startswith("layer_norm."):
            out["encoder." + key] = t
        elif key == "rel_pos.rel_attn_embed.weight":
            out["encoder.layers.0.attention.rel_attn_embed.weight"] = t
        elif key.startswith("layers."):
            i, rest = key[len("layers."):].split(".", 1)
            if rest.startswith("attention.qkv."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = t.chunk(3, 0)
                for n, part in zip("qkv", (q, k, v)):
                    out[f"encoder.layers.{i}.attention.{n}_proj.{kind}"] = part.contiguous()
            elif rest == "attention.gru_rel_pos_const":
                out[f"encoder.layers.{i}.{rest}"] = t.reshape(1, -1, 1, 1)
            else:
                out[f"encoder.layers.{i}.{rest}"] = t
        else:
            raise ConfigError(f"cannot export parameter {key!r} to HF format")
    return out
