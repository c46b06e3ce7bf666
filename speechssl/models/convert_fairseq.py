"""fairseq (and unilm WavLM) checkpoints -> speechssl: config from ``cfg["model"]`` and the known key mapping.

Padding: fairseq HuBERT and unilm WavLM mark a frame of a padded batch as padding only when every sample of its
block is padding (``forward_padding_mask``), not by the CNN length arithmetic that wav2vec 2.0 and transformers
use; the config records the source's rule (``padding_rule``, see ``speechssl.models.frames``) so an imported
checkpoint matches its source on padded batches too.

Loaded with ``torch.load(weights_only=True)`` only. Checkpoints whose config is an argparse Namespace or an
omegaconf object cannot be read that way; the error explains the one-off conversion to plain dicts.

Key mapping (pretraining names; fine-tuned ``w2v_encoder.w2v_model.`` prefixes are stripped):
  feature_extractor.conv_layers.N.0.{weight,bias}      -> feature_extractor.conv_layers.N.conv.*
  feature_extractor.conv_layers.0.2.{weight,bias}      -> ...conv_layers.0.layer_norm.*   (group norm, Base)
  feature_extractor.conv_layers.N.2.1.{weight,bias}    -> ...conv_layers.N.layer_norm.*   (layer norm, Large)
  layer_norm / post_extract_proj                       -> feature_projection.layer_norm / .projection
  mask_emb                                             -> mask_emb
  encoder.pos_conv.0.{weight_g,weight_v,bias} (or parametrizations.weight.original0/1) -> pos_conv.*
  encoder.layer_norm                                   -> layer_norm
  encoder.layers.N.self_attn.{q,k,v}_proj              -> layers.N.attention.qkv (concatenated)
  encoder.layers.N.self_attn.out_proj                  -> layers.N.attention.out_proj
  encoder.layers.N.self_attn.grep_linear / grep_a      -> layers.N.attention.gru_rel_pos_linear / _const (WavLM)
  encoder.layers.0.self_attn.relative_attention_bias   -> rel_pos.rel_attn_embed (WavLM)
  encoder.layers.N.self_attn_layer_norm / fc1 / fc2 / final_layer_norm
                                                       -> layers.N.layer_norm / feed_forward.intermediate_dense /
                                                          feed_forward.output_dense / final_layer_norm
  anything else (final_proj, label_embs_concat, quantizer.*, project_q, w2v_encoder.proj) -> extra parts
"""
from __future__ import annotations

import ast
import os
import re
from typing import Any, Union

import torch
from torch import Tensor

from speechssl.config import ConfigError

from .convert_hf import fuse_qkv
from .encoder_config import EncoderConfig
from .frames import fairseq_padding_rule

__all__ = ["read_fairseq_checkpoint", "config_from_fairseq", "state_dict_from_fairseq", "parse_conv_layers"]

_CONVERT_HINT = (
    "Convert it once, in an environment with fairseq installed and for a file you trust:\n"
    "  import torch; from omegaconf import OmegaConf\n"
    "  c = torch.load('IN.pt', weights_only=False)\n"
    "  cfg = OmegaConf.to_container(c['cfg']) if c.get('cfg') is not None else {'model': vars(c['args'])}\n"
    "  torch.save({'cfg': {'model': cfg['model'], 'task': cfg.get('task', {})}, 'model': c['model']}, 'OUT.pt')\n"
    "then load OUT.pt (or convert to a Hugging Face directory with transformers' conversion script)."
)


