"""The encoder family: wav2vec 2.0 / HuBERT / WavLM (Base post-LN and Large pre-LN) and an fbank front end.

``Encoder(config)(wav, lengths)`` returns every layer's output explicitly (no hooks). ``hidden_states`` follows
the installed Hugging Face transformers (5.x) exactly: index 0 is the input of the first transformer layer (after
positional convolution, the post-LN models' LayerNorm and dropout), index i the output of layer i. For pre-LN
models transformers 5.x no longer applies the final LayerNorm to the last entry; ``last_hidden_state`` is the
model output with it (transformers' ``last_hidden_state``) and is what objectives should predict from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from . import frames as frame_counts
from .components import (
    ConvFeatureExtractor,
    FbankFrontend,
    FeatureProjection,
    GradMultiply,
    PositionalConv,
    RelativePositionBias,
    TransformerLayer,
    log_mel_fbank,
)
from .encoder_config import EncoderConfig
from .frames import FBANK_HOP, valid_frames
from .presets import get_preset

__all__ = ["EncoderConfig", "EncoderOutput", "EncoderGates", "Encoder", "build_encoder"]


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


def _pick(gates: Optional[EncoderGates], group: str, i: int) -> Optional[Tensor]:
    """Layer ``i``'s entry of ``gates.<group>`` (None when there are no gates or no such group)."""
    per_layer = getattr(gates, group) if gates is not None else None
    return None if per_layer is None else per_layer[i]


