"""Encoder frame counts: the one place that turns input lengths into encoder frames, per front end.

Frames of an utterance of ``n`` samples (what ``Encoder.num_frames`` returns and the encoder produces):

- CNN front end (``frontend: cnn``): each conv ``[channels, kernel k, stride s]`` of ``conv_layers`` maps ``t``
  frames to ``floor((t - k) / s) + 1`` (no padding), clamped at 0.
- fbank front end (``frontend: fbank``): ``n // FBANK_HOP`` log-mel frames (10 ms hop), then each subsampling conv
  pads ``k // 2`` on both sides: ``floor((t + 2 * (k // 2) - k) / s) + 1``.

Label alignment, featurizer cutting, SUPERB and compression call ``Encoder.num_frames`` (or :func:`num_frames`
with the encoder's config where no encoder is built); nothing else restates the arithmetic.

Which frames of a *padded batch* count as padding is a second question, with two answers among the checkpoints
speechssl imports, which disagree near the end of a padded utterance:

- ``"cnn"``: a frame is valid when the CNN computed it from valid samples only, by the length arithmetic above.
  transformers uses it for every model, and fairseq for wav2vec 2.0. Native speechssl models and
  transformers-converted checkpoints keep it.
- ``"fairseq_block"``: fairseq HuBERT and unilm WavLM (``forward_padding_mask``) cut the sample padding mask to a
  multiple of the batch's frame count, give each frame a block of ``T // T'`` samples and call a frame padding
  only when every sample of its block is padding. That counts a few more frames as valid, and how many depends on
  the padded batch width. A fairseq HuBERT Large on a padded batch differs from the CNN rule by up to 0.54
  near utterance ends, so an imported fairseq checkpoint keeps its source's rule.

The encoder reads the rule from ``EncoderConfig.padding_rule``; :func:`valid_frames` is the computation.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from speechssl.constants import SAMPLE_RATE

__all__ = ["FBANK_HOP", "PaddingRule", "conv_layer_frames", "fbank_input_frames", "num_frames",
           "num_frames_from_features", "front_end_layer_frames", "valid_frames", "block_valid_frames",
           "fairseq_padding_rule"]

FBANK_HOP = SAMPLE_RATE // 100
"""Samples per log-mel frame of the fbank front end (10 ms at 16 kHz)."""

PaddingRule = Literal["cnn", "fairseq_block"]


def conv_layer_frames(lengths: Tensor, conv_layers: Sequence[Sequence[int]], padded: bool) -> list[Tensor]:
    """Frames after each conv of a stack: ``[t_1, ..., t_L]``, each shaped like ``lengths`` (long).

    ``t_i = floor((t_{i-1} + 2 p - k) / s) + 1`` clamped at 0, with ``p = k // 2`` when ``padded`` (the fbank
    subsampler) and 0 otherwise (the waveform CNN); ``conv_layers`` is ``[[channels, kernel, stride], ...]``.
    """
    t = torch.as_tensor(lengths).long()
    out = []
    for _, k, s in conv_layers:
        p = int(k) // 2 if padded else 0
        t = (torch.div(t + 2 * p - int(k), int(s), rounding_mode="floor") + 1).clamp_min(0)
        out.append(t)
    return out


def fbank_input_frames(num_samples: Tensor) -> Tensor:
    """Log-mel frames of ``num_samples`` samples (the fbank front end's input to its subsampler): [B] -> [B]."""
    return torch.div(torch.as_tensor(num_samples).long(), FBANK_HOP, rounding_mode="floor")


def front_end_layer_frames(config, num_samples: Tensor) -> list[Tensor]:
    """Frames after each conv of the front end of ``config`` (an EncoderConfig) for ``num_samples`` samples."""
    if config.frontend == "cnn":
        return conv_layer_frames(num_samples, config.conv_layers, padded=False)
    return conv_layer_frames(fbank_input_frames(num_samples), config.conv_layers, padded=True)


def num_frames(config, num_samples: Tensor) -> Tensor:
    """Encoder frames of an utterance of ``num_samples`` samples under ``config`` (an EncoderConfig): [B] -> [B]
    long (an int gives a 0-d tensor). ``Encoder.num_frames`` is this with the encoder's config."""
    return front_end_layer_frames(config, num_samples)[-1]


def num_frames_from_features(config, num_feature_frames: Tensor) -> Tensor:
    """fbank front end: encoder frames of ``num_feature_frames`` log-mel frames: [B] -> [B] long."""
    if config.frontend != "fbank":
        raise ValueError(f"num_frames_from_features is for encoder config frontend 'fbank', not {config.frontend!r}"
                         "; use num_frames with sample counts")
    return conv_layer_frames(num_feature_frames, config.conv_layers, padded=True)[-1]


def block_valid_frames(lengths: Tensor, num_samples: int, batch_frames: int) -> Tensor:
    """fairseq's rule: valid frames [B] for ``lengths`` [B] valid samples of a batch padded to ``num_samples``
    samples, from which the CNN made ``batch_frames`` frames.

    Frame ``t`` owns samples ``[t * k, (t + 1) * k)`` with ``k = num_samples // batch_frames`` (the last
    ``num_samples % batch_frames`` samples belong to no frame). It is valid when any of them is valid, i.e. when
    ``t * k < length``, so the count is ``ceil(min(length, batch_frames * k) / k)``.
    """
    lengths = torch.as_tensor(lengths).long()
    if batch_frames <= 0:
        return torch.zeros_like(lengths)
    k = num_samples // batch_frames
    used = lengths.clamp(min=0, max=batch_frames * k)
    return torch.div(used + k - 1, k, rounding_mode="floor")


def valid_frames(rule: PaddingRule, lengths: Tensor, num_samples: int, batch_frames: int, cnn_frames: Tensor
                 ) -> Tensor:
    """Valid frames [B] under ``rule``; ``cnn_frames`` is the CNN rule's answer (``Encoder.num_frames``)."""
    if rule == "cnn":
        return cnn_frames
    if rule == "fairseq_block":
        return block_valid_frames(lengths, num_samples, batch_frames).to(cnn_frames.device)
    raise ValueError(f"unknown encoder config 'padding_rule' {rule!r}")


def fairseq_padding_rule(model_type: str) -> PaddingRule:
    """The rule of a fairseq-format checkpoint: HuBERT and WavLM mask by blocks, wav2vec 2.0 by CNN lengths."""
    return "fairseq_block" if model_type in ("hubert", "wavlm") else "cnn"
