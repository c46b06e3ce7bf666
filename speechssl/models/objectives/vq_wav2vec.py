"""vq-wav2vec: wav2vec's future-step contrastive prediction over quantized CNN features (Baevski, Schneider and
Auli, "vq-wav2vec: Self-Supervised Learning of Discrete Speech Representations", ICLR 2020).

``z = f(x)``: the encoder's waveform CNN (``encoder.feature_extractor``, trained with full gradient; the paper's
has 8 layers, 512 channels, 10 ms stride, 30 ms receptive field). ``q(z)``: a product quantizer of G groups x V
codewords, one of

- ``gumbel``: logits from a linear map of z, a hard straight-through Gumbel-softmax choice per group
  (``GumbelVectorQuantizer``); the paper anneals the temperature from 2 to 0.5 over 70% of the updates, here it is
  ``max(max_t * decay^step, min_t)`` (``latent_temp``, as fairseq implements it);
- ``kmeans``: the nearest codeword by Euclidean distance with the straight-through estimator and the loss
  ``||sg(z) - q||^2 + gamma ||z - sg(q)||^2`` (gamma = 0.25) added to the objective (``KMeansVectorQuantizer``).

The paper uses G = 2, V = 320 for both. ``g``: a causal context network over the quantized frames: the wav2vec
aggregator, stride-1 convolutions with kernels 2 .. 13 (12 layers of 512), each left-padded by repeating the first
frame, followed by a per-frame LayerNorm (fairseq's GroupNorm(1, C) normalises over the whole utterance, which
lets a frame see statistics of the future) and ReLU, with residual connections scaled by sqrt(0.5). Causality is
what makes the task non-trivial: ``c_t`` sees the quantized frames up to t only.

Loss (wav2vec): for each step ``k = 1 .. K`` (K = ``prediction_steps``), a step-specific affine map
``h_k(c_t)`` scores the true quantized frame ``q_{t+k+o-1}`` against ``num_negatives`` (10) distractors drawn
uniformly from the other valid frames of the same utterance (drawn per target frame, shared by the steps that
predict it): ``-log sigmoid(h_k(c_t) . q_pos) - sum_neg log sigmoid(-h_k(c_t) . q_neg)``. The offset ``o``: 1 is
the paper's k = 1 .. K; ``auto`` (the default, as fairseq's released recipe) shifts the targets by
ceil(receptive field / stride) of the encoder's conv layers (3 frames for the paper's encoder), so that a target
shares no input sample with the context frame. The loss is averaged over the (context frame, step) pairs whose
target is a valid frame (``sample_size``), plus the k-means loss (weight 1) or, if ``diversity_weight`` > 0,
wav2vec 2.0's diversity term for the Gumbel quantizer (the paper and fairseq's recipe have none).

Paper setting: LibriSpeech 960 h, 400k updates, cosine learning-rate schedule with warm-up, 150k-sample crops, 10
negatives. fairseq's released Gumbel recipe: 12 prediction steps, ``offset auto``, G = 2, V = 320 with the codebook
shared by the groups (``combine_groups``), a two-layer logit projection (here one linear map), temperature
(2, 0.5, 0.999995), lr 1e-5 after 1000 warm-up updates, cosine decay, 400k updates. The codes ``q`` picks
(:meth:`VqWav2VecObjective.codes`, [B, T, G]; :meth:`VqWav2VecObjective.from_pretrained` rebuilds a trained run)
are the discrete units vq-wav2vec exports (the paper feeds them to BERT).

The encoder's transformer is not part of vq-wav2vec and is not trained: the exported encoder carries the trained
waveform CNN; the quantizer and the context network are the objective's (``parts.safetensors``, part
``objective``). Training with DDP therefore needs ``trainer.ddp_find_unused: true``.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.constants import PAD_ID
from speechssl.train.contract import StepOutput

from ..encoder import Encoder
from ..io import load_checkpoint_parts, load_pretrained, read_checkpoint
from ..quantizers import GumbelVectorQuantizer, KMeansVectorQuantizer
from .base import Objective, fp32

__all__ = ["VqWav2VecObjective", "CausalConvContext", "PAPER_CONTEXT_LAYERS", "receptive_offset"]

PAPER_CONTEXT_LAYERS = [[512, k, 1] for k in range(2, 14)]
"""The wav2vec / vq-wav2vec context network: 12 stride-1 conv layers of 512 channels, kernels 2 .. 13."""


def receptive_offset(conv_layers: Sequence[Sequence[int]]) -> int:
    """ceil(receptive field / total stride) of a conv stack ``[[channels, kernel, stride], ...]``: the frame
    distance at which two frames of its output share no input sample (fairseq wav2vec's ``offset: auto``)."""
    field, jump = 1, 1
    for _, k, s in conv_layers:
        field += (int(k) - 1) * jump
        jump *= int(s)
    return math.ceil(field / jump)


class CausalConvContext(nn.Module):
    """Causal conv stack: x [B, T, C_in] -> [B, T, C_last]; output frame t depends on input frames <= t only.

    Each layer ``[channels, kernel, 1]``: left padding of kernel - 1 copies of the first frame, Conv1d, dropout,
    per-frame LayerNorm, ReLU; the residual (1x1-projected when the width changes) is added and the sum scaled by
    sqrt(``residual_scale``)."""

    def __init__(self, in_dim: int, layers: Sequence[Sequence[int]], dropout: float = 0.0,
                 residual_scale: float = 0.5):
        super().__init__()
        if not layers or any(len(l) != 3 or int(l[2]) != 1 for l in layers):
            raise ValueError(f"context_layers must be a non-empty list of [channels, kernel, 1] (stride 1 keeps one "
                             f"context vector per frame), got {layers!r}")
        self.convs, self.norms, self.skips = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_in = in_dim
        for c, k, _ in layers:
            self.convs.append(nn.Conv1d(c_in, int(c), int(k)))
            self.norms.append(nn.LayerNorm(int(c)))
            self.skips.append(nn.Conv1d(c_in, int(c), 1, bias=False) if c_in != int(c) else nn.Identity())
            c_in = int(c)
        self.out_dim = c_in
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(residual_scale)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(1, 2)  # [B, C, T]
        for conv, norm, skip in zip(self.convs, self.norms, self.skips):
            k = conv.kernel_size[0]
            y = conv(F.pad(h, (k - 1, 0), mode="replicate") if k > 1 else h)
            y = torch.relu(norm(self.dropout(y).transpose(1, 2))).transpose(1, 2)
            h = (y + skip(h)) * self.scale
        return h.transpose(1, 2)


class VqWav2VecObjective(Objective):
    """Quantized CNN features -> causal context network -> contrastive prediction of future quantized frames.

    Args:
        encoder: a speechssl Encoder with the waveform CNN front end (its transformer is not used).
        quantizer: ``gumbel`` or ``kmeans``.
        num_vars, groups: V codewords per group (320) and G groups (2).
        vq_dim: dims of a quantized vector (0 = the CNN's channels, as in the paper).
        gamma: commitment weight of the k-means quantizer (0.25).
        latent_temp: Gumbel temperature (max, min, decay per update) = (2, 0.5, 0.999995).
        combine_groups: one codebook shared by the groups.
        context_layers: the context network's ``[channels, kernel, 1]`` layers (``PAPER_CONTEXT_LAYERS``).
        context_dropout: dropout inside the context network (0).
        prediction_steps: K, future steps predicted (12, fairseq's recipe).
        offset: the first step's distance in frames (1 = the paper's k = 1 .. K) or ``auto`` (the default).
        num_negatives: distractors per target (10).
        diversity_weight: weight of the Gumbel quantizer's diversity term (0, as the paper).
        seed: own generator for the negatives (default: the global RNG).
    """

    name = "vq_wav2vec"

    def __init__(self, encoder: nn.Module, *, quantizer: Literal["gumbel", "kmeans"] = "gumbel", num_vars: int = 320,
                 groups: int = 2, vq_dim: int = 0, gamma: float = 0.25,
                 latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995), combine_groups: bool = False,
                 context_layers: Sequence[Sequence[int]] = tuple(PAPER_CONTEXT_LAYERS), context_dropout: float = 0.0,
                 prediction_steps: int = 12, offset: int | Literal["auto"] = "auto", num_negatives: int = 10,
                 diversity_weight: float = 0.0, seed: int | None = None):
        super().__init__(encoder, mask_prob=0.0, mask_length=1, seed=seed)
        cfg = encoder.config
        if cfg.frontend != "cnn":
            raise ValueError(f"vq-wav2vec quantizes waveform CNN features: the encoder config needs frontend 'cnn' "
                             f"(e.g. preset tiny_wav2vec2), got {cfg.frontend!r}")
        if quantizer not in ("gumbel", "kmeans"):
            raise ValueError(f"quantizer must be 'gumbel' or 'kmeans', got {quantizer!r}")
        if prediction_steps < 1 or num_negatives < 1:
            raise ValueError(f"prediction_steps and num_negatives must be >= 1, got {prediction_steps}, "
                             f"{num_negatives}")
        self.offset = receptive_offset(cfg.conv_layers) if offset == "auto" else int(offset)
        if self.offset < 1:
            raise ValueError(f"offset must be >= 1 or 'auto', got {offset!r}")
        channels = int(cfg.conv_layers[-1][0])
        dim = int(vq_dim) if vq_dim > 0 else channels
        self.kind = quantizer
        if quantizer == "gumbel":
            self.quantizer: nn.Module = GumbelVectorQuantizer(channels, num_vars=num_vars, groups=groups, vq_dim=dim,
                                                              temp=tuple(latent_temp), combine_groups=combine_groups)
        else:
            self.quantizer = KMeansVectorQuantizer(channels, num_vars=num_vars, groups=groups, vq_dim=dim, gamma=gamma,
                                                   combine_groups=combine_groups)
        self.context = CausalConvContext(dim, context_layers, dropout=context_dropout)
        self.steps, self.num_negatives = int(prediction_steps), int(num_negatives)
        self.diversity_weight = float(diversity_weight)
        # h_k for every step at once: c_t [C] -> K predictions of a quantized vector [K * dim]
        self.step_proj = nn.Linear(self.context.out_dim, self.steps * dim)
        # small initial scores: at default init the dot products with the quantized vectors are in the tens, the
        # sigmoid terms saturate and the first updates go into shrinking them instead of into telling frames apart
        nn.init.normal_(self.step_proj.weight, std=0.02)
        nn.init.zeros_(self.step_proj.bias)
        self.vq_dim = dim

    @classmethod
    def from_pretrained(cls, path, map_location: str = "cpu") -> "VqWav2VecObjective":
        """The trained objective (encoder, quantizer, context network) from a pretraining run's ``final/`` model
        directory, in eval mode: what :meth:`codes` needs to export units. The directory's meta must name this
        objective (``speechssl pretrain`` writes it); its keyword arguments rebuild the heads, loaded strictly."""
        meta = read_checkpoint(path, map_location)[3]
        if meta.get("objective") != cls.name:
            raise ValueError(f"{path} was not trained with objective '{cls.name}' (its meta names "
                             f"{meta.get('objective')!r}): no quantizer to take codes from")
        obj = cls(load_pretrained(path, map_location), **dict(meta.get("objective_kwargs") or {}))
        heads = load_checkpoint_parts(path, map_location).get("objective", {})
        missing, unexpected = obj.load_state_dict(heads, strict=False)  # the encoder came from load_pretrained
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"{path}: the objective part does not match objective_kwargs (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return obj.eval()

    def set_step(self, step: int) -> None:
        super().set_step(step)
        if isinstance(self.quantizer, GumbelVectorQuantizer):
            self.quantizer.set_step(step)

    # ------------------------------------------------------------------ pieces
    def features(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """z = the encoder's CNN output after its feature LayerNorm (the encoder's ``extract_features``, what
        wav2vec 2.0 quantizes) [B, T, C], and valid frames [B] (``encoder.num_frames``)."""
        if self.encoder.config.normalize_waveform:
            wav = Encoder._normalize_waveform(wav, lengths)
        z = self.encoder.feature_extractor(wav).transpose(1, 2)
        norm = self.encoder.feature_projection.layer_norm
        # unnormalised CNN outputs can be tiny: flat Gumbel logits, codes drawn by the noise alone
        z = norm(z) if norm is not None else F.layer_norm(z, z.shape[-1:])
        return z, self.encoder.num_frames(lengths).to(z.device).clamp_max(z.shape[1])

    def quantize(self, z: Tensor, valid: Tensor):
        """The quantizer's output for z [B, T, C]; ``valid`` [B, T] selects the frames its statistics count."""
        return self.quantizer(z, valid)

    @torch.no_grad()
    def codes(self, wav: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The discrete units: chosen codeword per group, LongTensor [B, T, G] on the encoder's frames
        (``encoder.num_frames``), ``PAD_ID`` (-100) at padding frames. Deterministic (argmax / nearest codeword,
        no Gumbel noise) whatever the module's mode. wav [B, S] at 16 kHz, lengths [B] valid samples."""
        if lengths is None:
            lengths = torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long, device=wav.device)
        lengths = torch.as_tensor(lengths, device=wav.device).long()
        was = self.quantizer.training
        self.quantizer.eval()
        try:
            z, frames = self.features(wav, lengths)
            valid = torch.arange(z.shape[1], device=z.device)[None] < frames[:, None]
            codes = self.quantize(z, valid).codes.clone()
        finally:
            self.quantizer.train(was)
        return codes.masked_fill(~valid.unsqueeze(-1), PAD_ID)

    def sample_negatives(self, frames: Tensor, T: int) -> Tensor:
        """Distractor frame indices [B, T, N] for every target frame: uniform over the other valid frames of the
        same utterance (``frames`` [B] valid frames; an utterance of one frame gets itself, masked later)."""
        B = frames.shape[0]
        u = torch.rand(B, T, self.num_negatives, generator=self._gen) if self._gen is not None else \
            torch.rand(B, T, self.num_negatives)
        u = u.to(frames.device)
        n = frames.view(B, 1, 1)
        r = (u * (n - 1).clamp_min(1)).long().clamp_max((n - 2).clamp_min(0))  # [0, n - 2]
        t = torch.arange(T, device=frames.device).view(1, T, 1)
        r = r + (r >= t).long()  # skip the target itself
        return torch.where(n > 1, r, t.expand_as(r))

    # ------------------------------------------------------------------ loss
    def _contrastive(self, c: Tensor, q: Tensor, frames: Tensor) -> tuple[Tensor, int, float]:
        """wav2vec's binary contrastive loss summed over (context, step) pairs: c [B, T, Cc], q [B, T, Dq] ->
        (sum, number of pairs, accuracy: the positive strictly outscores every distractor).

        A distractor that happens to carry the positive's code stays in the loss (as in fairseq's wav2vec): its
        two terms cannot both be small, so collapsing the codebook does not pay."""
        B, T, _ = q.shape
        pred = self.step_proj(c).view(B, T, self.steps, self.vq_dim)  # h_k(c_t)
        neg_idx = self.sample_negatives(frames, T)  # [B, T, N]
        rows = torch.arange(B, device=q.device)[:, None, None]
        cands = torch.cat([q.unsqueeze(2), q[rows, neg_idx]], dim=2)  # [B, T, 1 + N, Dq]: positive first
        total, pairs, correct = c.new_zeros((), dtype=torch.float32), 0, 0
        with fp32(c.device.type):
            for k in range(self.steps):
                d = self.offset + k  # target distance of this step
                if d >= T:
                    break
                ok = torch.arange(d, T, device=q.device)[None] < frames[:, None]  # [B, T - d] valid targets
                logits = torch.einsum("btd,btnd->btn", pred[:, : T - d, k].float(), cands[:, d:].float())
                # -log sigmoid(x) = softplus(-x) for the positive, -log sigmoid(-x) = softplus(x) for distractors
                terms = torch.cat([F.softplus(-logits[..., :1]), F.softplus(logits[..., 1:])], dim=-1)
                total = total + terms[ok].sum()
                pairs += int(ok.sum())
                with torch.no_grad():
                    correct += int((logits[..., 0] > logits[..., 1:].max(-1).values)[ok].sum())
        return total, pairs, correct / max(1, pairs)

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S] float, ``audio_lens`` [B]. Loss per predicted (context frame, step) pair."""
        audio, lens = self.audio_of(batch)
        z, frames = self.features(audio, lens)  # [B, T, C]
        valid = torch.arange(z.shape[1], device=z.device)[None] < frames[:, None]
        qo = self.quantize(z, valid)
        c = self.context(qo.x.to(z.dtype))  # [B, T, Cc]
        total, pairs, acc = self._contrastive(c, qo.x, frames)
        if pairs == 0:
            raise ValueError(f"no frame has a target {self.offset} frames ahead (cuts {batch.get('cut_ids', '?')}): "
                             "utterances too short for the encoder's frame rate and the offset")
        contrastive = total / pairs
        logs = {"contrastive": float(contrastive.detach()), "acc": acc, "pairs": float(pairs),
                "code_perplexity": float(qo.code_perplexity.detach())}
        if self.kind == "kmeans":
            loss = contrastive + qo.loss
            logs["kmeans_loss"] = float(qo.loss.detach())
        else:
            loss = contrastive + self.diversity_weight * qo.diversity_loss
            logs.update({"prob_perplexity": float(qo.prob_perplexity.detach()), "temp": float(qo.temp)})
        logs["loss"] = float(loss.detach())
        return StepOutput(loss, logs, sample_size=pairs)
