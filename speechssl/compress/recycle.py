"""Recycle-and-Distill: attention-map reuse and masking distillation (ARMHuBERT).

Paper: K. Jang, S. Kim, S.-Y. Yun, H. Kim, "Recycle-and-Distill: Universal Compression Strategy for
Transformer-based Speech SSL Models with Attention Map Reusing and Masking Distillation", Interspeech 2023
(arXiv 2305.11685). Facts this module follows (from the paper's abstract and the authors' public configs):

* Attention-map reuse: a layer applies the attention map of an earlier layer to its own values, so it has no
  query/key projections, and the student keeps the teacher's NUMBER OF LAYERS. ARMHuBERT alternates: layers
  0, 2, 4, ... compute their maps, each odd layer reuses the map of the layer before it (`alternate_reuse`).
* Masking distillation: the student sees a span-masked input (fairseq HuBERT masking, mask_prob 0.8, span 10).
  The teacher is run twice, on the clean input and on the SAME masked input. On masked frames the student
  regresses the clean teacher's features; on unmasked frames it regresses the masked teacher's features, so
  both kinds of frames carry a loss.
* Per-layer loss: mean squared error, each of the two frame sets summed and divided by the number of frames
  (the two terms add up to a mean over all frames); the last layer weighs 1.0, the other distilled ("hint")
  layers 0.1 each.

Differences from the paper, by design of this toolkit: the student starts as a copy of the teacher (same width;
reusing layers keep the teacher's value and output projections) rather than a narrower randomly initialised
model, and each distilled layer goes through an identity-initialised linear map (the paper's per-layer
projections), so a fresh student starts close to the teacher. Padded frames never enter the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from speechssl.models.masking import compute_span_mask
from speechssl.train.contract import StepOutput

from .kd import FrozenTeacher, _check_frames, _StudentLayerDrop, identity_maps

__all__ = ["alternate_reuse", "build_recycle_student", "masking_distill_loss", "MaskingDistiller"]


def alternate_reuse(num_layers: int) -> list[int]:
    """ARMHuBERT's pattern as an ``attn_reuse`` list: odd layers reuse the map of the layer before them
    (e.g. 4 -> [-1, 0, -1, 2])."""
    return [i - 1 if i % 2 else -1 for i in range(num_layers)]


def _copy_teacher_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Every student tensor from the teacher's tensor of the same name; a reusing layer's ``v_proj`` takes the
    value rows (the last third) of the teacher layer's fused ``qkv``."""
    src, dst = teacher.state_dict(), student.state_dict()
    out, bad = {}, []
    for k, v in dst.items():
        t = src.get(k)
        if t is None and ".attention.v_proj." in k:
            fused = src.get(k.replace(".v_proj.", ".qkv."))
            t = fused[2 * v.shape[0]:] if fused is not None else None
        if t is None or t.shape != v.shape:
            bad.append(k)
        else:
            out[k] = t.detach().clone()
    if bad:
        raise ValueError(f"cannot initialise the Recycle-and-Distill student from the teacher: {bad[:5]} are "
                         "missing from the teacher or differ in shape")
    student.load_state_dict(out, strict=True)


def build_recycle_student(teacher: nn.Module, attn_reuse: Sequence[int] | None = None,
                          feature_grad_mult: float = 0.1, **overrides) -> nn.Module:
    """The teacher's architecture with attention-map reuse, initialised from the teacher's weights.

    Args:
        teacher: an ``Encoder``.
        attn_reuse: per layer, the earlier layer whose map it reuses or -1 (see ``EncoderConfig.attn_reuse``);
            None = `alternate_reuse`.
        feature_grad_mult: gradient scale into the CNN front end.
        overrides: further EncoderConfig fields.
    Returns:
        a new Encoder in train mode, layer-drop off (every layer's map must exist for its reusers).
    """
    from speechssl.models.encoder import build_encoder

    cfg = teacher.config
    reuse = list(attn_reuse) if attn_reuse is not None else alternate_reuse(cfg.num_layers)
    changes = dict(attn_reuse=reuse, feature_grad_mult=feature_grad_mult, layerdrop=0.0, **overrides)
    student = build_encoder(dataclasses.replace(cfg, **changes))
    _copy_teacher_weights(teacher, student)
    return student.train()


