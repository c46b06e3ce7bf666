"""ContentVec: HuBERT's masked unit prediction made blind to the speaker (Qian et al., ICML 2022).

Three mechanisms remove speaker information from the representation while keeping the content:

- **Teacher.** Targets are the k-means units stored on the cuts, computed on the *unchanged* audio (as HuBERT).
  The paper's teacher additionally clusters features of voice-converted speech; here the stored units are used.
- **Student.** Each utterance passes two independent random speaker-identity changes
  (``speechssl.signal.speaker_change``: formant ratio uniform in [1, 1.4], pitch ratio uniform in [1, 2],
  each inverted with probability 1/2, as NANSY). Both versions go through the encoder with the *same* span mask,
  both predict the units of the original. A contrastive loss pulls the two versions' frame representations
  together: for frame t of version 1 the positive is frame t of version 2 and the negatives are the other
  frames of the same utterance (the paper draws 100 of them; here every other frame of the utterance is used),
  cosine similarity over a linear projection, temperature 0.1, symmetric in the two versions, on unmasked frames
  (the public reference's choice). Its weight grows linearly with the update count (the reference adds
  1e-5 x updates, i.e. 1 after its 100k updates): ``ctr_weight * min(step, ctr_ramp_steps) / ctr_ramp_steps``.
- **Predictor.** The unit predictor is conditioned on the speaker, so the representation need not carry the
  speaker to predict speaker-dependent units. The paper conditions its top transformer layers (conditional
  layer norm) on a pretrained speaker encoder's embedding of the original speaker. Here the conditioned block is
  part of the prediction head (it is not exported with the encoder): a layer norm whose scale and shift come
  from the speaker embedding, then a feed-forward layer added to the frame (residual), then HuBERT's projection
  and cosine logits. The speaker embedding is the per-utterance mean and standard deviation of the log-mel
  frames of the *unchanged* audio (the mean less its average over bins, so the gain does not count),
layer-normalised: no pretrained speaker model is available offline and the
  corpus may have no speaker labels, while long-term log-mel statistics carry the vocal-tract (formant) and
  pitch cues the speaker change removes. Its projection is learned (initialised to zero: training starts as
  unconditioned HuBERT).

The loss is ``(CE on masked frames of both versions) / masked frames + feature_pen_weight * penalty +
lambda(step) * contrastive``; ``sample_size`` is the masked-frame count of both versions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.signal import draw_speaker_ratios, speaker_change
from speechssl.train.contract import StepOutput

from ..components import log_mel_fbank
from .base import fp32
from .hubert import HubertObjective

__all__ = ["ContentVecObjective", "SPEAKER_MELS"]

SPEAKER_MELS = 80  # log-mel bins of the speaker embedding (mean and std: 160 dims)


class ContentVecObjective(HubertObjective):
    """HuBERT on two speaker-changed versions of each utterance, a speaker-conditioned predictor and a
    contrastive loss between the versions.

    Args:
        encoder, num_classes and HuBERT's keyword arguments (``final_dim``, ``logit_temp``, ``mask_prob``,
            ``mask_length``, ``pred_masked_weight``, ``pred_nomask_weight``, ``feature_pen_weight``,
            ``untie_final_proj``, ``seed``); ``recon_weight`` must stay 0 (reconstructing the changed input would
            put the speaker back).
        ctr_weight: weight of the contrastive loss once ramped up (1.0).
        ctr_ramp_steps: updates over which the weight grows linearly from 0 (100000, the paper's run length).
        ctr_temp: cosine temperature of the contrastive loss (0.1).
        ctr_layer: hidden state the contrastive loss is taken on (index into ``hidden_states``; -1 = last).
        formant_ratio, pitch_ratio: [low, high] ranges of the speaker change ratios ([1, 1.4], [1, 2]).
    """

    name = "contentvec"
    predicts_units = True

    def __init__(self, encoder: nn.Module, num_classes=100, *, ctr_weight: float = 1.0,
                 ctr_ramp_steps: int = 100_000, ctr_temp: float = 0.1, ctr_layer: int = -1,
                 formant_ratio: tuple[float, float] = (1.0, 1.4), pitch_ratio: tuple[float, float] = (1.0, 2.0),
                 **kwargs):
        super().__init__(encoder, num_classes, **kwargs)
        if self.recon_proj is not None:
            raise ValueError("recon_weight must be 0 for ContentVec: reconstructing the speaker-changed input "
                             "would train the speaker back into the representation")
        if ctr_temp <= 0 or ctr_ramp_steps < 1 or ctr_weight < 0:
            raise ValueError(f"need ctr_temp > 0, ctr_ramp_steps >= 1 and ctr_weight >= 0, got {ctr_temp}, "
                             f"{ctr_ramp_steps}, {ctr_weight}")
        for key, r in (("formant_ratio", formant_ratio), ("pitch_ratio", pitch_ratio)):
            if len(r) != 2 or not 0 < r[0] <= r[1]:
                raise ValueError(f"{key} must be [low, high] with 0 < low <= high, got {r}")
        self.ctr_weight, self.ctr_ramp_steps, self.ctr_temp = float(ctr_weight), int(ctr_ramp_steps), float(ctr_temp)
        self.ctr_layer = int(ctr_layer)
        self.formant_ratio = (float(formant_ratio[0]), float(formant_ratio[1]))
        self.pitch_ratio = (float(pitch_ratio[0]), float(pitch_ratio[1]))
        D = encoder.hidden_size
        self.ctr_proj = nn.Linear(D, self.final_dim)
        self.speaker_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.speaker_film = nn.Linear(2 * SPEAKER_MELS, 2 * D)  # speaker -> (scale, shift) of the layer norm
        nn.init.zeros_(self.speaker_film.weight)
        nn.init.zeros_(self.speaker_film.bias)
        self.speaker_ffn = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))

    def ctr_lambda(self) -> float:
        """The contrastive weight at the current update (linear ramp)."""
        return self.ctr_weight * min(self.step, self.ctr_ramp_steps) / self.ctr_ramp_steps

    # -- the steps of forward -------------------------------------------------------------------------------
    def speaker_versions(self, audio: Tensor, lens: Tensor) -> Tensor:
        """Two speaker-changed versions of the batch stacked: audio [B, S] -> [2B, S] (version 1, then 2)."""
        B = audio.shape[0]
        formant, pitch = draw_speaker_ratios(2 * B, self.formant_ratio, self.pitch_ratio, generator=self._gen)
        return speaker_change(audio.repeat(2, 1), lens.repeat(2), formant, pitch)

    @staticmethod
    def speaker_embedding(audio: Tensor, lens: Tensor) -> Tensor:
        """Mean (less its average over bins) and std of the log-mel frames of each utterance, layer-normalised:
        audio [B, S] -> [B, 160]; independent of the recording gain."""
        with torch.no_grad(), fp32(audio.device.type):
            mel = log_mel_fbank(audio.float(), SPEAKER_MELS)  # [B, N, 80]
            valid = (torch.arange(mel.shape[1], device=audio.device)[None] < (lens // 160)[:, None]).float()
            n = valid.sum(1, keepdim=True).clamp_min(1)[..., None]  # [B, 1, 1]
            mean = (mel * valid[..., None]).sum(1, keepdim=True) / n
            std = (((mel - mean) ** 2 * valid[..., None]).sum(1, keepdim=True) / n).sqrt()
            mean = mean - mean.mean(-1, keepdim=True)  # a gain shifts every log-mel bin alike: not the speaker
            stats = torch.cat([mean, std], dim=-1)[:, 0]
            return F.layer_norm(stats, stats.shape[-1:])

    def condition(self, x: Tensor, speaker: Tensor) -> Tensor:
        """The speaker-conditioned block of the predictor: x [B, T, D], speaker [B, 160] -> [B, T, D]."""
        scale, shift = self.speaker_film(speaker.to(x.dtype)).chunk(2, dim=-1)  # [B, D] each
        h = self.speaker_norm(x) * (1 + scale[:, None]) + shift[:, None]
        return x + self.speaker_ffn(h)

    def contrastive(self, x1: Tensor, x2: Tensor, keep: Tensor) -> tuple[Tensor, int, float]:
        """Symmetric InfoNCE between the versions: x1, x2 [B, T, D], keep [B, T] bool (frames taking part).
        Returns (mean loss per anchor, anchors, accuracy of picking the positive)."""
        with fp32(x1.device.type):
            z1 = F.normalize(self.ctr_proj(x1).float(), dim=-1)
            z2 = F.normalize(self.ctr_proj(x2).float(), dim=-1)
            sim = z1 @ z2.transpose(1, 2) / self.ctr_temp  # [B, T, T]: frame t of version 1 vs tau of version 2
            losses, correct = [], 0
            # candidates are kept frames; an utterance without any keeps its row finite (and takes no part)
            drop = ~keep[:, None, :] & keep.any(1)[:, None, None]
            for s in (sim, sim.transpose(1, 2)):
                s = s.masked_fill(drop, float("-inf"))
                logp = s.log_softmax(-1).diagonal(dim1=1, dim2=2)  # [B, T]: log p(positive)
                losses.append(-logp[keep])
                correct += int((s.argmax(-1) == torch.arange(s.shape[1], device=s.device)[None])[keep].sum())
            n = int(keep.sum())
            return torch.cat(losses).mean() if n else sim.new_zeros(()), n, correct / max(1, 2 * n)

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S], ``audio_lens`` [B], ``units`` {label set: [B, T'] long, PAD_ID padded}.
        Loss per masked frame of both versions (``sample_size``), plus penalty and weighted contrastive loss."""
        audio, lens = self.audio_of(batch)
        B = audio.shape[0]
        frames, T = self.encoder_frames(lens, audio.shape[1])
        mask = self.span_mask(frames, T)  # [B, T'], shared by both versions
        out = self.encoder(self.speaker_versions(audio, lens), lens.repeat(2), mask_indices=mask.repeat(2, 1))
        x = out.last_hidden_state if out.last_hidden_state is not None else out.hidden_states[-1]  # [2B, T', D]
        self.check_frames(x, T)
        valid = ~out.padding_mask
        pred = self.condition(x, self.speaker_embedding(audio, lens).repeat(2, 1))
        targets = {k: v.repeat(2, 1) for k, v in self.targets(batch, T).items()}
        terms = self._unit_terms(pred, targets, valid, mask.repeat(2, 1), batch.get("cut_ids", "?"))
        sample_size = max(terms.n_masked if self.pred_masked_weight > 0 else terms.n_unmasked, 1)
        h = out.hidden_states[self.ctr_layer]
        ctr, n_ctr, ctr_acc = self.contrastive(h[:B], h[B:], valid[:B] & ~mask)
        pen = out.features_pen.float()
        lam = self.ctr_lambda()
        loss = (self.pred_masked_weight * terms.loss_m + self.pred_nomask_weight * terms.loss_u) / sample_size \
            + self.feature_pen_weight * pen + lam * ctr
        logs = dict(terms.logs)
        logs.update({
            "loss": float(loss.detach()),
            "loss_masked": float(terms.loss_m.detach()) / max(1, terms.tot_m),
            "acc_masked": terms.corr_m / max(1, terms.tot_m),
            "acc_unmasked": terms.corr_u / max(1, terms.tot_u),
            "loss_ctr": float(ctr.detach()),
            "acc_ctr": ctr_acc,
            "ctr_frames": float(n_ctr),
            "ctr_weight": lam,
            "features_pen": float(pen.detach()),
            "masked_frames": float(terms.n_masked),
        })
        return StepOutput(loss, logs, sample_size=sample_size)
