"""Which encoder frames of a padded batch count as padding: the rule each checkpoint source uses.

Two rules exist among the checkpoints speechssl imports, and they disagree near the end of a padded utterance:

- ``"cnn"``: a frame is valid when the CNN computed it from valid samples only, by the CNN's length arithmetic
  (``Encoder.num_frames``). transformers uses it for every model, and fairseq for wav2vec 2.0. Native speechssl
  models and transformers-converted checkpoints keep it.
- ``"fairseq_block"``: fairseq HuBERT and unilm WavLM (``forward_padding_mask``) cut the sample padding mask to a
  multiple of the batch's frame count, give each frame a block of ``T // T'`` samples and call a frame padding
  only when every sample of its block is padding. That counts a few more frames as valid, and how many depends on
  the padded batch width. A fairseq HuBERT Large on a padded batch differs from the CNN rule by up to 0.54
  near utterance ends, so an imported fairseq checkpoint keeps its source's rule.

The encoder reads the rule from ``EncoderConfig.padding_rule``; :func:`valid_frames` is the computation.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = ["PADDING_RULES", "valid_frames", "block_valid_frames", "fairseq_padding_rule", "with_padding_rule"]


PADDING_RULES = ("cnn", "fairseq_block")


def block_valid_frames(lengths: Tensor, num_samples: int, num_frames: int) -> Tensor:
    """fairseq's rule: valid frames [B] for ``lengths`` [B] valid samples of a batch padded to ``num_samples``
    samples, from which the CNN made ``num_frames`` frames.

    Frame ``t`` owns samples ``[t * k, (t + 1) * k)`` with ``k = num_samples // num_frames`` (the last
    ``num_samples % num_frames`` samples belong to no frame). It is valid when any of them is valid, i.e. when
    ``t * k < length``, so the count is ``ceil(min(length, num_frames * k) / k)``.
    """
    lengths = torch.as_tensor(lengths).long()
    if num_frames <= 0:
        return torch.zeros_like(lengths)
    k = num_samples // num_frames
    used = lengths.clamp(min=0, max=num_frames * k)
    return torch.div(used + k - 1, k, rounding_mode="floor")


def valid_frames(rule: str, lengths: Tensor, num_samples: int, num_frames: int, cnn_frames: Tensor) -> Tensor:
    """Valid frames [B] under ``rule``; ``cnn_frames`` is the CNN rule's answer (``Encoder.num_frames``)."""
    if rule == "cnn":
        return cnn_frames
    if rule == "fairseq_block":
        return block_valid_frames(lengths, num_samples, num_frames).to(cnn_frames.device)
    raise ValueError(f"padding rule must be one of {PADDING_RULES}, got {rule!r}")


def fairseq_padding_rule(model_type: str) -> str:
    """The rule of a fairseq-format checkpoint: HuBERT and WavLM mask by blocks, wav2vec 2.0 by CNN lengths."""
    return "fairseq_block" if model_type in ("hubert", "wavlm") else "cnn"


def with_padding_rule(cfg, rule: str):
    """``cfg`` (an EncoderConfig) recording ``rule``."""
    if rule not in PADDING_RULES:
        raise ValueError(f"padding rule must be one of {PADDING_RULES}, got {rule!r}")
    return dataclasses.replace(cfg, padding_rule=rule)
