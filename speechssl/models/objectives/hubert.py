"""HuBERT: masked prediction of k-means units (one or more label sets) with cosine logits.

Logits for label set ``s`` are ``normalize(proj_s(x)) @ normalize(E_s).T / tau`` over its K_s unit embeddings:
O(frames x K) memory (fairseq builds a [frames, K, dim] tensor of negatives instead). Cross-entropy is taken on
masked frames (weight ``pred_masked_weight``) and optionally on unmasked ones (``pred_nomask_weight``), summed over
label sets and normalised per masked frame, plus ``feature_pen_weight * mean(CNN_out^2)``.

With ``recon_weight > 0`` (fbank front end only) a linear head also reconstructs the normalised input log-mel
frames (stacked to the encoder frame rate) from the final hidden state, masked and unmasked frames alike, with
an L1 loss. Unit targets are about what is said; the reconstruction makes the model keep what they ignore
(loudness, spectral envelope, pitch: speaker and prosody), which a small model otherwise discards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.constants import PAD_ID
from speechssl.train.contract import StepOutput

from ..frames import FBANK_HOP
from .base import Objective, crop_or_pad, cross_entropy_fp32, fp32

__all__ = ["HubertObjective", "normalize_num_classes"]


def normalize_num_classes(num_classes) -> dict[str, int]:
    """``100`` -> {"kmeans": 100}; ``{"km1": 100, "km2": 500}`` kept; ``[100, 500]`` -> {"kmeans": 100,
    "kmeans1": 500}. K must be >= 1 (an empty label dictionary silently collapses HuBERT's loss)."""
    if isinstance(num_classes, Mapping):
        out = {str(k): int(v) for k, v in num_classes.items()}
    elif isinstance(num_classes, (int,)) and not isinstance(num_classes, bool):
        out = {"kmeans": int(num_classes)}
    elif isinstance(num_classes, Sequence) and not isinstance(num_classes, str):
        out = {("kmeans" if i == 0 else f"kmeans{i}"): int(k) for i, k in enumerate(num_classes)}
    else:
        raise ValueError(f"num_classes must be an int, a list of ints or a {{label_set: K}} mapping, got {num_classes!r}")
    if not out:
        raise ValueError("num_classes is empty: HuBERT needs at least one label set")
    for name, k in out.items():
        if k < 1:
            raise ValueError(f"label set '{name}' has num_classes={k}: an empty label dictionary would make the "
                             "HuBERT loss silently meaningless; check the k-means directory / num_classes")
    return out


class HubertObjective(Objective):
    """Masked unit prediction.

    Args:
        encoder: the speechssl Encoder being pretrained.
        num_classes: K per label set (see :func:`normalize_num_classes`); the batch's ``units`` dict must hold
            every label set by name, aligned to encoder frames with -100 padding.
        final_dim: projection / unit-embedding dim (256 in HuBERT Base).
        logit_temp: cosine temperature (0.1).
        mask_prob, mask_length: span masking (0.8, 10).
        pred_masked_weight, pred_nomask_weight: CE weights on masked / unmasked frames (1, 0).
        feature_pen_weight: weight of the CNN feature penalty (10).
        untie_final_proj: one projection per label set instead of one shared.
        seed: own mask generator (default: the global RNG).
        recon_weight: weight of the L1 reconstruction of the normalised input log-mel frames (0 = off; fbank
            front end only).
    """

    name = "hubert"
    predicts_units = True

    def __init__(self, encoder: nn.Module, num_classes=100, *, final_dim: int = 256, logit_temp: float = 0.1,
                 mask_prob: float = 0.8, mask_length: int = 10, pred_masked_weight: float = 1.0,
                 pred_nomask_weight: float = 0.0, feature_pen_weight: float = 10.0, untie_final_proj: bool = False,
                 seed: int | None = None, recon_weight: float = 0.0):
        super().__init__(encoder, mask_prob=mask_prob, mask_length=mask_length, seed=seed)
        self.num_classes = normalize_num_classes(num_classes)
        self.label_sets = list(self.num_classes)
        self.logit_temp = float(logit_temp)
        if self.logit_temp <= 0:
            raise ValueError(f"logit_temp must be > 0, got {logit_temp}")
        self.pred_masked_weight, self.pred_nomask_weight = float(pred_masked_weight), float(pred_nomask_weight)
        self.feature_pen_weight = float(feature_pen_weight)
        self.final_dim = int(final_dim)
        n = len(self.label_sets)
        self.untie_final_proj = bool(untie_final_proj) and n > 1
        D = encoder.hidden_size
        self.final_proj = nn.Linear(D, final_dim * (n if self.untie_final_proj else 1))
        self.label_embs = nn.Parameter(torch.empty(sum(self.num_classes.values()), final_dim))
        nn.init.uniform_(self.label_embs)  # as fairseq; the cosine makes only directions matter
        self.recon_weight = float(recon_weight)
        self.recon_proj = None
        if self.recon_weight > 0:
            cfg = encoder.config
            if cfg.frontend != "fbank":
                raise ValueError("recon_weight needs the fbank front end (encoder config frontend: fbank): it "
                                 "reconstructs the input log-mel frames")
            self.recon_proj = nn.Linear(D, cfg.n_mels * (encoder.downsample_rate // FBANK_HOP))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, final_dim={self.final_dim}, logit_temp={self.logit_temp}"

    # the waveform the encoder sees; WavLM overrides it to mix utterances
    def encoder_input(self, audio: Tensor, lens: Tensor) -> Tensor:
        return audio

    def targets(self, batch: dict, T: int) -> dict[str, Tensor]:
        """Each label set's units [B, T] long, cropped or PAD_ID-padded to the encoder's ``T`` frames."""
        units = batch.get("units")
        if not isinstance(units, Mapping):
            raise KeyError("the batch has no 'units' dict: HuBERT needs unit labels on the cuts (speechssl label) "
                           "and the dataset built with units=[...]")
        out = {}
        for name in self.label_sets:
            if name not in units:
                raise KeyError(f"the batch's units have no label set '{name}' (has: {sorted(units)})")
            u = torch.as_tensor(units[name]).long()
            out[name] = crop_or_pad(u, T, PAD_ID)
        return out

    def logits(self, x: Tensor, name_index: int) -> Tensor:
        """Cosine logits for label set ``name_index``: x [N, D] -> [N, K]."""
        name = self.label_sets[name_index]
        start = sum(self.num_classes[n] for n in self.label_sets[:name_index])
        emb = self.label_embs[start : start + self.num_classes[name]]
        proj = self.final_proj(x)
        if self.untie_final_proj:
            proj = proj.view(x.shape[0], len(self.label_sets), self.final_dim)[:, name_index]
        with fp32(x.device.type):
            return F.normalize(proj.float(), dim=-1) @ F.normalize(emb.float(), dim=-1).t() / self.logit_temp

    def reconstruction_loss(self, x: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """Mean L1 error per valid frame and input dim: x [B, T', D], target [B, T', M*s], valid [B, T'] bool."""
        with fp32(x.device.type):
            err = (self.recon_proj(x[valid]).float() - target[valid].float()).abs()
            return err.mean()

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S] float, ``audio_lens`` [B], ``units`` {label set: [B, T'] long, PAD_ID padded}.
        Loss per masked frame (``sample_size``), plus the feature penalty and the optional reconstruction."""
        audio, lens = self.audio_of(batch)
        frames, T = self.encoder_frames(lens, audio.shape[1])
        mask = self.span_mask(frames, T)  # [B, T']
        out = self.encoder(self.encoder_input(audio, lens), lens, mask_indices=mask)
        x = out.last_hidden_state if out.last_hidden_state is not None else out.hidden_states[-1]  # [B, T', D]
        self.check_frames(x, T)
        valid = ~out.padding_mask
        terms = self._unit_terms(x, self.targets(batch, T), valid, mask, batch.get("cut_ids", "?"))
        sample_size = max(terms.n_masked if self.pred_masked_weight > 0 else terms.n_unmasked, 1)
        pen = out.features_pen.float()
        loss = (self.pred_masked_weight * terms.loss_m + self.pred_nomask_weight * terms.loss_u) / sample_size \
            + self.feature_pen_weight * pen
        logs = dict(terms.logs)
        if self.recon_proj is not None:
            recon = self.reconstruction_loss(x, out.input_features, valid)
            loss = loss + self.recon_weight * recon
            logs["loss_recon"] = float(recon.detach())
        n_m, n_u = terms.n_masked, terms.n_unmasked
        logs.update({
            "loss": float(loss.detach()),
            "loss_masked": float(terms.loss_m.detach()) / max(1, terms.tot_m),
            "loss_unmasked": float(terms.loss_u.detach()) / max(1, terms.tot_u) if self.pred_nomask_weight > 0 else 0.0,
            "acc_masked": terms.corr_m / max(1, terms.tot_m),
            "acc_unmasked": terms.corr_u / max(1, terms.tot_u),
            "features_pen": float(pen.detach()),
            "masked_frames": float(n_m),
            "mask_fraction": n_m / max(1, n_m + n_u),
        })
        return StepOutput(loss, logs, sample_size=sample_size)

    def _check_targets(self, name: str, t: Tensor, has: Tensor, cut_ids) -> None:
        if not bool(has.any()):
            raise ValueError(
                f"label set '{name}': every target in the batch is padding (cuts {cut_ids}); the labels do not "
                "cover these utterances (wrong label rate or misaligned units?)")
        K = self.num_classes[name]
        bad = has & ((t < 0) | (t >= K))
        if bool(bad.any()):
            raise ValueError(f"label set '{name}': unit id {int(t[bad][0])} is outside [0, {K}): num_classes "
                             "does not match the k-means that labelled the cuts")

    def _unit_terms(self, x: Tensor, tgts: dict[str, Tensor], valid: Tensor, mask: Tensor, cut_ids) -> "_UnitTerms":
        """Summed CE and accuracy counts over label sets, on masked and unmasked valid frames (x [B, T', D],
        targets / valid / mask [B, T'])."""
        terms = _UnitTerms(x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32))
        for i, name in enumerate(self.label_sets):
            t = tgts[name]
            has = valid & (t != PAD_ID)
            self._check_targets(name, t, has, cut_ids)
            sel_m, sel_u = has & mask, has & ~mask
            if i == 0:
                terms.n_masked, terms.n_unmasked = int(sel_m.sum()), int(sel_u.sum())
            for sel, is_masked in ((sel_m, True), (sel_u, False)):
                if bool(sel.any()):
                    self._add_term(terms, x[sel], t[sel], i, is_masked)
        return terms

    def _add_term(self, terms: "_UnitTerms", x: Tensor, tg: Tensor, i: int, is_masked: bool) -> None:
        """CE of label set ``i`` on the selected frames x [N, D], targets tg [N], added to ``terms``."""
        need_grad = (self.pred_masked_weight if is_masked else self.pred_nomask_weight) > 0
        with torch.set_grad_enabled(need_grad and torch.is_grad_enabled()):
            lg = self.logits(x, i)
            ce = cross_entropy_fp32(lg, tg, reduction="sum")
        with torch.no_grad():
            c = int((lg.argmax(-1) == tg).sum())
        if is_masked:
            terms.loss_m = terms.loss_m + ce
            terms.corr_m, terms.tot_m = terms.corr_m + c, terms.tot_m + int(tg.numel())
        else:
            terms.loss_u = terms.loss_u + ce if need_grad else terms.loss_u
            terms.corr_u, terms.tot_u = terms.corr_u + c, terms.tot_u + int(tg.numel())
        if len(self.label_sets) > 1:
            kind = "masked" if is_masked else "unmasked"
            terms.logs[f"acc_{kind}_{self.label_sets[i]}"] = c / max(1, int(tg.numel()))


@dataclass
class _UnitTerms:
    """Running sums of one forward's unit-prediction terms."""

    loss_m: Tensor
    loss_u: Tensor
    n_masked: int = 0
    n_unmasked: int = 0
    corr_m: int = 0
    corr_u: int = 0
    tot_m: int = 0
    tot_u: int = 0
    logs: dict[str, float] = field(default_factory=dict)