class Encoder(nn.Module):
    """Front end (waveform CNN or fbank + conv subsampler) -> projection -> positional conv -> transformer.

    Attributes: ``config``, ``num_layers``, ``hidden_size``, ``downsample_rate`` (input samples per frame),
    ``mask_emb`` [D] (HF ``masked_spec_embed``). Dropouts and layer-drop act only in train mode.

    Named modules: ``feature_extractor`` (front end), ``feature_projection``, ``pos_conv``, ``layer_norm``, and
    ``layers``, the ``nn.ModuleList`` of ``TransformerLayer``, run in order by ``forward``. ``layers`` is the place
    to wrap or replace the transformer layers (adapters, LoRA, FSDP auto-wrap, activation checkpointing): a module
    put at ``layers[i]`` is called as ``layer(h, key_mask, position_bias, head_gate=..., attn_gate=...,
    ffn_unit_gate=..., ffn_gate=..., output_attentions=...)`` and returns ``(h, attention probs or None)``; in a
    model with ``config.attn_reuse`` every layer also gets ``attn_map=`` (the reused map [B, H, T', T'] or None),
    and a layer whose map is reused is called with ``output_attentions=True``.

    Frame counts: :meth:`num_frames` (samples -> frames) is the one every caller uses.
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
                reuse_attention=config.reuses_attention(i) >= 0,
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
        """Encoder frames of an utterance of ``num_samples`` samples: LongTensor [B] -> [B] (an int gives a 0-d
        tensor). The frame count every caller uses (label alignment, SUPERB, compression); the arithmetic per
        front end lives in :mod:`speechssl.models.frames`. On a padded batch the encoder marks as valid these
        frames (``padding_rule: cnn``) or fairseq's block count (``fairseq_block``)."""
        return frame_counts.num_frames(self.config, num_samples)

    def num_frames_from_features(self, num_feature_frames: Tensor) -> Tensor:
        """fbank front end: encoder frames of ``num_feature_frames`` log-mel frames: LongTensor [B] -> [B]."""
        return frame_counts.num_frames_from_features(self.config, num_feature_frames)

    # ------------------------------------------------------------------ forward
    def _front_end(self, wav: Optional[Tensor], lengths: Optional[Tensor], features: Optional[Tensor],
                   conv_gates: Optional[list[Tensor]]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """-> (front-end output [B, C, T'], valid frames [B] or None, stacked input features or None)."""
        if self.config.frontend == "cnn":
            return self._cnn_front_end(wav, lengths, features, conv_gates)
        return self._fbank_front_end(wav, lengths, features, conv_gates)

    def _cnn_front_end(self, wav: Optional[Tensor], lengths: Optional[Tensor], features: Optional[Tensor],
                       conv_gates: Optional[list[Tensor]]) -> tuple[Tensor, Optional[Tensor], None]:
        """wav [B, T] -> (CNN output [B, C, T'], valid frames [B] under the config's padding rule, None)."""
        cfg = self.config
        if features is not None:
            raise ValueError("features= is for the fbank front end; this encoder has frontend 'cnn' (pass wav)")
        if wav is None or wav.dim() != 2:
            raise ValueError(f"encoder expects wav of shape [B, T], got {None if wav is None else tuple(wav.shape)}")
        if cfg.normalize_waveform:
            wav = self._normalize_waveform(wav, lengths)
        x = self.feature_extractor(wav, conv_gates)
        frames = None
        if lengths is not None:  # the checkpoint source's rule (speechssl.models.frames)
            frames = valid_frames(cfg.padding_rule, lengths, wav.shape[1], x.shape[-1], self.num_frames(lengths))
        return x, frames, None

    def _fbank_front_end(self, wav: Optional[Tensor], lengths: Optional[Tensor], features: Optional[Tensor],
                         conv_gates: Optional[list[Tensor]]) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """wav [B, T] (lengths in samples) or features [B, F, n_mels] (lengths in log-mel frames) -> (subsampler
        output [B, C, T'], valid frames [B] or None, normalised log-mel stacked to frames [B, T', n_mels * s])."""
        cfg = self.config
        if features is None:
            if wav is None or wav.dim() != 2:
                raise ValueError("fbank encoder expects wav [B, T] or features [B, F, n_mels]")
            with torch.no_grad():
                feats = log_mel_fbank(wav, cfg.n_mels, filters=self.feature_extractor.mel_filters)
            feat_lens = frame_counts.fbank_input_frames(lengths) if lengths is not None else None
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
        # one pad for both cases (a negative pad crops), so a traced graph holds no branch on the input length
        f = torch.nn.functional.pad(feats, (0, 0, 0, T * stack - feats.shape[1]))
        return x, frames, f.reshape(f.shape[0], T, stack * cfg.n_mels)

    @staticmethod
    def _normalize_waveform(wav: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Zero mean, unit variance over valid samples (eps 1e-7, as HF's feature extractor); padding -> 0."""
        if torch.jit.is_tracing() and wav.dtype != torch.float64:
            # ONNX export: onnxruntime sums a long float32 axis with errors torch's reductions avoid; float64 sums
            return Encoder._normalize_waveform(wav.double(), lengths).to(wav.dtype)
        if lengths is None:
            mean = wav.mean(-1, keepdim=True)
            var = wav.var(-1, unbiased=False, keepdim=True)
            return (wav - mean) / (var + 1e-7).sqrt()
        valid = torch.arange(wav.shape[1], device=wav.device)[None] < lengths[:, None]
        cnt = lengths[:, None].clamp_min(1).to(wav.dtype)
        mean = (wav * valid).sum(-1, keepdim=True) / cnt
        var = (((wav - mean) * valid) ** 2).sum(-1, keepdim=True) / cnt
        return (wav - mean) / (var + 1e-7).sqrt() * valid

    def _features(self, wav: Optional[Tensor], lengths: Optional[Tensor], features: Optional[Tensor],
                  conv_gates: Optional[list[Tensor]]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The front end under ``feature_grad_mult`` (0: no gradient into it in training; else scaled by it)."""
        mult = self.config.feature_grad_mult
        if mult <= 0 and self.training:
            with torch.no_grad():
                return self._front_end(wav, lengths, features, conv_gates)
        x, frames, stacked = self._front_end(wav, lengths, features, conv_gates)
        if self.training and mult != 1.0:
            x = GradMultiply.apply(x, mult)
        return x, frames, stacked

    @staticmethod
    def _padding(frames: Optional[Tensor], B: int, T: int, device) -> tuple[Tensor, Tensor, bool]:
        """-> (valid frames [B], padding mask [B, T] True = padding, whether any frame is padding)."""
        if frames is None:
            return (torch.full((B,), T, dtype=torch.long, device=device),
                    torch.zeros(B, T, dtype=torch.bool, device=device), False)
        frames = frames.clamp_max(T)
        padding_mask = torch.arange(T, device=device)[None] >= frames[:, None]
        # a full-length batch needs no attention mask (faster SDPA path, identical result); a traced graph (ONNX
        # export) always masks, since the inputs it will see may be padded
        return frames, padding_mask, device.type == "meta" or torch.jit.is_tracing() or bool(padding_mask.any())

    def _layer_input(self, h: Tensor, mask_indices: Optional[Tensor], padding_mask: Tensor, any_pad: bool
                     ) -> Tensor:
        """Projected features [B, T', D] -> input of the first layer: mask embedding, zeroed padding, positional
        convolution, (post-LN) LayerNorm, dropout."""
        B, T = h.shape[0], h.shape[1]
        if mask_indices is not None:
            if mask_indices.shape != (B, T):
                raise ValueError(f"mask_indices must be [B, T'] = {(B, T)}, got {tuple(mask_indices.shape)}")
            h = torch.where(mask_indices.unsqueeze(-1), self.mask_emb.to(h.dtype), h)
        if any_pad:
            h = h.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        h = h + self.pos_conv(h)
        if not self.config.layer_norm_first:
            h = self.layer_norm(h)
        return self.dropout(h)

    def _layer_drops(self) -> Iterator[bool]:
        """Layer-drop decisions of this forward, one per layer (all False outside training). Without
        ``layerdrop_seed`` each is drawn from torch's global RNG as its layer is reached, between the dropout draws
        of the layers before it."""
        p, n = self.config.layerdrop, len(self.layers)
        if not self.training or p <= 0:
            yield from [False] * n
        elif self.layerdrop_seed is not None:
            g = torch.Generator().manual_seed(int(self.layerdrop_seed))
            yield from (torch.rand(n, generator=g) < p).tolist()
        else:
            for _ in range(n):
                yield bool(torch.rand(()) < p)

    def _run_layers(self, h: Tensor, key_mask: Optional[Tensor], gates: Optional[EncoderGates],
                    output_attentions: bool) -> tuple[list[Tensor], Optional[list[Optional[Tensor]]]]:
        """The transformer stack: h [B, T', D] -> (hidden states: input and every layer's output, attentions)."""
        T = h.shape[1]
        position_bias = self.rel_pos(T) if self.rel_pos is not None else None
        hidden_states = [h]
        attentions: Optional[list[Optional[Tensor]]] = [] if output_attentions else None
        reuse = self.config.attn_reuse
        sources = {j for j in reuse if j >= 0} if reuse is not None else set()
        maps: dict[int, Tensor] = {}  # attention maps [B, H, T, T] of the layers that later layers reuse
        for i, (layer, dropped) in enumerate(zip(self.layers, self._layer_drops())):
            probs = None
            # only layers of a reusing model get the attn_map keyword: wrapped layers elsewhere keep the plain call
            extra = {"attn_map": maps.get(reuse[i])} if reuse is not None else {}
            if not dropped:  # a dropped layer's output is its input
                h, probs = layer(
                    h, key_mask, position_bias,
                    head_gate=_pick(gates, "heads", i), attn_gate=_pick(gates, "attn", i),
                    ffn_unit_gate=_pick(gates, "ffn_units", i), ffn_gate=_pick(gates, "ffn", i),
                    output_attentions=output_attentions or i in sources, **extra,
                )
            if i in sources:
                maps[i] = probs
            hidden_states.append(h)
            if attentions is not None:
                attentions.append(probs)
        return hidden_states, attentions

    def forward(self, wav: Optional[Tensor], lengths: Optional[Tensor] = None, *,
                mask_indices: Optional[Tensor] = None, output_attentions: bool = False,
                features: Optional[Tensor] = None, gates: Optional[EncoderGates] = None) -> EncoderOutput:
        """Encode a padded batch.

        wav: float [B, T] at 16 kHz (may be None when ``features`` is given); lengths: long [B] valid samples
        (valid fbank frames when ``features`` [B, F, n_mels] is given); mask_indices: bool [B, T'] frames replaced
        by ``mask_emb``; gates: pruning gates (see EncoderGates).
        """
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=(wav if wav is not None else features).device).long()
        x, frames, stacked = self._features(wav, lengths, features, gates.conv if gates is not None else None)
        features_pen = x.float().pow(2).mean()
        x = x.transpose(1, 2)  # [B, T', C]
        frames, padding_mask, any_pad = self._padding(frames, x.shape[0], x.shape[1], x.device)
        h, extract_features = self.feature_projection(x)
        h = self._layer_input(h, mask_indices, padding_mask, any_pad)
        hidden_states, attentions = self._run_layers(h, ~padding_mask if any_pad else None, gates, output_attentions)
        h = hidden_states[-1]
        return EncoderOutput(
            hidden_states=hidden_states, lengths=frames, padding_mask=padding_mask,
            extract_features=extract_features, features_pen=features_pen, attentions=attentions,
            last_hidden_state=self.layer_norm(h) if self.config.layer_norm_first else h, input_features=stacked,
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
        cfg = get_preset(config)
    else:
        raise TypeError(f"build_encoder: expected EncoderConfig, preset name or dict, got {type(config).__name__}")
    if overrides:
        cfg = EncoderConfig.from_dict({**cfg.to_dict(), **overrides})
    return Encoder(cfg)