def masking_distill_loss(pred: torch.Tensor, clean_target: torch.Tensor, masked_target: torch.Tensor,
                         valid: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masking-distillation terms of one layer.

    Args:
        pred: [B, T', D] student features (from the masked input).
        clean_target, masked_target: [B, T', D] teacher features from the clean and from the masked input.
        valid: [B, T'] bool, real frames; masked: [B, T'] bool, the frames the mask replaced.
    Returns:
        (masked-frame term, unmasked-frame term): squared error averaged over D, summed over the frame set and
        divided by the number of valid frames (so the two terms add up to a mean over valid frames).
    """
    n = valid.sum()
    if n == 0:
        raise ValueError("distillation batch has no valid frames (all lengths are 0)")
    on_masked = valid & masked
    on_unmasked = valid & ~masked
    err_m = (pred.float() - clean_target.float()).pow(2).mean(-1)  # [B, T']
    err_u = (pred.float() - masked_target.float()).pow(2).mean(-1)
    return err_m[on_masked].sum() / n, err_u[on_unmasked].sum() / n


class MaskingDistiller(_StudentLayerDrop, nn.Module):
    """Masking distillation: ``forward(batch) -> StepOutput`` for the Trainer.

    Args:
        student, teacher: Encoders of the same depth and frame rate (the student trainable, the teacher frozen).
        layers: hidden-state indices distilled, student layer i against teacher layer i (default 1..L).
        mask_prob, mask_length: span masking of the student's (and the masked teacher's) input.
        hint_weight, final_weight: weights of the intermediate layers and of the last listed layer.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Sequence[int] | None = None, *,
                 mask_prob: float = 0.8, mask_length: int = 10, hint_weight: float = 0.1,
                 final_weight: float = 1.0):
        super().__init__()
        self.teacher = FrozenTeacher(teacher)
        if student.num_layers != self.teacher.num_layers:
            raise ValueError(f"masking distillation pairs layer i with layer i: the student has "
                             f"{student.num_layers} layers, the teacher {self.teacher.num_layers}")
        layers = list(layers) if layers else list(range(1, student.num_layers + 1))
        bad = [i for i in layers if not 0 <= i <= student.num_layers]
        if bad:
            raise ValueError(f"distilled layers {bad} out of range [0, {student.num_layers}]")
        self.student, self.layers = student, sorted(layers)
        self.maps = identity_maps(student.hidden_size, self.teacher.hidden_size, len(self.layers))
        self.mask_prob, self.mask_length = mask_prob, mask_length
        self.weights = [hint_weight] * (len(self.layers) - 1) + [final_weight]

    def sample_mask(self, wav: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
        """[B, T'] bool span mask over the valid frames of ``wav`` [B, S]."""
        B, S = wav.shape
        T = int(self.student.num_frames(torch.tensor(S)))
        frames = self.student.num_frames(lens.to(wav.device)) if lens is not None else None
        return compute_span_mask((B, T), frames, self.mask_prob, self.mask_length, device=wav.device)

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S], ``audio_lens`` [B]; weighted sum over layers of masked + unmasked terms."""
        wav, lens = batch["audio"], batch.get("audio_lens")
        mask = self.sample_mask(wav, lens)
        t_clean = self.teacher(wav, lens)
        t_masked = self.teacher(wav, lens, mask_indices=mask)
        s_out = self.student(wav, lens, mask_indices=mask)
        valid = _check_frames(s_out, t_clean)
        total = wav.new_zeros(())
        logs: dict[str, float] = {}
        for i, m, w in zip(self.layers, self.maps, self.weights):
            lm, lu = masking_distill_loss(m(s_out.hidden_states[i]), t_clean.hidden_states[i],
                                          t_masked.hidden_states[i], valid, mask)
            total = total + w * (lm + lu)
            logs[f"masked_{i}"], logs[f"unmasked_{i}"] = lm.item(), lu.item()
        logs["mask_frac"] = (mask & valid).sum().item() / max(1, valid.sum().item())
        logs["loss"] = total.item()
        return StepOutput(total, logs)
