"""Upstreams for SUPERB: any encoder ``speechssl.load_pretrained`` loads, the FBANK / MFCC baselines, and
``random:PRESET_OR_MODEL``, an architecture with fresh (seeded) weights: the control for what pretraining adds.

Every upstream maps ``(wav [B, T], lengths [B])`` to ``(hidden_states, frames)``: a list of ``num_states``
tensors [B, T', D] already cut to the frame count the input lengths imply, and ``frames`` [B]. Modes for
encoders:

- ``frozen`` (default): eval mode (dropout and layer-drop off), no gradients, parameters excluded from the
  optimiser; hidden states may be cached (see :mod:`speechssl.superb.cache`).
- ``finetune``: the whole encoder trains with the head.
- ``adapter``: a bottleneck adapter after every transformer layer (up-projection initialised to zero so the
  start is the frozen model); only the adapters train.
- ``lora``: low-rank updates ``B @ A`` added to the transformer layers' linear maps (B initialised to zero);
  only A and B train.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn as nn

from speechssl.superb.featurizer import cut_to_frames, expected_frames

__all__ = ["Upstream", "EncoderUpstream", "FbankUpstream", "MfccUpstream", "LoRALinear", "BottleneckAdapter",
           "build_upstream", "build_random_encoder", "random_init_buffers", "random_init_config", "is_random_spec", "count_params",
           "MODES"]

log = logging.getLogger(__name__)
MODES = ("frozen", "finetune", "adapter", "lora")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# FBANK / MFCC baselines


def _features(fn, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = fn(wav, lengths)
    if isinstance(out, (tuple, list)):
        feats, flens = out[0], out[1]
    else:
        feats, flens = out, None
    if flens is None:
        flens = expected_frames(lengths, 160).clamp(max=feats.shape[1])
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

    downsample_rate = 160
    num_states = 1
    base_dim = 80  # static coefficients; deltas are added only when the extractor returned these alone

    def __init__(self, deltas: bool = True, cmvn: bool = True):
        super().__init__()
        self.deltas, self.cmvn = deltas, cmvn
        self.hidden_size = self.base_dim * 3 if deltas else self.base_dim

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
        frames = expected_frames(lengths, self.downsample_rate)
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


def find_layer_stack(encoder: nn.Module, num_layers: int) -> nn.ModuleList:
    """The encoder's list of transformer layers: the ModuleList of ``num_layers`` entries (named ``layers``
    preferred)."""
    found = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not found:
        raise ValueError(f"cannot find a list of {num_layers} transformer layers in {type(encoder).__name__}")
    found.sort(key=lambda nm: (not nm[0].endswith("layers"), nm[0].count(".")))
    return found[0][1]


def _add_adapters(layers: nn.ModuleList, dim: int, bottleneck: int) -> nn.ModuleList:
    adapters = nn.ModuleList([BottleneckAdapter(dim, bottleneck) for _ in layers])

    def make_hook(adapter):
        def hook(module, args, output):
            if torch.is_tensor(output):
                return adapter(output)
            if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
                return (adapter(output[0]),) + tuple(output[1:])
            raise TypeError(f"adapter hook: unsupported layer output type {type(output).__name__}")
        return hook

    for layer, adapter in zip(layers, adapters):
        layer.register_forward_hook(make_hook(adapter))
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
        self.adapters = None
        if mode == "adapter":
            self.adapters = _add_adapters(find_layer_stack(encoder, encoder.num_layers), self.hidden_size,
                                          adapter_dim)
        elif mode == "lora":
            n = _add_lora(find_layer_stack(encoder, encoder.num_layers), lora_targets, lora_rank, lora_alpha)
            log.info("LoRA: wrapped %d linear layers (rank %d)", n, lora_rank)
        self.train(False)

    def upstream_params(self) -> int:
        return self._upstream_params

    def train(self, mode: bool = True):
        super().train(mode)
        # a frozen (or adapter/LoRA-tuned) encoder keeps dropout and layer-drop off; only fine-tuning trains it
        if self.mode != "finetune":
            self.encoder.eval()
            if self.adapters is not None:
                self.adapters.train(mode)
        return self

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.encoder(wav, lengths)
        frames = expected_frames(lengths, self.downsample_rate)
        states = cut_to_frames(list(out.hidden_states), frames)
        return states, frames.clamp(min=1, max=states[0].shape[1])


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
    from speechssl import load_pretrained

    encoder = load_pretrained(spec, map_location=map_location)
    return EncoderUpstream(encoder, mode=mode, name=str(spec), **kwargs)
