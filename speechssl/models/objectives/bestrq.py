"""BEST-RQ: predict random-projection codes of the clean input at masked encoder frames.

Targets: the normalised 80-dim log-mel input, stacked to the encoder frame rate (4 x 10 ms -> 40 ms), goes through
a frozen random projection and is matched to the nearest codeword of a frozen random codebook (cosine).
Masking: blocks on the input features (``mask_length`` input frames, each input frame starting a block with
probability ``mask_prob``), masked frames replaced by N(0, ``noise_std``) noise; blocks are drawn on the encoder
frame grid so every encoder frame is either fully masked or not. Loss: cross-entropy of a linear head over the
codebook at masked frames, per masked frame (averaged over codebooks). Needs the fbank front end.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..components import FbankFrontend, log_mel_fbank
from ..frames import FBANK_HOP, fbank_input_frames
from ..masking import compute_block_mask, expand_mask
from ..quantizers import RandomProjectionQuantizer
from speechssl.train.contract import StepOutput

from .base import Objective, cross_entropy_fp32

__all__ = ["BestRQObjective"]



class BestRQObjective(Objective):
    """Random-projection quantizer targets + block masking + CE head.

    Args:
        encoder: an Encoder with ``frontend="fbank"`` (e.g. preset ``tiny_bestrq`` / ``bestrq``).
        codebook_size, code_dim, num_codebooks: the frozen codebook(s) (8192 x 16, 1).
        mask_prob: probability that an input (10 ms) frame starts a masked block (0.01).
        mask_length: block length in input frames (40 = 400 ms).
        noise_std: std of the noise that replaces masked (normalised) input frames (0.1).
        quantizer_seed: seeds the projection and codebook (saved as buffers either way).
        seed: own generator for masks and noise (default: the global RNG).
    """

    name = "bestrq"

    def __init__(self, encoder: nn.Module, *, codebook_size: int = 8192, code_dim: int = 16, num_codebooks: int = 1,
                 mask_prob: float = 0.01, mask_length: int = 40, noise_std: float = 0.1, quantizer_seed: int = 0,
                 seed: int | None = None):
        super().__init__(encoder, mask_prob=mask_prob, mask_length=mask_length, seed=seed)
        cfg = encoder.config
        if cfg.frontend != "fbank":
            raise ValueError(f"BEST-RQ needs an encoder with the fbank front end (encoder config 'frontend'="
                             f"'fbank', e.g. preset tiny_bestrq), got frontend={cfg.frontend!r}")
        self.n_mels = int(cfg.n_mels)
        self.stack = encoder.downsample_rate // FBANK_HOP  # input frames per encoder frame
        self.noise_std = float(noise_std)
        self.codebook_size, self.num_codebooks = int(codebook_size), int(num_codebooks)
        self.quantizer = RandomProjectionQuantizer(self.stack * self.n_mels, code_dim, codebook_size, num_codebooks,
                                                   seed=quantizer_seed)
        self.head = nn.Linear(encoder.hidden_size, num_codebooks * codebook_size)

    def _features(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(log-mel [B, F, n_mels], valid frames [B]): computed from the batch's audio with the encoder's own
        filterbank (what it computes at inference), or the batch's ``features`` when it has no audio."""
        if "audio" in batch:
            audio, alens = self.audio_of(batch)
            with torch.no_grad():
                feats = log_mel_fbank(audio, self.n_mels, filters=self.encoder.feature_extractor.mel_filters)
            return feats, fbank_input_frames(alens).clamp_max(feats.shape[1])
        feats = batch.get("features")
        if feats is None or feats.dim() != 3 or feats.shape[-1] != self.n_mels:
            raise KeyError(f"BEST-RQ needs 'audio' or {self.n_mels}-dim 'features' [B, F, {self.n_mels}] in the batch")
        lens = batch.get("features_lens")
        if lens is None:
            lens = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long, device=feats.device)
        return feats.float(), lens.to(feats.device).long()

    def _block_mask(self, frames: Tensor, T: int) -> Tensor:
        # same expected start density per second as on input frames: p_enc = 1 - (1 - p)^stack
        p = 1.0 - (1.0 - self.mask_prob) ** self.stack
        L = max(1, math.ceil(self.mask_length / self.stack))
        if self._gen is not None:
            return compute_block_mask((frames.shape[0], T), frames.cpu(), p, L, generator=self._gen).to(frames.device)
        return compute_block_mask((frames.shape[0], T), frames, p, L, device=frames.device)

    @torch.no_grad()
    def targets(self, norm: Tensor, T: int) -> Tensor:
        """Codes [B, T, num_codebooks] of normalised features [B, F, n_mels] stacked to T encoder frames."""
        B, F_, M = norm.shape
        need = T * self.stack
        f = torch.nn.functional.pad(norm, (0, 0, 0, need - F_)) if need > F_ else norm[:, :need]
        return self.quantizer(f.reshape(B, T, self.stack * M))

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S] with ``audio_lens`` [B], or ``features`` [B, F, n_mels] with ``features_lens``.
        Loss per masked encoder frame (``sample_size``), averaged over codebooks."""
        feats, flens = self._features(batch)
        norm = FbankFrontend.normalize(feats, flens)
        frames = self.encoder.num_frames_from_features(flens)
        T = int(self.encoder.num_frames_from_features(torch.tensor([feats.shape[1]])).item())
        frames = frames.clamp_max(T)
        codes = self.targets(norm, T)  # [B, T, C]
        mask = self._block_mask(frames, T)  # [B, T] encoder frames
        mask_in = expand_mask(mask, self.stack, feats.shape[1])  # [B, F] input frames
        if self._gen is not None:
            noise = torch.randn(norm.shape, generator=self._gen).to(norm.device)
        else:
            noise = torch.randn_like(norm)
        masked_in = torch.where(mask_in.unsqueeze(-1), noise * self.noise_std, norm)
        out = self.encoder(None, flens, features=masked_in)
        x = out.last_hidden_state if out.last_hidden_state is not None else out.hidden_states[-1]  # [B, T, D]
        self.check_frames(x, T)
        sel = mask & ~out.padding_mask
        n = int(sel.sum())
        if n == 0:
            raise ValueError(f"no masked frame in the batch (cuts {batch.get('cut_ids', '?')}): utterances shorter "
                             "than one encoder frame?")
        logits = self.head(x[sel]).view(n * self.num_codebooks, self.codebook_size)
        tgt = codes[sel].reshape(-1)
        loss = cross_entropy_fp32(logits, tgt, reduction="sum") / (n * self.num_codebooks)
        with torch.no_grad():
            acc = float((logits.argmax(-1) == tgt).float().mean())
        valid = int((~out.padding_mask).sum())
        return StepOutput(loss, {"loss": float(loss.detach()), "acc_masked": acc, "masked_frames": float(n),
                                 "mask_fraction": n / max(1, valid)}, sample_size=n)