def parse_conv_layers(spec: Union[str, list]) -> list[list[int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``, parsed safely
    (list/tuple literals, + and * only; never eval)."""
    if isinstance(spec, (list, tuple)):
        return [[int(v) for v in l] for l in spec]

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            vals = [ev(e) for e in node.elts]
            return vals if isinstance(node, ast.List) else tuple(vals)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ConfigError(f"cannot parse fairseq conv_feature_layers {spec!r}")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
    except SyntaxError:
        raise ConfigError(f"cannot parse fairseq conv_feature_layers {spec!r}") from None
    return [[int(v) for v in l] for l in layers]


def config_from_fairseq(model_cfg: dict[str, Any], task_cfg: dict[str, Any] | None = None) -> EncoderConfig:
    """Map fairseq Wav2Vec2Config / HubertConfig (or unilm WavLMConfig) fields to EncoderConfig."""
    c = model_cfg
    name = str(c.get("_name", c.get("arch", "")))
    if c.get("layer_type", "transformer") != "transformer":
        raise ConfigError(f"fairseq layer_type={c.get('layer_type')!r} (conformer) is not supported")
    if int(c.get("pos_conv_depth", 1)) != 1:
        raise ConfigError(f"fairseq pos_conv_depth={c.get('pos_conv_depth')} (data2vec style) is not supported")
    if c.get("activation_fn", "gelu") != "gelu":
        raise ConfigError(f"fairseq activation_fn={c.get('activation_fn')!r} is not supported (only gelu)")
    wavlm = bool(c.get("relative_position_embedding", False)) or "wavlm" in name.lower()
    model_type = "wavlm" if wavlm else ("hubert" if "hubert" in name.lower() else "wav2vec2")
    mode = c.get("extractor_mode", "default")
    if mode not in ("default", "layer_norm"):
        raise ConfigError(f"fairseq extractor_mode={mode!r} is not supported")
    conv = parse_conv_layers(c.get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2"))
    return EncoderConfig(
        model_type=model_type,
        frontend="cnn",
        conv_layers=conv,
        extractor_mode="group_norm" if mode == "default" else "layer_norm",
        conv_bias=bool(c.get("conv_bias", False)),
        normalize_waveform=bool((task_cfg or {}).get("normalize", c.get("normalize", False))),
        feature_grad_mult=float(c.get("feature_grad_mult", 1.0)),
        hidden_size=int(c.get("encoder_embed_dim", 768)),
        num_layers=int(c.get("encoder_layers", 12)),
        num_heads=int(c.get("encoder_attention_heads", 12)),
        ffn_dim=int(c.get("encoder_ffn_embed_dim", 3072)),
        layer_norm_first=bool(c.get("layer_norm_first", False)),
        dropout=float(c.get("dropout", 0.1)),
        attention_dropout=float(c.get("attention_dropout", 0.1)),
        activation_dropout=float(c.get("activation_dropout", 0.0)),
        feature_dropout=float(c.get("dropout_input", 0.0)),
        layerdrop=float(c.get("encoder_layerdrop", 0.0)),
        conv_pos=int(c.get("conv_pos", 128)),
        conv_pos_groups=int(c.get("conv_pos_groups", 16)),
        relative_position=wavlm,
        num_buckets=int(c.get("num_buckets", 320)),
        max_distance=int(c.get("max_distance", 800)),
        padding_rule=fairseq_padding_rule(model_type),
    )


_LAYER_MAP = {
    "self_attn.out_proj": "attention.out_proj",
    "self_attn.grep_linear": "attention.gru_rel_pos_linear",
    "self_attn_layer_norm": "layer_norm",
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
}


def state_dict_from_fairseq(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rename a fairseq state dict to ours -> (encoder state dict, extra tensors)."""
    out: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for key, t in sd.items():
        k = key
        for prefix in ("w2v_encoder.w2v_model.", "w2v_model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if (m := re.match(r"^feature_extractor\.conv_layers\.(\d+)\.(.+)$", k)):
            i, rest = m.group(1), m.group(2)
            name = {"0.weight": "conv.weight", "0.bias": "conv.bias", "2.weight": "layer_norm.weight",
                    "2.bias": "layer_norm.bias", "2.1.weight": "layer_norm.weight",
                    "2.1.bias": "layer_norm.bias"}.get(rest)
            if name is None:
                raise ConfigError(f"unknown fairseq feature-extractor parameter {key!r}")
            out[f"feature_extractor.conv_layers.{i}.{name}"] = t
        elif k.startswith("layer_norm."):
            out["feature_projection." + k] = t
        elif k.startswith("post_extract_proj."):
            out["feature_projection.projection." + k.split(".", 1)[1]] = t
        elif k == "mask_emb":
            out["mask_emb"] = t
        elif k.startswith("encoder.pos_conv.0."):
            name = k[len("encoder.pos_conv.0."):]
            name = {"parametrizations.weight.original0": "weight_g",
                    "parametrizations.weight.original1": "weight_v"}.get(name, name)
            out["pos_conv." + name] = t
        elif k.startswith("encoder.layer_norm."):
            out[k[len("encoder."):]] = t
        elif (m := re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)) or \
                (m := re.match(r"^encoder\.layers\.(\d+)\.(self_attn\.grep_a)()$", k)):
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(i, {})[mod[-6] + kind] = t
            elif mod == "self_attn.grep_a":
                out[f"layers.{i}.attention.gru_rel_pos_const"] = t.reshape(-1)
            elif mod == "self_attn.relative_attention_bias":
                out["rel_pos.rel_attn_embed.weight"] = t
            elif mod in _LAYER_MAP:
                out[f"layers.{i}.{_LAYER_MAP[mod]}.{kind}"] = t
            else:
                extra[key] = t
        else:
            extra[key] = t
    out.update(fuse_qkv(qkv, "fairseq checkpoint lacks encoder.layers.{layer}.self_attn.{name}"))
    return out, extra


def read_fairseq_checkpoint(path: Union[str, os.PathLike], map_location: str = "cpu"
                            ) -> tuple[EncoderConfig, dict[str, Tensor], dict[str, Tensor]]:
    """torch.load(weights_only=True) a fairseq checkpoint -> (config, encoder state dict, extra tensors)."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refused: explain how to convert
        raise ConfigError(f"{path}: cannot be loaded with torch.load(weights_only=True): it stores Python objects "
                          f"(argparse.Namespace / omegaconf config) that speechssl will not unpickle "
                          f"({type(e).__name__}).\n{_CONVERT_HINT}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConfigError(f"{path}: not a fairseq checkpoint (expected a dict with 'model' and 'cfg')")
    cfg_all = ckpt.get("cfg") or ({"model": ckpt["args"]} if isinstance(ckpt.get("args"), dict) else None)
    if not isinstance(cfg_all, dict):
        raise ConfigError(f"{path}: fairseq checkpoint has no plain-dict 'cfg'.\n{_CONVERT_HINT}")
    model_cfg = cfg_all.get("model", cfg_all)  # unilm WavLM stores the model config flat in 'cfg'
    task_cfg = cfg_all.get("task", {}) or {}
    if isinstance(model_cfg, dict) and isinstance(model_cfg.get("w2v_args"), dict):  # fine-tuned model
        w2v = model_cfg["w2v_args"]
        model_cfg, task_cfg = w2v.get("model", w2v), w2v.get("task", task_cfg) or task_cfg
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{path}: fairseq cfg['model'] is not a plain dict.\n{_CONVERT_HINT}")
    cfg = config_from_fairseq(model_cfg, task_cfg)
    sd, extra = state_dict_from_fairseq(ckpt["model"])
    return cfg, sd, extra
