"""wav2vec 2.0: contrastive prediction of quantized CNN features at masked frames.

Per masked frame: the positive is the Gumbel-quantized CNN output at that frame (``project_q`` to ``final_dim``),
the negatives are ``num_negatives`` quantized outputs of *other masked frames of the same utterance* (uniform,
sampled for all frames at once); the context is ``final_proj`` of the last layer. Logits are cosine / 0.1, a
negative equal to the positive gets -inf, and cross-entropy puts the positive at index 0. The loss per masked
frame adds ``diversity_weight * (GV - perplexity) / GV`` and ``feature_pen_weight * mean(CNN_out^2)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers import GumbelVectorQuantizer
from speechssl.train.contract import StepOutput

from .base import Objective, cross_entropy_fp32, fp32

__all__ = ["Wav2Vec2Objective", "sample_negatives"]


def sample_negatives(utt: Tensor, num_negatives: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of negatives for M masked frames listed utterance by utterance.

    utt: [M] long utterance index of each masked frame, non-decreasing (boolean indexing of a [B, T] mask gives
    this order). Returns [M, N] long indices into the M frames: each drawn uniformly from the *other* frames of
    the same utterance (a frame alone in its utterance gets itself, which the loss then masks to -inf).
    """
    M = utt.numel()
    dev = utt.device
    if M == 0:
        return torch.zeros(0, num_negatives, dtype=torch.long, device=dev)
    counts = torch.bincount(utt)  # [B]
    offsets = torch.cumsum(counts, 0) - counts  # first masked frame of each utterance
    n = counts[utt]  # [M] frames in my utterance
    local = torch.arange(M, device=dev) - offsets[utt]  # my index within the utterance
    if generator is not None:
        u = torch.rand(M, num_negatives, generator=generator).to(dev)
    else:
        u = torch.rand(M, num_negatives, device=dev)
    r = (u * (n - 1).clamp_min(1).unsqueeze(1)).long()  # [0, n - 2]
    r = torch.minimum(r, (n - 2).clamp_min(0).unsqueeze(1))
    r = r + (r >= local.unsqueeze(1)).long()  # skip myself
    r = torch.where((n > 1).unsqueeze(1), r, local.unsqueeze(1))
    return offsets[utt].unsqueeze(1) + r


class Wav2Vec2Objective(Objective):
    """Contrastive + diversity + feature-penalty loss (wav2vec 2.0 Base defaults).

    Args:
        encoder: the speechssl Encoder (CNN front end: ``extract_features`` are the quantizer's input).
        final_dim: dim of the contrastive space (256).
        num_negatives: negatives per masked frame (100).
        logit_temp: cosine temperature (0.1).
        latent_vars, latent_groups, latent_dim: codebook entries per group (320), groups (2), quantized dim
            (0 = final_dim), i.e. codewords of ``latent_dim / latent_groups`` each.
        latent_temp: Gumbel temperature (max, min, decay per step) = (2, 0.5, 0.999995).
        diversity_weight: 0.1; feature_pen_weight: 10; mask_prob / mask_length: 0.65 / 10.
        seed: own generator for masks and negatives (default: the global RNG).
    """

    name = "wav2vec2"

    def __init__(self, encoder: nn.Module, *, final_dim: int = 256, num_negatives: int = 100,
                 logit_temp: float = 0.1, latent_vars: int = 320, latent_groups: int = 2, latent_dim: int = 0,
                 latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995), diversity_weight: float = 0.1,
                 feature_pen_weight: float = 10.0, mask_prob: float = 0.65, mask_length: int = 10,
                 seed: int | None = None):
        super().__init__(encoder, mask_prob=mask_prob, mask_length=mask_length, seed=seed)
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if logit_temp <= 0:
            raise ValueError(f"logit_temp must be > 0, got {logit_temp}")
        self.num_negatives, self.logit_temp = int(num_negatives), float(logit_temp)
        self.diversity_weight, self.feature_pen_weight = float(diversity_weight), float(feature_pen_weight)
        cfg = getattr(encoder, "config", None)
        channels = int(cfg.conv_layers[-1][0]) if cfg is not None else int(encoder.hidden_size)
        vq_dim = int(latent_dim) if latent_dim > 0 else int(final_dim)
        self.quantizer = GumbelVectorQuantizer(channels, num_vars=latent_vars, groups=latent_groups, vq_dim=vq_dim,
                                               temp=tuple(latent_temp))
        self.project_q = nn.Linear(vq_dim, final_dim)
        self.final_proj = nn.Linear(encoder.hidden_size, final_dim)

    def set_step(self, step: int) -> None:
        super().set_step(step)
        self.quantizer.set_step(step)

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S] float, ``audio_lens`` [B]. Loss per masked frame (``sample_size``)."""
        audio, lens = self.audio_of(batch)
        frames, T = self.encoder_frames(lens, audio.shape[1])
        mask = self.span_mask(frames, T)
        out = self.encoder(audio, lens, mask_indices=mask)
        x = out.last_hidden_state if out.last_hidden_state is not None else out.hidden_states[-1]  # [B, T', D]
        self.check_frames(x, T)
        sel = mask & ~out.padding_mask  # [B, T'] masked, valid frames
        M = int(sel.sum())
        if M == 0:
            raise ValueError(f"no masked frame in the batch (cuts {batch.get('cut_ids', '?')}): utterances too "
                             "short for the encoder?")
        q = self.quantizer(out.extract_features[sel])  # quantize only what the loss uses; perplexity over it
        y = self.project_q(q.x)  # [M, F] positives
        c = self.final_proj(x[sel])  # [M, F] context
        utt = sel.nonzero()[:, 0]
        neg_idx = sample_negatives(utt, self.num_negatives, self._gen)  # [M, N]
        with fp32(x.device.type):
            y32, c32 = y.float(), c.float()
            negs = y32[neg_idx]  # [M, N, F]
            cands = torch.cat([y32.unsqueeze(1), negs], dim=1)  # [M, 1 + N, F]
            logits = F.cosine_similarity(c32.unsqueeze(1), cands, dim=-1) / self.logit_temp
            same = (negs == y32.unsqueeze(1)).all(-1)  # a negative identical to the positive is no negative
            logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
            target = torch.zeros(M, dtype=torch.long, device=x.device)
            contrastive = cross_entropy_fp32(logits, target, reduction="sum") / M
            diversity = q.diversity_loss.float()
            pen = out.features_pen.float()
            loss = contrastive + self.diversity_weight * diversity + self.feature_pen_weight * pen
        with torch.no_grad():
            lg = logits.detach()
            # fairseq's accuracy: the positive is the argmax, and not merely because all logits tie
            top = lg.argmax(-1) == 0
            tie = lg.argmin(-1) == 0
            acc = float((top & ~tie).float().mean())
        logs = {
            "loss": float(loss.detach()), "contrastive": float(contrastive.detach()),
            "diversity": float(diversity.detach()), "features_pen": float(pen.detach()), "acc": acc,
            "prob_perplexity": float(q.prob_perplexity.detach()), "code_perplexity": float(q.code_perplexity.detach()),
            "temp": float(q.temp), "masked_frames": float(M),
        }
        return StepOutput(loss, logs, sample_size=M)
