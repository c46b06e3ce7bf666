"""Upstreams for SUPERB: any encoder ``speechssl.load_pretrained`` loads, the FBANK / MFCC baselines, and
``random:PRESET_OR_MODEL``, an architecture with fresh (seeded) weights: the control for what pretraining adds.

Every upstream maps ``(wav [B, T], lengths [B])`` to ``(hidden_states, frames)``: a list of ``num_states``
tensors [B, T', D] cut to the upstream's own frame count (its ``num_frames``: the encoder's, or whole 10 ms hops
for FBANK / MFCC) and ``frames`` [B]. Modes for encoders:

- ``frozen`` (default): eval mode (dropout and layer-drop off), no gradients, parameters excluded from the
  optimiser; hidden states may be cached (see :mod:`speechssl.superb.cache`).
- ``finetune``: the whole encoder trains with the head.
- ``adapter``: every transformer layer ``encoder.layers[i]`` is replaced by ``AdaptedLayer(layer, adapter)``,
  which runs the layer and then a bottleneck adapter on its output (up-projection initialised to zero, so the
  start is the frozen model); only the adapters train. Their state-dict keys are
  ``encoder.layers.I.adapter.*``.
- ``lora``: the linear maps inside ``encoder.layers[i]`` (those whose name contains one of ``lora_targets``) are
  replaced by ``LoRALinear``, adding a low-rank update ``B @ A`` (B initialised to zero); only A and B train.
  Their keys are ``encoder.layers.I.NAME.lora_a`` / ``lora_b``.

Deployed models score as they run: an int8 speechssl dir (``speechssl export ... --quantize int8``) loads through
``load_pretrained`` as the torch dynamic-int8 encoder, and an ONNX dir with every hidden state (``speechssl export
... --format onnx [--quantize int8]``) runs in onnxruntime (:class:`OnnxUpstream`); both are frozen only.

An encoder must expose its transformer layers as a ``layers`` ModuleList of ``num_layers`` entries, each called
as ``layer(h, ...) -> (h [B, T', D], attention or None)`` (``speechssl.models.encoder.Encoder``), and its frame
count as ``num_frames(num_samples [B]) -> [B]``.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from speechssl.models.frames import FBANK_HOP, fbank_input_frames
from speechssl.superb.featurizer import cut_to_frames

__all__ = ["Upstream", "EncoderUpstream", "OnnxUpstream", "FbankUpstream", "MfccUpstream", "LoRALinear", "BottleneckAdapter",
           "AdaptedLayer", "build_upstream", "build_random_encoder", "random_init_buffers", "random_init_config",
           "is_random_spec", "count_params", "MODES", "STATES_VERSION"]

log = logging.getLogger(__name__)
MODES = ("frozen", "finetune", "adapter", "lora")
STATES_VERSION = 2
"""Increases when the hidden states an upstream gives for the same model and input change (version 2: encoder
states cut to ``Encoder.num_frames`` instead of ``samples // downsample_rate``); part of the cache key."""


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, the weights of torch dynamic-int8 linear layers (not parameters()) included."""
    n = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, DynamicInt8Linear):
            bias = m.bias()
            n += m.weight().numel() + (bias.numel() if bias is not None else 0)
    return n


class Upstream(nn.Module):
    """Base class: subclasses set ``num_states``, ``hidden_size``, ``downsample_rate``, ``name`` and ``mode``."""

    num_states: int
    hidden_size: int
    downsample_rate: int
    name: str
    mode: str = "frozen"

    @property
    def frozen(self) -> bool:
        return self.mode == "frozen"

    def upstream_params(self) -> int:
        """Parameters of the upstream model itself (adapters and LoRA excluded)."""
        return 0

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Frames this upstream gives for inputs of ``num_samples`` samples: [B] -> [B] (long)."""
        raise NotImplementedError

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# FBANK / MFCC baselines


def _features(fn, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats, flens = fn(wav, lengths)
    return feats, flens.long()


def utterance_cmvn(x: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance mean and variance normalisation over valid frames: [B, T, D] -> [B, T, D] (padding zeroed)."""
    mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).unsqueeze(-1).to(x.dtype)
    n = mask.sum(1, keepdim=True).clamp(min=1)
    mean = (x * mask).sum(1, keepdim=True) / n
    var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / n
    return (x - mean) / torch.sqrt(var + eps) * mask


class _FeatureUpstream(Upstream):
    """Hand-crafted features as a single hidden state, 10 ms frames (downsample rate 160)."""

    downsample_rate = FBANK_HOP
    num_states = 1
    base_dim = 80  # static coefficients; deltas are added only when the extractor returned these alone

    def __init__(self, deltas: bool = True, cmvn: bool = True):
        super().__init__()
        self.deltas, self.cmvn = deltas, cmvn
        self.hidden_size = self.base_dim * 3 if deltas else self.base_dim

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Whole 10 ms hops: the extractor's last frame, centred past the end of an utterance whose length is not
        a multiple of the hop, is left out."""
        return fbank_input_frames(num_samples)

    def _base(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats, flens = self._base(wav.float(), lengths)
        if self.deltas and feats.shape[-1] == self.base_dim:
            from speechssl.data.features import add_deltas

            # per item over its valid frames, so batch padding never leaks into the edge deltas
            out = feats.new_zeros(*feats.shape[:-1], feats.shape[-1] * 3)
            for i in range(feats.shape[0]):
                n = int(flens[i])
                out[i, :n] = add_deltas(feats[i, :n])
            feats = out
        if feats.shape[-1] != self.hidden_size:
            raise ValueError(f"{self.name}: features have {feats.shape[-1]} dims, expected {self.hidden_size}")
        if self.cmvn:
            feats = utterance_cmvn(feats, flens)
        frames = self.num_frames(lengths)
        (feats,) = cut_to_frames([feats], frames)
        return [feats], torch.minimum(frames, flens.to(frames.device)).clamp(min=1)


class FbankUpstream(_FeatureUpstream):
    """80 log-mel bins (+ deltas + delta-deltas = 240 dims), utterance CMVN, 25 ms window / 10 ms shift."""

    name = "fbank"
    base_dim = 80

    def _base(self, wav, lengths):
        from speechssl.data.features import compute_fbank

        return _features(compute_fbank, wav, lengths)


class MfccUpstream(_FeatureUpstream):
    """13 MFCCs + deltas + delta-deltas (39 dims), utterance CMVN, 10 ms shift."""

    name = "mfcc"
    base_dim = 13

    def _base(self, wav, lengths):
        from speechssl.data.features import compute_mfcc

        feats, flens = _features(compute_mfcc, wav, lengths)
        if not self.deltas and feats.shape[-1] == 39:  # the extractor already appended deltas: keep the statics
            feats = feats[..., :13]
        return feats, flens


# ----------------------------------------------------------------------------------------------------------
# parameter-efficient tuning


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with ``base`` frozen, ``A`` [r, in] random, ``B`` [out, r] zero."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.drop(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale


class BottleneckAdapter(nn.Module):
    """Houlsby-style residual adapter: ``h + up(gelu(down(layer_norm(h))))``, ``up`` initialised to zero."""

    def __init__(self, dim: int, bottleneck: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(self.norm(h))))


class AdaptedLayer(nn.Module):
    """A transformer layer followed by a bottleneck adapter on its hidden-state output."""

    def __init__(self, layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.layer, self.adapter = layer, adapter

    def forward(self, h: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h`` [B, T, D] and the layer's other arguments -> (adapted output [B, T, D], the layer's attention)."""
        out, attn = self.layer(h, *args, **kwargs)
        return self.adapter(out), attn


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """``encoder.layers``, the ModuleList of its ``num_layers`` transformer layers; anything else is an error."""
    layers = getattr(encoder, "layers", None)
    n = int(encoder.num_layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) != n:
        raise ValueError(f"upstream_mode adapter/lora needs an encoder whose transformer layers are its `layers` "
                         f"ModuleList of num_layers={n} entries (as speechssl.models.encoder.Encoder); "
                         f"{type(encoder).__name__} has none")
    return layers


def _add_adapters(layers: nn.ModuleList, dim: int, bottleneck: int) -> list[BottleneckAdapter]:
    """Replace every layer of ``layers`` by ``AdaptedLayer(layer, adapter)``; returns the new adapters."""
    adapters = []
    for i, layer in enumerate(layers):
        adapters.append(BottleneckAdapter(dim, bottleneck))
        layers[i] = AdaptedLayer(layer, adapters[-1])
    return adapters


def _add_lora(layers: nn.ModuleList, targets: Sequence[str], r: int, alpha: float) -> int:
    """Wrap the linear maps inside ``layers`` whose name contains one of ``targets`` (all if empty)."""
    count = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Linear) and (not targets or any(t in full for t in targets)):
                    setattr(module, child_name, LoRALinear(child, r=r, alpha=alpha))
                    count += 1
    if count == 0:
        raise ValueError(f"LoRA: no linear layer in the transformer layers matches lora_targets={list(targets)}")
    return count


class EncoderUpstream(Upstream):
    """A speechssl Encoder (or anything with its interface) as an upstream; see the module docstring for modes."""

    def __init__(self, encoder: nn.Module, mode: str = "frozen", name: str = "encoder", adapter_dim: int = 64,
                 lora_rank: int = 8, lora_alpha: float = 16.0, lora_targets: Sequence[str] = ()):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown upstream mode '{mode}' (config key upstream_mode); choose from {MODES}")
        self.encoder, self.mode, self.name = encoder, mode, name
        self.num_states = int(encoder.num_layers) + 1
        self.hidden_size = int(encoder.hidden_size)
        self.downsample_rate = int(encoder.downsample_rate)
        self._upstream_params = count_params(encoder)
        if mode != "finetune":
            for p in encoder.parameters():
                p.requires_grad_(False)
        self.adapters: list[BottleneckAdapter] = []  # also inside encoder.layers (AdaptedLayer), which owns them
        if mode == "adapter":
            self.adapters = _add_adapters(transformer_layers(encoder), self.hidden_size, adapter_dim)
        elif mode == "lora":
            n = _add_lora(transformer_layers(encoder), lora_targets, lora_rank, lora_alpha)
            log.info("LoRA: wrapped %d linear layers (rank %d)", n, lora_rank)
        self.train(False)

    def upstream_params(self) -> int:
        return self._upstream_params

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        return self.encoder.num_frames(num_samples)

    def train(self, mode: bool = True):
        super().train(mode)
        # a frozen (or adapter/LoRA-tuned) encoder keeps dropout and layer-drop off; only fine-tuning trains it
        if self.mode != "finetune":
            self.encoder.eval()
            for adapter in self.adapters:
                adapter.train(mode)
        return self

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.encoder(wav, lengths)
        frames = self.num_frames(lengths).to(lengths.device)
        states = cut_to_frames(list(out.hidden_states), frames)
        return states, frames.clamp(min=1, max=states[0].shape[1])


class OnnxUpstream(Upstream):
    """An ONNX encoder directory with every hidden state, run by onnxruntime on the CPU (frozen only); its hidden
    states and frames are those of the exported encoder."""

    def __init__(self, path: str, name: str | None = None, num_threads: int | None = None):
        super().__init__()
        from speechssl.config import ConfigError
        from speechssl.deploy import OnnxEncoder

        self.runner = OnnxEncoder(path, num_threads=num_threads or torch.get_num_threads())
        cfg = self.runner.config
        if self.runner.layers != list(range(cfg.num_layers + 1)):
            raise ConfigError(f"config key upstream: {path} outputs hidden states {self.runner.layers}; a SUPERB "
                              f"upstream needs all {cfg.num_layers + 1} (export it without --layers)")
        self.name, self.num_states, self.hidden_size = str(name or path), cfg.num_layers + 1, cfg.hidden_size
        self.downsample_rate = self.runner.downsample_rate

    def upstream_params(self) -> int:
        return self.runner.num_params()

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        return self.runner.num_frames(num_samples)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        states, _ = self.runner(wav.detach().float().cpu().numpy(), lengths.cpu().numpy())
        frames = self.num_frames(lengths.cpu()).to(lengths.device)
        out = cut_to_frames([torch.from_numpy(states[l]).to(wav.device) for l in self.runner.layers], frames)
        return out, frames.clamp(min=1, max=out[0].shape[1])


RANDOM_PREFIX = "random:"


def is_random_spec(spec: str) -> bool:
    """True for ``random:TARGET`` specs (the random-init control of an architecture)."""
    return str(spec).startswith(RANDOM_PREFIX)


def _config_of_model(path: str):
    """The EncoderConfig of a model path without loading its weights where the format allows it."""
    import json
    from pathlib import Path

    from speechssl.models.encoder import EncoderConfig
    from speechssl.models.io import read_checkpoint

    p = Path(path)
    for cfg_file in (p / "config.json", p / "final" / "config.json"):  # a model dir, or an experiment dir
        if cfg_file.is_file():
            data = json.loads(cfg_file.read_text())
            if data.get("format") == "speechssl" and "encoder" in data:
                return EncoderConfig.from_dict(data["encoder"])
            break
    return read_checkpoint(path)[0]  # HF dirs and fairseq .pt: the converters derive the config


def random_init_config(spec: str):
    """The EncoderConfig a ``random:TARGET`` spec names: TARGET is a preset name, a conf/model/*.yaml file or a
    model path ``speechssl.load_pretrained`` loads (its architecture, not its weights)."""
    from speechssl.config import ConfigError
    from speechssl.models.presets import get_preset, list_presets

    target = str(spec)[len(RANDOM_PREFIX):]
    is_yaml = target.endswith((".yaml", ".yml"))
    try:
        if target and os.path.exists(target) and not is_yaml:
            return _config_of_model(target)
        return get_preset(target)
    except KeyError:  # an unknown preset name (or a path that does not exist)
        import difflib

        close = difflib.get_close_matches(target, list_presets(), n=1)
        hint = f"; did you mean random:{close[0]}?" if close else "."
        raise ConfigError(f"config key upstream: '{spec}' names no encoder preset, conf/model/*.yaml file or "
                          f"existing model path{hint} Use random:PRESET (one of {', '.join(list_presets())}) "
                          f"or random:MODEL_DIR") from None
    except (OSError, ValueError) as e:  # a path that is not a model, or a config that does not parse
        raise ConfigError(f"config key upstream: cannot read the architecture for '{spec}': {e}") from None


def random_init_buffers(spec: str) -> dict[str, torch.Tensor]:
    """The saved buffers of a ``random:MODEL`` target (e.g. the fbank front end's corpus input statistics): data
    statistics, not learned weights, so the control keeps them and sees its input exactly as the pretrained model
    does. Empty for presets and for models without such buffers."""
    target = str(spec)[len(RANDOM_PREFIX):]
    if not (target and os.path.exists(target)) or target.endswith((".yaml", ".yml")):
        return {}
    from speechssl import load_pretrained

    with torch.random.fork_rng(devices=[]):
        model = load_pretrained(target)
    params = {name for name, _ in model.named_parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in params}


def build_random_encoder(spec: str, seed: int = 0) -> nn.Module:
    """A freshly initialised encoder of the architecture ``random:TARGET`` names, in eval mode.

    Every parameter is drawn right after ``torch.manual_seed(seed)`` (the SUPERB config's ``seed``), so reruns and
    the hidden-state cache see the same model; the global RNG is left as it was. Buffers of a model target are
    kept (``random_init_buffers``).
    """
    from speechssl.models.encoder import Encoder

    cfg = random_init_config(spec)
    with torch.random.fork_rng(devices=[]):  # keep the caller's RNG stream (head init, crops) unchanged
        torch.manual_seed(seed)
        encoder = Encoder(cfg)
        buffers = random_init_buffers(spec)  # loading the target builds (and so initialises) a model too
    if buffers:
        encoder.load_state_dict(buffers, strict=False)
    return encoder.eval()


def build_upstream(spec: str, mode: str = "frozen", map_location: str = "cpu", seed: int = 0,
                   **kwargs) -> Upstream:
    """``spec``: ``fbank``, ``mfcc``, a model path for ``speechssl.load_pretrained``, or ``random:TARGET``
    (TARGET's architecture with fresh weights drawn from ``seed``; TARGET is a preset, conf/model/*.yaml or a
    model path): the control row that shows what pretraining adds over the architecture alone."""
    if spec == "fbank":
        return FbankUpstream()
    if spec == "mfcc":
        return MfccUpstream()
    if is_random_spec(spec):
        from speechssl.superb.report import upstream_label

        encoder = build_random_encoder(spec, seed=seed).to(map_location)
        return EncoderUpstream(encoder, mode=mode, name=upstream_label(spec), **kwargs)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"upstream '{spec}' is neither fbank, mfcc, random:PRESET_OR_MODEL nor an "
                                f"existing model path (config key upstream)")
    from speechssl.deploy.onnx_export import is_onnx_dir

    if is_onnx_dir(spec):
        if mode != "frozen":
            from speechssl.config import ConfigError

            raise ConfigError(f"config key upstream_mode: an ONNX upstream ({spec}) runs frozen only, not {mode!r}")
        return OnnxUpstream(spec, name=str(spec))
    from speechssl import load_pretrained

    encoder = load_pretrained(spec, map_location=map_location)
    return EncoderUpstream(encoder, mode=mode, name=str(spec), **kwargs)
