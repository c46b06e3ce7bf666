"""The encoder family: wav2vec 2.0 / HuBERT / WavLM (Base post-LN and Large pre-LN) and an fbank front end.

``Encoder(config)(wav, lengths)`` returns every layer's output explicitly (no hooks). ``hidden_states`` follows
the installed Hugging Face transformers (5.x) exactly: index 0 is the input of the first transformer layer (after
positional convolution, the post-LN models' LayerNorm and dropout), index i the output of layer i. For pre-LN
models transformers 5.x no longer applies the final LayerNorm to the last entry; ``last_hidden_state`` is the
model output with it (transformers' ``last_hidden_state``) and is what objectives should predict from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from speechssl.config import ConfigError

from .components import (
    ConvFeatureExtractor,
    FbankFrontend,
    FeatureProjection,
    GradMultiply,
    PositionalConv,
    RelativePositionBias,
    TransformerLayer,
    conv_out_frames,
    log_mel_fbank,
)
from .frames import PADDING_RULES, valid_frames

__all__ = ["EncoderConfig", "EncoderOutput", "EncoderGates", "Encoder", "build_encoder", "BASE_CONV_LAYERS"]

BASE_CONV_LAYERS: list[list[int]] = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
FBANK_HOP = 160  # samples per fbank frame (10 ms at 16 kHz)


@dataclass
class EncoderConfig:
    """Architecture of one encoder; JSON-serialisable (``dataclasses.asdict``) and saved in model dirs."""

    model_type: str = "hubert"  # "wav2vec2" | "hubert" | "wavlm" | "bestrq"
    frontend: str = "cnn"  # "cnn" (raw waveform) | "fbank" (log-mel + conv subsampler)
    # [[channels, kernel, stride], ...]: the waveform CNN, or the fbank subsampler (padding kernel // 2)
    conv_layers: list[list[int]] = field(default_factory=lambda: [list(l) for l in BASE_CONV_LAYERS])
    extractor_mode: str = "group_norm"  # "group_norm" | "layer_norm" (CNN front end only)
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
    n_mels: int = 80  # fbank front end only
    input_norm: str = "utterance"  # fbank front end: "utterance" | "global" log-mel normalisation (FbankFrontend)
    # which frames of a padded batch are padding: "cnn" (length arithmetic) | "fairseq_block" (fairseq HuBERT/WavLM)
    padding_rule: str = "cnn"

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the offending key."""
        if self.model_type not in ("wav2vec2", "hubert", "wavlm", "bestrq"):
            raise ConfigError(f"encoder config 'model_type' must be wav2vec2|hubert|wavlm|bestrq, got {self.model_type!r}")
        if self.frontend not in ("cnn", "fbank"):
            raise ConfigError(f"encoder config 'frontend' must be 'cnn' or 'fbank', got {self.frontend!r}")
        if self.input_norm not in FbankFrontend.NORMS:
            raise ConfigError(f"encoder config 'input_norm' must be one of {'|'.join(FbankFrontend.NORMS)}, "
                             f"got {self.input_norm!r}")
        if self.padding_rule not in PADDING_RULES:
            raise ConfigError(f"encoder config 'padding_rule' must be one of {'|'.join(PADDING_RULES)}, "
                             f"got {self.padding_rule!r}")
        if self.extractor_mode not in ("group_norm", "layer_norm"):
            raise ConfigError(f"encoder config 'extractor_mode' must be group_norm|layer_norm, got {self.extractor_mode!r}")
        if not self.conv_layers or any(len(l) != 3 for l in self.conv_layers):
            raise ConfigError(f"encoder config 'conv_layers' must be a non-empty list of [channels, kernel, stride], "
                             f"got {self.conv_layers!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"encoder config 'hidden_size' ({self.hidden_size}) must be divisible by "
                             f"'num_heads' ({self.num_heads})")
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

    def heads_of(self, layer: int) -> list[int]:
        return list(self.layer_heads[layer]) if self.layer_heads is not None else list(range(self.num_heads))

    def ffn_dim_of(self, layer: int) -> int:
        return int(self.layer_ffn_dims[layer]) if self.layer_ffn_dims is not None else self.ffn_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        """Build from a plain dict; unknown keys are errors naming the key (typed check via speechssl.config)."""
        from speechssl.config import from_dict

        cfg = from_dict(cls, dict(data))
        return cfg


