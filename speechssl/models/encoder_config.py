"""``EncoderConfig``: the architecture of one encoder, JSON-serialisable and saved in every model directory.

Fields with a fixed set of values are ``Literal`` types: the config loader (:mod:`speechssl.config`) rejects other
values naming the key, and :meth:`EncoderConfig.validate` does the same for a config built in code.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from speechssl.config import ConfigError, from_dict

from .frames import PaddingRule

__all__ = ["EncoderConfig", "BASE_CONV_LAYERS", "ModelType", "FrontEnd", "ExtractorMode", "InputNorm"]

BASE_CONV_LAYERS: list[list[int]] = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
"""The wav2vec 2.0 waveform CNN: 7 convs [channels, kernel, stride], 320 samples (20 ms) per frame."""

ModelType = Literal["wav2vec2", "hubert", "wavlm", "bestrq"]
FrontEnd = Literal["cnn", "fbank"]  # raw waveform CNN | log-mel + conv subsampler
ExtractorMode = Literal["group_norm", "layer_norm"]  # CNN norms: GroupNorm in the first block (Base) | every block
InputNorm = Literal["utterance", "global"]  # fbank log-mel normalisation (components.FbankFrontend)


@dataclass
class EncoderConfig:
    """Architecture of one encoder; JSON-serialisable (``dataclasses.asdict``) and saved in model dirs."""

    model_type: ModelType = "hubert"
    frontend: FrontEnd = "cnn"
    # [[channels, kernel, stride], ...]: the waveform CNN, or the fbank subsampler (padding kernel // 2)
    conv_layers: list[list[int]] = field(default_factory=lambda: [list(l) for l in BASE_CONV_LAYERS])
    extractor_mode: ExtractorMode = "group_norm"  # CNN front end only
    conv_bias: bool = False
    normalize_waveform: bool = False  # per-utterance zero-mean unit-variance over valid samples (Large)
    feature_grad_mult: float = 1.0
    feature_proj_layer_norm: bool = True  # LayerNorm on CNN output before projection (HF feat_proj_layer_norm)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    layer_norm_first: bool = False  # pre-LN (Large style)
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feature_dropout: float = 0.0  # dropout on the projected features (fairseq dropout_input)
    final_dropout: float = 0.0  # for downstream heads; the encoder itself does not use it
    layerdrop: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position: bool = False  # WavLM gated relative position bias
    num_buckets: int = 320
    max_distance: int = 800
    # per-layer sizes after pruning (None = uniform); written by compress, read everywhere
    layer_heads: Optional[list[list[int]]] = None  # kept ORIGINAL head indices per layer ([] = no attention)
    layer_ffn_dims: Optional[list[int]] = None  # FFN width per layer (0 = no FFN block)
    # attention-map reuse (Recycle-and-Distill): per layer, the index of an EARLIER layer that computes its own
    # attention map and whose map this layer applies to its values, or -1 to compute its own; a reusing layer has
    # no query/key projections. None = every layer computes its own.
    attn_reuse: Optional[list[int]] = None
    n_mels: int = 80  # fbank front end only
    input_norm: InputNorm = "utterance"  # fbank front end only
    # which frames of a padded batch are padding: "cnn" (length arithmetic) | "fairseq_block" (fairseq HuBERT/WavLM)
    padding_rule: PaddingRule = "cnn"

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the offending key."""
        self._check_choices()
        if not self.conv_layers or any(len(l) != 3 for l in self.conv_layers):
            raise ConfigError(f"encoder config 'conv_layers' must be a non-empty list of [channels, kernel, stride], "
                              f"got {self.conv_layers!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"encoder config 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_heads' ({self.num_heads})")
        self._check_layer_sizes()
        self._check_attn_reuse()

    def _check_choices(self) -> None:
        """The ``Literal`` fields of a config built in code (the loader checks those of a YAML file or dict)."""
        for name, tp in typing.get_type_hints(type(self)).items():
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
            if choices and getattr(self, name) not in choices:
                raise ConfigError(f"encoder config '{name}' must be one of {list(choices)}, "
                                  f"got {getattr(self, name)!r}")

    def _check_layer_sizes(self) -> None:
        """The per-layer (pruned) sizes: one entry per layer, distinct head indices among the original heads."""
        if self.layer_heads is not None:
            if len(self.layer_heads) != self.num_layers:
                raise ConfigError(f"encoder config 'layer_heads' has {len(self.layer_heads)} entries, "
                                  f"num_layers is {self.num_layers}")
            for i, heads in enumerate(self.layer_heads):
                if any(not 0 <= h < self.num_heads for h in heads) or len(set(heads)) != len(heads):
                    raise ConfigError(f"encoder config 'layer_heads[{i}]' must hold distinct head indices in "
                                      f"[0, {self.num_heads}), got {heads}")
        if self.layer_ffn_dims is not None and len(self.layer_ffn_dims) != self.num_layers:
            raise ConfigError(f"encoder config 'layer_ffn_dims' has {len(self.layer_ffn_dims)} entries, "
                              f"num_layers is {self.num_layers}")

    def _check_attn_reuse(self) -> None:
        """Each reusing layer names an earlier layer that computes its own map, with as many heads as it has."""
        if self.attn_reuse is None:
            return
        if len(self.attn_reuse) != self.num_layers:
            raise ConfigError(f"encoder config 'attn_reuse' has {len(self.attn_reuse)} entries, "
                              f"num_layers is {self.num_layers}")
        if self.layerdrop > 0 and any(j >= 0 for j in self.attn_reuse):
            # a dropped source layer would leave its reusers without a map
            raise ConfigError("encoder config 'attn_reuse' needs 'layerdrop' 0 (a dropped layer has no attention map "
                              f"to reuse), got layerdrop={self.layerdrop}")
        for i, j in enumerate(self.attn_reuse):
            if j < 0:
                continue
            if not j < i or self.attn_reuse[j] >= 0 or not self.heads_of(j):
                raise ConfigError(f"encoder config 'attn_reuse[{i}]'={j} must be -1 or an earlier layer that computes "
                                  f"its own attention map (attn_reuse[{j}] = -1, with heads)")
            if len(self.heads_of(i)) != len(self.heads_of(j)):
                raise ConfigError(f"encoder config 'attn_reuse[{i}]'={j}: layer {i} keeps {len(self.heads_of(i))} "
                                  f"heads, layer {j} {len(self.heads_of(j))}; a reused map needs equal head counts")

    def reuses_attention(self, layer: int) -> int:
        """The layer whose attention map ``layer`` reuses, or -1 when it computes its own."""
        return -1 if self.attn_reuse is None else int(self.attn_reuse[layer])

    def heads_of(self, layer: int) -> list[int]:
        return list(self.layer_heads[layer]) if self.layer_heads is not None else list(range(self.num_heads))

    def ffn_dim_of(self, layer: int) -> int:
        return int(self.layer_ffn_dims[layer]) if self.layer_ffn_dims is not None else self.ffn_dim

    def to_dict(self) -> dict[str, Any]:
        """All fields, except ``attn_reuse`` when None: a plain encoder's config.json (and the preset YAMLs)
        stay as they were before the field existed, and loading fills in the default."""
        d = dataclasses.asdict(self)
        if d["attn_reuse"] is None:
            del d["attn_reuse"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        """Build from a plain dict; unknown keys and wrong types or choices are errors naming the key."""
        return from_dict(cls, dict(data))
