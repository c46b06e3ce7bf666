"""TERA: reconstruct log-mel frames from an input altered along time, frequency and magnitude (Liu, Li and Lee,
"TERA: Self-Supervised Learning of Transformer Encoder Representation for Speech", IEEE/ACM TASLP 2021).

The input is the normalised 80-dim log-mel of the encoder's own fbank front end (10 ms frames). Three stochastic
alterations are applied to it, per utterance, in the order of the paper (time, then frequency, then magnitude):

- time: ``T_num = round(P_T * L / W_T)`` span starts are drawn without replacement among the starts whose
  ``W_T``-frame span lies inside the ``L`` valid frames (P_T = 0.15 of the frames, W_T = 7 frames; spans may
  overlap, so about P_T of the frames or fewer are altered). Then, for the whole utterance, with probability
  0.8 the spans are set to zero (the mean, after normalisation), with 0.1 they are replaced by as many spans
  copied from random positions of the same clean utterance, and with 0.1 they are left unchanged;
- frequency: one block of consecutive mel bins, its width uniform in ``0 .. int(P_C * n_mels)`` (P_C = 0.2) and
  its start uniform, is set to zero over all frames;
- magnitude: with probability P_N = 0.15, Gaussian noise of standard deviation 0.2 is added to every frame.

A prediction network (Linear D -> D, GELU, LayerNorm, Linear to ``n_mels`` x the frames stacked into one encoder
frame) maps the last hidden state back to the clean normalised frames. Loss: L1, averaged over the altered
elements only: the time-altered frames (all bins, whichever of the three treatments they got) and the
frequency-masked bins (all valid frames), as in the paper and s3prl's implementation; magnitude noise adds no
positions. ``loss_on: all`` takes every valid element instead (what the paper does when neither time nor
frequency alteration is on). No quantizer. ``sample_size`` is the number of elements the loss averages.

Paper setting (TERA base): 3 transformer layers of 768, AdamW, lr 2e-4 with 7% warm-up, 1M steps, batch 32,
gradient clipping 5. Here the encoder is any speechssl encoder with the fbank front end (the small-data recipe
uses preset ``small_hubert``: 20 ms frames, so two input frames per encoder frame). The encoder's mask embedding
is not used (the alteration replaces it), so DDP needs ``trainer.ddp_find_unused: true``.

Normalisation: the alterations act on the normalised log-mel. With ``input_norm: global`` the altered frames are
mapped back through the corpus statistics before the encoder, which normalises them again, so it sees exactly
the altered frames; with ``input_norm: utterance`` the encoder re-normalises the altered frames per utterance and
bin (a per-bin affine change: zeroed spans lower the variance a little).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..components import log_mel_fbank
from ..frames import FBANK_HOP, fbank_input_frames
from speechssl.train.contract import StepOutput

from .base import Objective, fp32

__all__ = ["TeraObjective", "Alteration"]


class Alteration:
    """One batch's TERA alteration: ``altered`` [B, F, M] input, ``label`` [B, F, M] bool positions the loss
    uses, ``time`` [B, F] bool time-altered frames, ``policy`` [B] long treatment of the spans (0 zero,
    1 random frames, 2 unchanged)."""

    def __init__(self, altered: Tensor, label: Tensor, time: Tensor, policy: Tensor):
        self.altered, self.label, self.time, self.policy = altered, label, time, policy


class TeraObjective(Objective):
    """L1 reconstruction of the clean normalised log-mel from its altered version (TERA defaults).

    Args:
        encoder: an Encoder with ``frontend="fbank"`` (e.g. preset ``small_hubert``).
        time_prob: P_T, the share of frames chosen as span frames (0.15; 0 turns time alteration off).
        time_span: W_T, frames per span (7).
        span_policy: probabilities of (zero, random frames) for an utterance's spans; the rest leaves them
            unchanged ((0.8, 0.1)).
        freq_prob: P_C, the largest masked share of mel bins (0.2; 0 turns frequency alteration off).
        noise_prob: P_N, the probability that an utterance gets Gaussian noise (0.15; 0 off).
        noise_std: the noise's standard deviation (0.2).
        loss_on: ``altered`` (the paper) or ``all`` valid elements.
        seed: own generator for the alterations (default: the global RNG).
    """

    name = "tera"

    def __init__(self, encoder: nn.Module, *, time_prob: float = 0.15, time_span: int = 7,
                 span_policy: tuple[float, float] = (0.8, 0.1), freq_prob: float = 0.2, noise_prob: float = 0.15,
                 noise_std: float = 0.2, loss_on: Literal["altered", "all"] = "altered", seed: int | None = None):
        super().__init__(encoder, mask_prob=time_prob, mask_length=time_span, seed=seed)
        cfg = encoder.config
        if cfg.frontend != "fbank":
            raise ValueError(f"TERA needs an encoder with the fbank front end (encoder config 'frontend'='fbank', "
                             f"e.g. preset small_hubert), got frontend={cfg.frontend!r}")
        for key, p in (("time_prob", time_prob), ("freq_prob", freq_prob), ("noise_prob", noise_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {p}")
        if time_span < 1:
            raise ValueError(f"time_span must be >= 1 frame, got {time_span}")
        zero, rand = (float(p) for p in span_policy)
        if min(zero, rand) < 0 or zero + rand > 1:
            raise ValueError(f"span_policy (zero, random) must be probabilities summing to <= 1, got {span_policy}")
        if loss_on not in ("altered", "all"):
            raise ValueError(f"loss_on must be 'altered' or 'all', got {loss_on!r}")
        self.time_prob, self.time_span, self.span_policy = float(time_prob), int(time_span), (zero, rand)
        self.freq_prob, self.noise_prob, self.noise_std = float(freq_prob), float(noise_prob), float(noise_std)
        self.loss_on = loss_on
        self.n_mels = int(cfg.n_mels)
        self.stack = encoder.downsample_rate // FBANK_HOP  # input frames per encoder frame
        D = encoder.hidden_size
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D, eps=cfg.layer_norm_eps),
                                  nn.Linear(D, self.stack * self.n_mels))

    # ------------------------------------------------------------------ randomness
    def _rand(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self._gen)

    def _randint(self, high: int) -> int:
        """Uniform integer in [0, high)."""
        return int(torch.randint(high, (1,), generator=self._gen))

    def _span_starts(self, L: int) -> Tensor:
        """T_num span starts, without replacement, among the L - W_T + 1 starts whose span fits in L frames."""
        n = round(L * self.time_prob / self.time_span)
        candidates = max(L - self.time_span + 1, 0)
        if n == 0 or candidates == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.randperm(candidates, generator=self._gen)[:n]

    def _spans(self, starts: Tensor) -> Tensor:
        """Frame indices of the spans starting at ``starts`` [n] -> [n * W_T]."""
        return (starts[:, None] + torch.arange(self.time_span)[None]).reshape(-1)

    # ------------------------------------------------------------------ alteration
    def _alter_time(self, x: Tensor, clean: Tensor, label: Tensor, time: Tensor, L: int) -> int:
        """Time alteration of one utterance (x, clean [F, M], label [F, M], time [F], in place) -> policy."""
        starts = self._span_starts(L)
        dice = float(self._rand(1))
        zero, rand = self.span_policy
        policy = 0 if dice < zero else (1 if dice < zero + rand else 2)
        if starts.numel() == 0:
            return policy
        idx = self._spans(starts).to(x.device)
        if policy == 0:
            x[idx] = 0.0
        elif policy == 1:  # frames copied from random span starts of the same clean utterance
            src = torch.randint(L - self.time_span + 1, (starts.numel(),), generator=self._gen)
            x[idx] = clean[self._spans(src).to(x.device)]
        label[idx] = True
        time[idx] = True
        return policy

    def _alter_freq(self, x: Tensor, label: Tensor, L: int) -> None:
        """Zero one block of consecutive mel bins over all frames of one utterance (in place)."""
        width = self._randint(int(self.n_mels * self.freq_prob) + 1)
        if width == 0:
            return
        start = self._randint(self.n_mels - width + 1)
        x[:, start:start + width] = 0.0
        label[:L, start:start + width] = True

    @torch.no_grad()
    def alter(self, norm: Tensor, lens: Tensor) -> Alteration:
        """The TERA alteration of normalised log-mel ``norm`` [B, F, M] with ``lens`` [B] valid frames; padding
        stays zero and never enters the label positions."""
        x, clean = norm.clone(), norm
        B, F_, M = norm.shape
        label = torch.zeros(B, F_, M, dtype=torch.bool, device=norm.device)
        time = torch.zeros(B, F_, dtype=torch.bool, device=norm.device)
        policy = torch.full((B,), 2, dtype=torch.long)
        for b, L in enumerate(lens.tolist()):
            if L <= 0:
                continue
            if self.time_prob > 0:
                policy[b] = self._alter_time(x[b], clean[b], label[b], time[b], L)
            if self.freq_prob > 0:
                self._alter_freq(x[b, :L], label[b], L)
            if self.noise_prob > 0 and float(self._rand(1)) < self.noise_prob:
                x[b, :L] += (torch.randn(L, M, generator=self._gen) * self.noise_std).to(x.device)
        if self.loss_on == "all" or (self.time_prob == 0 and self.freq_prob == 0):
            label = (torch.arange(F_, device=norm.device)[None] < lens[:, None]).unsqueeze(-1).expand(B, F_, M)
        return Alteration(x, label, time, policy)

    # ------------------------------------------------------------------ forward
    def _features(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(normalised log-mel [B, F, M] of the encoder's own front end, valid frames [B])."""
        audio, alens = self.audio_of(batch)
        front = self.encoder.feature_extractor
        with torch.no_grad():
            feats = log_mel_fbank(audio, self.n_mels, filters=front.mel_filters)
            flens = fbank_input_frames(alens).clamp_max(feats.shape[1])
            return front.apply_norm(feats, flens), flens

    def _encoder_input(self, altered: Tensor) -> Tensor:
        """Altered normalised frames -> what the encoder takes: under ``input_norm: global`` mapped back through the
        corpus statistics (the encoder normalises them again); under per-utterance norm as they are."""
        front = self.encoder.feature_extractor
        if front.input_norm == "global":
            return altered * front.input_std + front.input_mean
        return altered

    def _stack(self, x: Tensor, T: int) -> Tensor:
        """[B, F, ...] input frames -> [B, T, stack * ...] encoder frames (cropped or zero/False-padded)."""
        need = T * self.stack
        if x.shape[1] < need:
            pad = x.new_zeros((x.shape[0], need - x.shape[1]) + tuple(x.shape[2:]))
            x = torch.cat([x, pad], dim=1)
        x = x[:, :need]
        return x.reshape(x.shape[0], T, -1)

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S] float, ``audio_lens`` [B]. Loss: mean L1 per altered element (``sample_size``)."""
        norm, flens = self._features(batch)
        alt = self.alter(norm, flens)
        out = self.encoder(None, flens, features=self._encoder_input(alt.altered))
        x = out.last_hidden_state if out.last_hidden_state is not None else out.hidden_states[-1]  # [B, T, D]
        T = x.shape[1]
        sel = self._stack(alt.label, T) & ~out.padding_mask.unsqueeze(-1)  # [B, T, stack * M]
        n = int(sel.sum())
        if n == 0:
            raise ValueError(f"no altered element in the batch (cuts {batch.get('cut_ids', '?')}): utterances "
                             f"shorter than time_span={self.time_span} frames with freq_prob 0?")
        pred = self.head(x)  # [B, T, stack * M]
        with fp32(x.device.type):
            err = (pred.float() - self._stack(norm, T).float()).abs()
            loss = err[sel].sum() / n
        with torch.no_grad():
            valid = ~out.padding_mask
            recon_all = float(err[valid].mean())
            time_frames = float(alt.time.sum())
            frames = float(flens.sum())
        logs = {"loss": float(loss.detach()), "l1_all": recon_all, "altered_elements": float(n),
                "time_altered_fraction": time_frames / max(1.0, frames)}
        return StepOutput(loss, logs, sample_size=n)