@dataclass
class EncoderOutput:
    """What ``Encoder.forward`` returns. T' = frames, D = hidden size, C = front-end channels."""

    hidden_states: list[Tensor]  # num_layers + 1 tensors [B, T', D]; as transformers defines them
    lengths: Tensor  # [B] valid frames
    padding_mask: Tensor  # [B, T'] True = padding
    extract_features: Tensor  # [B, T', C] front-end output after its LayerNorm, before projection
    features_pen: Tensor  # scalar: mean of squared front-end output (feature penalty)
    attentions: Optional[list[Optional[Tensor]]] = None  # per layer [B, H_l, T', T'] (None for removed blocks)
    last_hidden_state: Optional[Tensor] = None  # [B, T', D]: final output (pre-LN: after the final LayerNorm)
    input_features: Optional[Tensor] = None  # fbank front end: normalised log-mel stacked to frames [B, T', M*s]


@dataclass
class EncoderGates:
    """Multiplicative gates for structured pruning (HardConcrete samples); None fields are skipped.

    conv[i]: [C_i] CNN block i's output channels; heads[l]: [H_l] each head's attention output before out_proj;
    attn[l]: [] attention block output before the residual add; ffn_units[l]: [F_l] FFN intermediate
    activations; ffn[l]: [] FFN block output before the residual add. Entries for removed blocks are ignored.
    """

    conv: Optional[list[Tensor]] = None
    heads: Optional[list[Tensor]] = None
    attn: Optional[list[Tensor]] = None
    ffn_units: Optional[list[Tensor]] = None
    ffn: Optional[list[Tensor]] = None


def _pick(gates: Optional[list[Tensor]], i: int) -> Optional[Tensor]:
    return None if gates is None else gates[i]


