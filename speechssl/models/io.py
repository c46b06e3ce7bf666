"""Loading and writing encoder checkpoints: speechssl model dirs, Hugging Face dirs, fairseq ``.pt`` files.

Nothing here unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.

speechssl format: ``config.json`` = ``{"format": "speechssl", "encoder": EncoderConfig dict, "meta": {...}}`` and
``model.safetensors`` (encoder state dict). Extra heads (HuBERT final_proj, label embeddings, quantizer ...) go to
``parts.safetensors`` as ``PART/param`` keys, read with ``load_checkpoint_parts``.

Loading is strict: every parameter the config implies must be in the weights, nothing else may be, and shapes
must agree. Edits of ``config.json`` that keep every shape (``num_heads``, ``model_type: wavlm`` on a HuBERT)
would still load silently and compute something else, so ``model.safetensors`` also stores the encoder config it
was saved with (metadata key ``speechssl_encoder_config``) and a speechssl dir whose ``config.json`` disagrees with
it on any architecture key is refused. Directories written before that key existed load as before.

int8 speechssl dirs (``export_pretrained(..., quantize="int8")``) add ``"quantization": {"scheme": "dynamic_int8",
"modules": [...]}`` to ``config.json``; ``model.safetensors`` then holds, per listed linear layer, ``NAME.weight_int8``
[out, in] int8, ``NAME.weight_scale`` [out] float64, ``NAME.weight_zero_point`` [out] int64 and ``NAME.bias``, and
every other tensor as in the float model. ``load_pretrained`` returns the torch dynamic-int8 encoder with exactly
those weights (CPU only); ``read_checkpoint`` returns the dequantised float state dict (for conversions) and
``meta["dequantized_from"]``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from speechssl.config import ConfigError
from speechssl.constants import SAMPLE_RATE
from speechssl.utils.io import atomic_write, atomic_write_json

from .convert_fairseq import read_fairseq_checkpoint
from .convert_hf import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from .encoder import Encoder, EncoderConfig
from .mr_encoder import MREncoder

__all__ = ["load_pretrained", "export_pretrained", "load_checkpoint_parts", "read_checkpoint", "save_state_dict",
           "check_config_matches_weights", "hf_preprocessor_config", "quantize_int8", "int8_linear_names",
           "INT8_SCHEME"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_OPTIONAL_KEYS = {"mask_emb"}  # HF omits masked_spec_embed when mask_time_prob == 0
CONFIG_META_KEY = "speechssl_encoder_config"  # model.safetensors metadata: the encoder config saved with the weights
# keys that act only in training: config.json may change them (e.g. layerdrop 0 to fine-tune) and still fit the weights
TRAINING_ONLY_KEYS = frozenset({"dropout", "attention_dropout", "activation_dropout", "feature_dropout",
                                "final_dropout", "layerdrop", "feature_grad_mult"})


def save_state_dict(sd: dict[str, Tensor], path: PathLike, metadata: Optional[dict[str, str]] = None) -> None:
    """Atomically write a state dict as safetensors (tensors made contiguous and unshared).

    ``metadata`` replaces the default ``{"format": "pt"}`` (which transformers' loader wants): safetensors writes
    the metadata of a file in hash order, so only a single key keeps the same weights the same bytes."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=dict(metadata) if metadata else {"format": "pt"}))


def _load_weights(d: Path, map_location: str) -> dict[str, Tensor]:
    """model.safetensors (single or sharded) or pytorch_model.bin (weights_only) from an HF-style directory."""
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"), device=str(map_location))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for f in files:
            sd.update(load_file(str(d / f), device=str(map_location)))
        return sd
    if (d / "pytorch_model.bin").is_file():
        try:
            return torch.load(d / "pytorch_model.bin", map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with guidance
            raise ConfigError(f"{d / 'pytorch_model.bin'} cannot be loaded with weights_only=True ({e}); "
                              f"re-save it as model.safetensors") from None
    raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _build_and_load(cfg: EncoderConfig, sd: dict[str, Tensor], source: str, mr: Optional[dict] = None) -> Encoder:
    """An Encoder (an MREncoder when ``mr`` gives its stacks) of ``cfg`` with the weights ``sd``, strictly."""
    enc = MREncoder(cfg, **mr) if mr else Encoder(cfg)
    own = enc.state_dict()
    missing = [k for k in own if k not in sd and k not in _OPTIONAL_KEYS]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ConfigError(f"{source}: checkpoint does not match the encoder config: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ConfigError(f"{source}: parameter {k} has shape {tuple(v.shape)}, the config implies "
                              f"{tuple(own[k].shape)}")
    enc.load_state_dict(sd, strict=not any(k not in sd for k in _OPTIONAL_KEYS))
    return enc


def _architecture(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The keys of an encoder config dict that the weights depend on, with defaults for keys a dir written by an
    older speechssl lacks (so a field added later compares equal to its default)."""
    full = {**EncoderConfig().to_dict(), **cfg_dict}
    return {k: v for k, v in full.items() if k not in TRAINING_ONLY_KEYS}


def check_config_matches_weights(cfg_dict: dict[str, Any], weights: Path, cfg_file: Path) -> None:
    """Refuse a speechssl dir whose config.json was changed after its weights were saved (ConfigError naming
    every changed key); a weights file without the stored config (written before it existed) passes."""
    with safe_open(str(weights), framework="pt") as f:
        saved = (f.metadata() or {}).get(CONFIG_META_KEY)
    if saved is None:
        return
    before, now = _architecture(json.loads(saved)), _architecture(cfg_dict)
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if changed:
        what = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"{cfg_file}: the encoder config differs from the one {weights.name} was saved with ({what}"
            f"{', ...' if len(changed) > 6 else ''}). The weights were trained for the saved architecture, so the "
            f"edited one would compute something else. Restore config.json (the saved encoder config is the "
            f"'{CONFIG_META_KEY}' metadata of {weights.name}); to change only training settings, edit "
            f"{', '.join(sorted(TRAINING_ONLY_KEYS))}")


def read_checkpoint(path: PathLike, map_location: str = "cpu"
                    ) -> tuple[EncoderConfig, dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """-> (config, encoder state dict in our names, extra tensors, meta) for any supported checkpoint kind."""
    p = Path(path)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            if (p / "final" / "config.json").is_file():  # an experiment dir: use its final model
                return read_checkpoint(p / "final", map_location)
            raise FileNotFoundError(f"{p}: not a model directory (no config.json)")
        meta_cfg = json.loads(cfg_file.read_text())
        if meta_cfg.get("format") == "speechssl":
            if "encoder" not in meta_cfg:
                raise ConfigError(f"{cfg_file}: speechssl config lacks the 'encoder' section")
            cfg = EncoderConfig.from_dict(meta_cfg["encoder"])
            check_config_matches_weights(meta_cfg["encoder"], p / "model.safetensors", cfg_file)
            sd = load_file(str(p / "model.safetensors"), device=str(map_location))
            meta = dict(meta_cfg.get("meta", {}))
            if meta_cfg.get("mr"):  # a multi-resolution encoder (MR-HuBERT): its layer order
                meta["mr"] = dict(meta_cfg["mr"])
            if meta_cfg.get("quantization"):
                sd = _dequantize_int8(sd, _int8_modules(meta_cfg, cfg_file))
                meta["dequantized_from"] = INT8_SCHEME  # a conversion of these weights writes a float model
            extra: dict[str, Tensor] = {}
            if (p / "parts.safetensors").is_file():
                extra = load_file(str(p / "parts.safetensors"), device=str(map_location))
            return cfg, sd, extra, meta
        if meta_cfg.get("model_type") is not None:
            pre = p / "preprocessor_config.json"
            cfg = config_from_hf(meta_cfg, json.loads(pre.read_text()) if pre.is_file() else None)
            sd, extra = state_dict_from_hf(_load_weights(p, map_location))
            return cfg, sd, extra, {"source": "hf", "path": str(p)}
        raise ConfigError(f"{cfg_file}: neither a speechssl model (format: speechssl) nor an HF config (model_type)")
    if p.is_file() and p.suffix in (".pt", ".pth", ".ckpt"):
        cfg, sd, extra = read_fairseq_checkpoint(p, map_location)
        return cfg, sd, extra, {"source": "fairseq", "path": str(p)}
    raise FileNotFoundError(f"{p}: expected a model directory (speechssl or HF) or a fairseq .pt checkpoint")


def load_pretrained(path: PathLike, map_location: str = "cpu") -> Encoder:
    """Load an encoder (eval mode) from a speechssl model dir, an HF dir (wav2vec2/hubert/wavlm) or fairseq .pt.
    An int8 speechssl dir gives the torch dynamic-int8 encoder (CPU only)."""
    quantized = _quantized_dir(path)
    if quantized is not None:
        return _load_int8(*quantized, map_location=map_location)
    cfg, sd, _, meta = read_checkpoint(path, map_location)
    enc = _build_and_load(cfg, sd, str(path), meta.get("mr")).to(map_location)
    return enc.eval()


def load_checkpoint_parts(path: PathLike, map_location: str = "cpu") -> dict[str, dict[str, Tensor]]:
    """All tensors of a checkpoint grouped by part: ``{"encoder": sd, PART: sd, ...}``.

    For speechssl dirs the parts are those given to ``export_pretrained(parts=...)``; for HF/fairseq checkpoints
    the non-encoder tensors are grouped by their first name component (``final_proj``, ``quantizer`` ...).
    """
    _, sd, extra, _ = read_checkpoint(path, map_location)
    parts: dict[str, dict[str, Tensor]] = {"encoder": sd}
    for k, v in extra.items():
        sep = "/" if "/" in k else "."
        head, _, rest = k.partition(sep)
        parts.setdefault(head, {})[rest or head] = v
    return parts


def hf_preprocessor_config(cfg: EncoderConfig) -> dict[str, Any]:
    """preprocessor_config.json for an HF export: the Wav2Vec2FeatureExtractor settings under which
    transformers' own pipeline (feature extractor, then model) reproduces speechssl's outputs.

    Layer-norm models get ``return_attention_mask: true``: the extractor then normalises each utterance over its
    own samples and the model masks the padding frames, as speechssl does. Group-norm models keep transformers'
    convention (no mask: they were trained without one in fairseq and transformers): on a padded batch HF's
    pipeline then attends to padding frames (and, with ``do_normalize``, normalises over the padding), so its
    outputs differ from speechssl's; passing ``return_attention_mask=True`` to the extractor restores them.
    """
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": SAMPLE_RATE,
        "padding_value": 0.0, "do_normalize": cfg.normalize_waveform,
        "return_attention_mask": cfg.extractor_mode == "layer_norm",
    }


def export_pretrained(encoder: Encoder, out_dir: PathLike, format: Literal["speechssl", "hf"] = "speechssl",
                      meta: Optional[dict[str, Any]] = None,
                      parts: Optional[dict[str, dict[str, Tensor]]] = None,
                      quantize: Optional[Literal["int8"]] = None) -> Path:
    """Write ``encoder`` to ``out_dir``: format "speechssl" (config.json + model.safetensors [+ parts]) or "hf"
    (a directory ``transformers.AutoModel.from_pretrained`` loads with identical outputs; unpruned CNN models).

    ``quantize="int8"`` (speechssl format only) writes the dynamic-int8 model (:func:`quantize_int8`); an
    encoder that is already int8 (loaded from an int8 dir) is written as int8 without it."""
    out = Path(out_dir)
    if quantize not in (None, "int8"):
        raise ValueError(f"export quantize must be None or 'int8', got {quantize!r}")
    int8 = quantize == "int8" or _is_int8(encoder)
    if int8 and format != "speechssl":
        raise ValueError(f"an int8 model is written in the speechssl format (or as ONNX by speechssl.deploy), "
                         f"not {format!r}")
    out.mkdir(parents=True, exist_ok=True)
    if format == "speechssl":
        _write_speechssl(quantize_int8(encoder) if int8 else encoder, out, meta, parts, int8)
    elif format == "hf":
        if isinstance(encoder, MREncoder):
            raise ValueError("an MR-HuBERT encoder (MREncoder) has no transformers counterpart: export it with "
                             "format 'speechssl'")
        sd = encoder.state_dict()
        hf_cfg = config_to_hf(encoder.config)
        if encoder.config.padding_rule != "cnn":
            log.warning("%s: transformers marks padding frames by the CNN length rule, this encoder by %r (its "
                        "fairseq source's): on padded batches the HF model differs near utterance ends",
                        out, encoder.config.padding_rule)
        save_state_dict(state_dict_to_hf(sd), out / "model.safetensors")
        atomic_write_json(out / "preprocessor_config.json", hf_preprocessor_config(encoder.config))
        atomic_write_json(out / "config.json", hf_cfg)
    else:
        raise ValueError(f"export format must be 'speechssl' or 'hf', got {format!r}")
    return out


def _write_speechssl(encoder: Encoder, out: Path, meta: Optional[dict[str, Any]],
                     parts: Optional[dict[str, dict[str, Tensor]]], int8: bool) -> None:
    """config.json + model.safetensors (+ parts.safetensors) of the speechssl format, float or int8."""
    cfg_dict = encoder.config.to_dict()
    sd = _int8_state_dict(encoder) if int8 else encoder.state_dict()
    # the config travels with the weights too, so a later edit of config.json is caught on loading
    save_state_dict(sd, out / "model.safetensors", metadata={CONFIG_META_KEY: json.dumps(cfg_dict)})
    if parts:
        flat = {f"{name}/{k}": v for name, p_sd in parts.items() for k, v in p_sd.items()}
        save_state_dict(flat, out / "parts.safetensors")
    doc: dict[str, Any] = {"format": "speechssl", "encoder": cfg_dict, "meta": dict(meta or {})}
    if isinstance(encoder, MREncoder):
        doc["mr"] = {"stacks": list(encoder.stacks), "adapter_kernel": encoder.adapter_kernel}
    if int8:
        doc["quantization"] = {"scheme": INT8_SCHEME, "modules": _int8_names(encoder)}
    atomic_write_json(out / "config.json", doc)


# ---------------------------------------------------------------------------------------------------------------
# dynamic int8 (torch)

INT8_SCHEME = "dynamic_int8"
"""``config.json`` ``quantization.scheme`` of an int8 speechssl dir: torch dynamic quantisation of the linear layers
(int8 weights per output channel, activations quantised per call), the rest in float32."""
# WavLM's gate reads this layer's weight itself to fold its 8 outputs into 2 (SelfAttention.gated_bias); it is tiny
_INT8_KEEP_FLOAT = ("gru_rel_pos_linear",)


def int8_linear_names(encoder: nn.Module) -> list[str]:
    """Names of the linear layers :func:`quantize_int8` quantises: every ``nn.Linear`` but WavLM's gate."""
    return [n for n, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in _INT8_KEEP_FLOAT]


def _is_int8(encoder: nn.Module) -> bool:
    return any(isinstance(m, DynamicInt8Linear) for m in encoder.modules())


def _int8_names(encoder: nn.Module) -> list[str]:
    return [n for n, m in encoder.named_modules() if isinstance(m, DynamicInt8Linear)]


def quantize_int8(encoder: Encoder) -> Encoder:
    """A dynamic-int8 copy of ``encoder`` in eval mode on the CPU (``torch.ao.quantization.quantize_dynamic``):
    the weights of :func:`int8_linear_names` int8 per output channel (symmetric), activations quantised on the
    fly; front end, positional convolution and LayerNorms stay float32. An int8 encoder is returned as it is."""
    if _is_int8(encoder):
        return encoder
    float_copy = copy.deepcopy(encoder)
    spec = {name: per_channel_dynamic_qconfig for name in int8_linear_names(float_copy)}
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        return quantize_dynamic(float_copy.cpu().eval(), spec, inplace=True)


def _int8_state_dict(encoder: Encoder) -> dict[str, Tensor]:
    """A dynamic-int8 encoder's tensors as plain ones (the module docstring lists the keys)."""
    names = _int8_names(encoder)
    sd: dict[str, Tensor] = {}
    for name in names:
        layer = encoder.get_submodule(name)
        w = layer.weight()
        sd[f"{name}.weight_int8"] = w.int_repr()
        sd[f"{name}.weight_scale"] = w.q_per_channel_scales()
        sd[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points()
        sd[f"{name}.bias"] = layer.bias()
    prefixes = tuple(f"{n}." for n in names)
    sd.update({k: v for k, v in encoder.state_dict().items() if not k.startswith(prefixes)})
    return sd


def _int8_modules(meta_cfg: dict[str, Any], cfg_file: Path) -> list[str]:
    """The ``quantization.modules`` of an int8 dir's config.json, its scheme checked."""
    q = meta_cfg["quantization"]
    if not isinstance(q, dict) or q.get("scheme") != INT8_SCHEME or not isinstance(q.get("modules"), list):
        raise ConfigError(f"{cfg_file}: 'quantization' must be {{'scheme': '{INT8_SCHEME}', 'modules': [...]}} "
                          f"(written by export_pretrained(quantize='int8')), got {q!r}")
    return list(q["modules"])


def _dequantize_int8(sd: dict[str, Tensor], modules: list[str]) -> dict[str, Tensor]:
    """An int8 dir's tensors -> the float state dict (each weight ``(int8 - zero_point) * scale``)."""
    out = dict(sd)
    for name in modules:
        q, scale, zp = (out.pop(f"{name}.weight_{k}") for k in ("int8", "scale", "zero_point"))
        out[f"{name}.weight"] = ((q.double() - zp.double()[:, None]) * scale.double()[:, None]).float()
    return out


def _quantized_dir(path: PathLike) -> Optional[tuple[Path, dict[str, Any]]]:
    """(model dir, its config.json) when ``path`` (a model or experiment dir) holds an int8 speechssl model."""
    p = Path(path)
    for d in (p, p / "final"):
        if (d / "config.json").is_file():
            doc = json.loads((d / "config.json").read_text())
            return (d, doc) if doc.get("format") == "speechssl" and doc.get("quantization") else None
    return None


def _load_int8(d: Path, doc: dict[str, Any], map_location: str = "cpu") -> Encoder:
    """The dynamic-int8 encoder of an int8 dir, with its stored int8 weights and scales bit for bit."""
    if str(map_location) != "cpu":
        raise ConfigError(f"{d}: an int8 model runs on the CPU (torch dynamic quantisation has no "
                          f"{map_location} kernels); load it with map_location='cpu' or use the float model")
    cfg_file = d / "config.json"
    if "encoder" not in doc:
        raise ConfigError(f"{cfg_file}: speechssl config lacks the 'encoder' section")
    check_config_matches_weights(doc["encoder"], d / "model.safetensors", cfg_file)
    raw = load_file(str(d / "model.safetensors"))
    modules = _int8_modules(doc, cfg_file)
    enc = quantize_int8(_build_and_load(EncoderConfig.from_dict(doc["encoder"]), _dequantize_int8(raw, modules),
                                        str(d)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        for name in modules:
            # the stored values times their scale re-quantise to themselves exactly (|int8| <= 128)
            w = torch.quantize_per_channel(
                (raw[f"{name}.weight_int8"].double() * raw[f"{name}.weight_scale"][:, None]).float(),
                raw[f"{name}.weight_scale"], raw[f"{name}.weight_zero_point"], 0, torch.qint8)
            enc.get_submodule(name).set_weight_bias(w, raw[f"{name}.bias"])
    return enc.eval()
