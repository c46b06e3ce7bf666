"""MR-HuBERT: HuBERT's masked unit prediction at two frame rates of one hierarchical encoder.

From Shi et al., "Multi-resolution HuBERT: Multi-resolution speech self-supervised learning with masked unit
prediction" (ICLR 2024) and its public fairseq recipe (``mrhubert_base_librispeech``):

- the encoder is :class:`~speechssl.models.mr_encoder.MREncoder`: layers at 20 ms, a downsampling to 40 ms,
  layers at 40 ms, an upsampling back with a skip connection, layers at 20 ms (Base: 4-4-4 of 768 dims);
- one unit sequence (``use_single_target``) serves both resolutions: the 20 ms frames predict it as HuBERT does
  and each 40 ms frame ``j`` predicts the label of 20 ms frame ``2 j``, i.e. every other 20 ms label;
- masks are drawn on the 20 ms input (span masking, ``mask_prob`` 0.8, length 10); a 40 ms frame counts as
  masked when its first 20 ms frame is (the 20 ms mask taken every other frame);
- each resolution has its own projection (``final_dim`` 256) and unit embeddings; logits are cosines / 0.1 as in
  HuBERT; the loss is the cross-entropy summed over the masked frames of both resolutions, divided by the masked
  20 ms frames (fairseq's HuBERT criterion), plus ``feature_pen_weight`` (10) times the CNN feature penalty;
- optimisation as HuBERT Base: Adam (0.9, 0.98), lr 5e-4, 32k warm-up, polynomial decay, 400k updates.

This objective takes a plain ``Encoder`` (the preset in ``model.preset``) and turns it into an ``MREncoder`` with
``stacks`` (its weights kept, the resampling blocks new), so ``speechssl pretrain`` needs no other model
builder.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from speechssl.constants import PAD_ID
from speechssl.train.contract import StepOutput

from ..mr_encoder import MREncoder
from .base import crop_or_pad
from .hubert import HubertObjective, _UnitTerms, normalize_num_classes

__all__ = ["MRHubertObjective", "LOW_RES_SUFFIX"]

LOW_RES_SUFFIX = "@40ms"
"""The 40 ms head's label-set name is the unit set's name plus this (its logs: ``acc_masked_NAME@40ms``)."""


def _default_stacks(num_layers: int) -> tuple[int, int, int]:
    if num_layers % 3:
        raise ValueError(f"give 'stacks' (layers at 20, 40 and 20 ms): the encoder's {num_layers} layers do not "
                         "split into three equal stacks")
    return (num_layers // 3,) * 3


class MRHubertObjective(HubertObjective):
    """Masked unit prediction at 20 ms and 40 ms.

    Args:
        encoder: an ``Encoder`` (made an ``MREncoder`` with ``stacks``) or an ``MREncoder``.
        num_classes: K of the one unit label set (an int or ``{name: K}``); the batch's ``units[name]`` is
            aligned to the 20 ms frames.
        stacks: layers at 20, 40 and 20 ms (default: num_layers split in three equal parts); ignored for an
            ``MREncoder``.
        adapter_kernel: odd kernel of the resampling convolutions (1).
        low_res_weight: weight of the 40 ms cross-entropy relative to the 20 ms one (1).
        Further keyword arguments are HuBERT's (``final_dim``, ``logit_temp``, ``mask_prob``, ``mask_length``,
        ``pred_masked_weight``, ``pred_nomask_weight``, ``feature_pen_weight``, ``seed``, ``recon_weight``).
    """

    name = "mr_hubert"
    predicts_units = True

    def __init__(self, encoder: nn.Module, num_classes=100, *, stacks: Optional[Sequence[int]] = None,
                 adapter_kernel: int = 1, low_res_weight: float = 1.0, **kwargs):
        sets = normalize_num_classes(num_classes)
        if len(sets) != 1:
            raise ValueError(f"num_classes must name one label set (MR-HuBERT predicts one unit sequence at both "
                             f"rates), got {sets}")
        if kwargs.pop("untie_final_proj", True) is not True:
            raise ValueError("untie_final_proj: MR-HuBERT always has one projection per resolution")
        if not isinstance(encoder, MREncoder):
            encoder = MREncoder.from_encoder(encoder, stacks or _default_stacks(encoder.num_layers), adapter_kernel)
        (unit_set, k), = sets.items()
        super().__init__(encoder, {unit_set: k, unit_set + LOW_RES_SUFFIX: k}, untie_final_proj=True, **kwargs)
        self.unit_set, self.low_res_weight = unit_set, float(low_res_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stacks={self.encoder.stacks}, low_res_weight={self.low_res_weight}"

    def targets(self, batch: dict, T: int) -> dict[str, Tensor]:
        """{unit set: [B, T] at 20 ms, unit set@40ms: [B, ceil(T / 2)], every other 20 ms label}."""
        units = batch.get("units")
        if not isinstance(units, dict) or self.unit_set not in units:
            raise KeyError(f"the batch has no units '{self.unit_set}' (has: {sorted(units or {})}): MR-HuBERT needs "
                           "unit labels on the cuts and the dataset built with data.units")
        high = crop_or_pad(torch.as_tensor(units[self.unit_set]).long(), T, PAD_ID)
        return {self.unit_set: high, self.unit_set + LOW_RES_SUFFIX: high[:, ::2]}

    def _resolution_terms(self, x: Tensor, t: Tensor, valid: Tensor, mask: Tensor, i: int, cut_ids) -> _UnitTerms:
        """CE sums and accuracy counts of label set ``i`` on x [B, T, D] with targets, valid and mask [B, T]."""
        terms = _UnitTerms(x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32))
        has = valid & (t != PAD_ID)
        self._check_targets(self.label_sets[i], t, has, cut_ids)
        sel_m, sel_u = has & mask, has & ~mask
        terms.n_masked, terms.n_unmasked = int(sel_m.sum()), int(sel_u.sum())
        for sel, is_masked in ((sel_m, True), (sel_u, False)):
            if bool(sel.any()):
                self._add_term(terms, x[sel], t[sel], i, is_masked)
        return terms

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S], ``audio_lens`` [B], ``units`` {unit set: [B, T'] long at 20 ms, PAD_ID
        padded}. Loss per masked 20 ms frame (``sample_size``)."""
        audio, lens = self.audio_of(batch)
        frames, T = self.encoder_frames(lens, audio.shape[1])
        mask = self.span_mask(frames, T)  # [B, T] on the 20 ms frames
        out = self.encoder(audio, lens, mask_indices=mask)
        x = out.last_hidden_state  # [B, T, D]
        self.check_frames(x, T)
        valid = ~out.padding_mask
        tg = self.targets(batch, T)
        cut_ids = batch.get("cut_ids", "?")
        high = self._resolution_terms(x, tg[self.unit_set], valid, mask, 0, cut_ids)
        low = self._resolution_terms(self.encoder.low_resolution(out.hidden_states),
                                     tg[self.unit_set + LOW_RES_SUFFIX], valid[:, ::2], mask[:, ::2], 1, cut_ids)
        n = max(high.n_masked if self.pred_masked_weight > 0 else high.n_unmasked, 1)
        ce_m = high.loss_m + self.low_res_weight * low.loss_m
        ce_u = high.loss_u + self.low_res_weight * low.loss_u
        pen = out.features_pen.float()
        loss = (self.pred_masked_weight * ce_m + self.pred_nomask_weight * ce_u) / n + self.feature_pen_weight * pen
        logs = {**high.logs, **low.logs}
        if self.recon_proj is not None:
            recon = self.reconstruction_loss(x, out.input_features, valid)
            loss = loss + self.recon_weight * recon
            logs["loss_recon"] = float(recon.detach())
        logs.update({
            "loss": float(loss.detach()),
            "loss_masked": float(high.loss_m.detach()) / max(1, high.tot_m),
            "loss_masked_40ms": float(low.loss_m.detach()) / max(1, low.tot_m),
            "acc_masked": high.corr_m / max(1, high.tot_m), "acc_unmasked": high.corr_u / max(1, high.tot_u),
            "acc_masked_40ms": low.corr_m / max(1, low.tot_m),
            "features_pen": float(pen.detach()), "masked_frames": float(high.n_masked),
            "masked_frames_40ms": float(low.n_masked),
        })
        return StepOutput(loss, logs, sample_size=n)