class Encoder(nn.Module):
    """Front end (waveform CNN or fbank + conv subsampler) -> projection -> positional conv -> transformer.

    Attributes: ``config``, ``num_layers``, ``hidden_size``, ``downsample_rate`` (input samples per frame),
    ``mask_emb`` [D] (HF ``masked_spec_embed``). Dropouts and layer-drop act only in train mode.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.num_layers = config.num_layers
        self.hidden_size = d = config.hidden_size
        strides = 1
        for _, _, s in config.conv_layers:
            strides *= int(s)
        if config.frontend == "cnn":
            self.feature_extractor: nn.Module = ConvFeatureExtractor(
                config.conv_layers, config.extractor_mode, config.conv_bias)
            self.downsample_rate = strides
        else:
            self.feature_extractor = FbankFrontend(config.conv_layers, config.n_mels, bias=True,
                                                    input_norm=config.input_norm)
            self.downsample_rate = strides * FBANK_HOP
        c = int(config.conv_layers[-1][0])
        self.feature_projection = FeatureProjection(
            c, d, config.feature_proj_layer_norm, config.feature_dropout, config.layer_norm_eps)
        self.mask_emb = nn.Parameter(torch.empty(d).uniform_())
        self.pos_conv = PositionalConv(d, config.conv_pos, config.conv_pos_groups)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # post-LN: before layers; pre-LN: final
        self.dropout = nn.Dropout(config.dropout)
        self.rel_pos = (
            RelativePositionBias(config.num_heads, config.num_buckets, config.max_distance)
            if config.relative_position else None
        )
        self.layers = nn.ModuleList([
            TransformerLayer(
                d, config.num_heads, config.heads_of(i), config.ffn_dim_of(i),
                layer_norm_first=config.layer_norm_first, dropout=config.dropout,
                attention_dropout=config.attention_dropout, activation_dropout=config.activation_dropout,
                gated_relative_bias=config.relative_position, eps=config.layer_norm_eps,
            )
            for i in range(config.num_layers)
        ])
        # None: each layer-drop decision draws from torch's global RNG (rank-local under DDP). An int: all of
        # this forward's decisions come from a generator seeded with it, so ranks that set the same value drop
        # the same layers (the trainer sets it per micro-batch under FSDP, whose per-layer gathers must match)
        self.layerdrop_seed: Optional[int] = None
        self.reset_parameters()

    # ------------------------------------------------------------------ init / introspection
    def reset_parameters(self) -> None:
        """BERT-style init (fairseq init_bert_params / HF _init_weights): N(0, 0.02) linears and embeddings,
        Kaiming-normal front-end convs, unit LayerNorms; the positional conv keeps its own init."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.startswith("feature_projection"):
                    bound = 1.0 / m.in_features ** 0.5  # HF: uniform(-1/sqrt(in), 1/sqrt(in))
                    nn.init.uniform_(m.weight, -bound, bound)
                    nn.init.uniform_(m.bias, -bound, bound)
                else:
                    nn.init.normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    k = (m.in_channels // m.groups * m.kernel_size[0]) ** -0.5
                    nn.init.uniform_(m.bias, -k, k)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def prunable_units(self) -> dict[str, Any]:
        """Sizes of the structured-pruning groups: CNN channels, heads and FFN units per layer."""
        return {
            "conv": [int(l[0]) for l in self.config.conv_layers],
            "heads": [len(self.config.heads_of(i)) for i in range(self.num_layers)],
            "ffn_units": [self.config.ffn_dim_of(i) for i in range(self.num_layers)],
            "num_layers": self.num_layers,
        }

    def num_frames(self, num_samples: Tensor) -> Tensor:
        """Valid output frames for ``num_samples`` input samples: LongTensor [B] -> [B] (conv arithmetic)."""
        n = torch.as_tensor(num_samples).long()
        if self.config.frontend == "cnn":
            return conv_out_frames(n, self.config.conv_layers)
        return conv_out_frames(torch.div(n, FBANK_HOP, rounding_mode="floor"), self.config.conv_layers, padded=True)

    def num_frames_from_features(self, num_feature_frames: Tensor) -> Tensor:
        """fbank front end: encoder frames for the given fbank frame counts [B] -> [B]."""
        return conv_out_frames(torch.as_tensor(num_feature_frames).long(), self.config.conv_layers, padded=True)

    # ------------------------------------------------------------------ forward
    def _front_end(self, wav: Optional[Tensor], lengths: Optional[Tensor], features: Optional[Tensor],
                   conv_gates: Optional[list[Tensor]]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """-> (front-end output [B, C, T'], valid frames [B] or None, stacked input features or None)."""
        cfg = self.config
        stacked = None
        if cfg.frontend == "cnn":
            if features is not None:
                raise ValueError("features= is for the fbank front end; this encoder has frontend 'cnn' (pass wav)")
            if wav is None or wav.dim() != 2:
                raise ValueError(f"encoder expects wav of shape [B, T], got "
                                 f"{None if wav is None else tuple(wav.shape)}")
            if cfg.normalize_waveform:
                wav = self._normalize_waveform(wav, lengths)
            x = self.feature_extractor(wav, conv_gates)
            frames = None
            if lengths is not None:  # the checkpoint source's rule (speechssl.models.frames)
                frames = valid_frames(cfg.padding_rule, lengths, wav.shape[1], x.shape[-1], self.num_frames(lengths))
            return x, frames, None
        # fbank: either given features (lengths = fbank frames) or computed from the waveform
        if features is None:
            if wav is None or wav.dim() != 2:
                raise ValueError("fbank encoder expects wav [B, T] or features [B, F, n_mels]")
            with torch.no_grad():
                feats = log_mel_fbank(wav, self.config.n_mels, filters=self.feature_extractor.mel_filters)
            feat_lens = torch.div(lengths, FBANK_HOP, rounding_mode="floor") if lengths is not None else None
        else:
            if features.dim() != 3 or features.shape[-1] != cfg.n_mels:
                raise ValueError(f"features must be [B, F, {cfg.n_mels}], got {tuple(features.shape)}")
            feats, feat_lens = features.float(), lengths
        feats = self.feature_extractor.apply_norm(feats, feat_lens)
        x = self.feature_extractor(feats, conv_gates)
        frames = self.num_frames_from_features(feat_lens) if feat_lens is not None else None
        # stack the normalised input frames to the encoder frame rate (BEST-RQ quantizer input)
        stack = self.downsample_rate // FBANK_HOP
        T = x.shape[-1]
        pad = T * stack - feats.shape[1]
        f = torch.nn.functional.pad(feats, (0, 0, 0, pad)) if pad > 0 else feats[:, : T * stack]
        stacked = f.reshape(f.shape[0], T, stack * cfg.n_mels)
        return x, frames, stacked

    @staticmethod
    def _normalize_waveform(wav: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Zero mean, unit variance over valid samples (eps 1e-7, as HF's feature extractor); padding -> 0."""
        if lengths is None:
            mean = wav.mean(-1, keepdim=True)
            var = wav.var(-1, unbiased=False, keepdim=True)
            return (wav - mean) / (var + 1e-7).sqrt()
        valid = torch.arange(wav.shape[1], device=wav.device)[None] < lengths[:, None]
        cnt = lengths[:, None].clamp_min(1).to(wav.dtype)
        mean = (wav * valid).sum(-1, keepdim=True) / cnt
        var = (((wav - mean) * valid) ** 2).sum(-1, keepdim=True) / cnt
        return (wav - mean) / (var + 1e-7).sqrt() * valid

    def forward(self, wav: Optional[Tensor], lengths: Optional[Tensor] = None, *,
                mask_indices: Optional[Tensor] = None, output_attentions: bool = False,
                features: Optional[Tensor] = None, gates: Optional[EncoderGates] = None) -> EncoderOutput:
        """Encode a padded batch.

        wav: float [B, T] at 16 kHz (may be None when ``features`` is given); lengths: long [B] valid samples
        (valid fbank frames when ``features`` [B, F, n_mels] is given); mask_indices: bool [B, T'] frames replaced
        by ``mask_emb``; gates: pruning gates (see EncoderGates).
        """
        cfg = self.config
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=(wav if wav is not None else features).device).long()
        mult = cfg.feature_grad_mult
        conv_gates = gates.conv if gates is not None else None
        if mult <= 0 and self.training:
            with torch.no_grad():
                x, frames, stacked = self._front_end(wav, lengths, features, conv_gates)
        else:
            x, frames, stacked = self._front_end(wav, lengths, features, conv_gates)
            if self.training and mult != 1.0:
                x = GradMultiply.apply(x, mult)
        features_pen = x.float().pow(2).mean()
        x = x.transpose(1, 2)  # [B, T', C]
        B, T = x.shape[0], x.shape[1]
        if frames is None:
            frames = torch.full((B,), T, dtype=torch.long, device=x.device)
            padding_mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            any_pad = False
        else:
            frames = frames.clamp_max(T)
            padding_mask = torch.arange(T, device=x.device)[None] >= frames[:, None]
            # a full-length batch needs no attention mask (faster SDPA path, identical result)
            any_pad = x.device.type == "meta" or bool(padding_mask.any())
        h, extract_features = self.feature_projection(x)
        if mask_indices is not None:
            if mask_indices.shape != (B, T):
                raise ValueError(f"mask_indices must be [B, T'] = {(B, T)}, got {tuple(mask_indices.shape)}")
            h = torch.where(mask_indices.unsqueeze(-1), self.mask_emb.to(h.dtype), h)
        if any_pad:
            h = h.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        h = h + self.pos_conv(h)
        if not cfg.layer_norm_first:
            h = self.layer_norm(h)
        h = self.dropout(h)
        key_mask = ~padding_mask if any_pad else None
        position_bias = self.rel_pos(T) if self.rel_pos is not None else None

        hidden_states = [h]
        attentions: Optional[list[Optional[Tensor]]] = [] if output_attentions else None
        shared_drops = None
        if self.training and cfg.layerdrop > 0 and self.layerdrop_seed is not None:
            g = torch.Generator().manual_seed(int(self.layerdrop_seed))
            shared_drops = (torch.rand(len(self.layers), generator=g) < cfg.layerdrop).tolist()
        for i, layer in enumerate(self.layers):
            if self.training and cfg.layerdrop > 0 and (
                    shared_drops[i] if shared_drops is not None else torch.rand(()) < cfg.layerdrop):
                hidden_states.append(h)  # skipped layer: its output is its input
                if attentions is not None:
                    attentions.append(None)
                continue
            h, probs = layer(
                h, key_mask, position_bias,
                head_gate=_pick(gates.heads, i) if gates is not None else None,
                attn_gate=_pick(gates.attn, i) if gates is not None else None,
                ffn_unit_gate=_pick(gates.ffn_units, i) if gates is not None else None,
                ffn_gate=_pick(gates.ffn, i) if gates is not None else None,
                output_attentions=output_attentions,
            )
            hidden_states.append(h)
            if attentions is not None:
                attentions.append(probs)
        last = self.layer_norm(h) if cfg.layer_norm_first else h
        return EncoderOutput(
            hidden_states=hidden_states, lengths=frames, padding_mask=padding_mask,
            extract_features=extract_features, features_pen=features_pen, attentions=attentions,
            last_hidden_state=last, input_features=stacked,
        )


def build_encoder(config: Union[EncoderConfig, str, dict, None] = None, **overrides: Any) -> Encoder:
    """Build an encoder from an EncoderConfig, a preset name (``"hubert_base"``, ``"tiny_wavlm"`` ...), a
    ``conf/model/*.yaml`` path, or a dict; keyword overrides replace config fields (e.g. ``num_layers=2``)."""
    if config is None:
        cfg = EncoderConfig()
    elif isinstance(config, EncoderConfig):
        cfg = dataclasses.replace(config)
    elif isinstance(config, dict):
        cfg = EncoderConfig.from_dict(config)
    elif isinstance(config, str):
        from .presets import get_preset

        cfg = get_preset(config)
    else:
        raise TypeError(f"build_encoder: expected EncoderConfig, preset name or dict, got {type(config).__name__}")
    if overrides:
        cfg = EncoderConfig.from_dict({**cfg.to_dict(), **overrides})
    return Encoder(cfg)
