"""UniSpeech: wav2vec 2.0's contrastive task on every utterance plus phone (or character) CTC on the labeled ones.

From Wang et al., "UniSpeech: Unified Speech Representation Learning with Labeled and Unlabeled Data" (ICML 2021)
and its public code (``microsoft/UniSpeech``):

- one run sees labeled utterances L (with transcripts) and unlabeled ones M; the loss is
  ``sum_{L} (alpha * L_ctc + (1 - alpha) * L_self) + sum_{M} L_self`` with ``alpha = 0.5`` (``mtlalpha``);
- ``L_self`` is wav2vec 2.0's (contrastive over masked frames, Gumbel quantizer with G = 2 groups of V = 320,
  diversity weight 0.1, feature penalty 10), reused here from :class:`Wav2Vec2Objective` (quantizer, projections,
  negatives);
- the CTC branch reads the transformer output of the *masked* input, in which every frame is replaced by the
  quantized latent of its CNN feature (projected to the model width) with probability ``r = 0.5``
  (``replace_prob``, the released code's and transformers' ``UniSpeechConfig`` default): the CTC gradient then
  reaches the codebook, which makes the codewords phonetically aware; then dropout and a linear CTC layer over
  the phone vocabulary plus blank;
- sums, not means: CTC per utterance and contrastive per masked frame are summed and the total divided by the
  masked frames (the released criterion's sample size).

Batches mark their labeled utterances (``labeled`` [B] bool) and carry ``ctc_targets`` / ``ctc_lens`` (see
``speechssl.data.loader``: ``data.labeled``, ``data.labeled_ratio``, ``data.labeled_field``); a batch without
them (validation, diagnostics) is all unlabeled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.train.contract import StepOutput

from .base import cross_entropy_fp32, fp32
from .wav2vec2 import Wav2Vec2Objective, sample_negatives

__all__ = ["UniSpeechObjective", "replacement_mask"]


def replacement_mask(shape: tuple[int, int], prob: float, generator: torch.Generator | None = None,
                     device=None) -> Tensor:
    """Bernoulli(``prob``) [B, T] bool: the frames whose context vector is replaced by its quantized latent."""
    if generator is not None:
        return (torch.rand(shape, generator=generator) < prob).to(device)
    return torch.rand(shape, device=device) < prob


class UniSpeechObjective(Wav2Vec2Objective):
    """wav2vec 2.0 contrastive loss on every utterance + CTC on the labeled ones.

    Args:
        encoder: the speechssl Encoder (CNN front end).
        vocab_size: CTC outputs, blank (id 0) included: at least the labeled vocabulary's size + 1 (the loader
            logs the vocabulary; extra outputs are never targets and do no harm).
        ctc_weight: alpha (0.5): labeled utterances weigh CTC by alpha and their contrastive loss by 1 - alpha.
        replace_prob: r (0.5), the chance that a frame's context vector is replaced by its quantized latent
            before the CTC layer (training only).
        ctc_dropout: dropout before the CTC layer (0).
        Further keyword arguments are wav2vec 2.0's (``final_dim``, ``num_negatives``, ``latent_vars`` ...,
        ``mask_prob``, ``mask_length``, ``seed``).
    """

    name = "unispeech"

    def __init__(self, encoder: nn.Module, vocab_size: int = 80, *, ctc_weight: float = 0.5,
                 replace_prob: float = 0.5, ctc_dropout: float = 0.0, **kwargs):
        super().__init__(encoder, **kwargs)
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (blank + one symbol), got {vocab_size}")
        if not 0.0 <= ctc_weight <= 1.0 or not 0.0 <= replace_prob <= 1.0:
            raise ValueError(f"ctc_weight and replace_prob must be in [0, 1], got {ctc_weight}, {replace_prob}")
        self.vocab_size, self.ctc_weight, self.replace_prob = int(vocab_size), float(ctc_weight), float(replace_prob)
        self.q2h_proj = nn.Linear(self.project_q.in_features, encoder.hidden_size)
        self.ctc_dropout = nn.Dropout(ctc_dropout)
        self.ctc_proj = nn.Linear(encoder.hidden_size, self.vocab_size)

    @staticmethod
    def labeled_of(batch: dict, B: int, device) -> Tensor:
        """[B] bool: the batch's ``labeled`` flags, all False when it has none."""
        flags = batch.get("labeled")
        if flags is None:
            return torch.zeros(B, dtype=torch.bool, device=device)
        return torch.as_tensor(flags, dtype=torch.bool).to(device)

    def contrastive_terms(self, x: Tensor, feats: Tensor, sel: Tensor):
        """Per-frame contrastive CE [M] on the selected frames (x [B, T, D] context, feats [B, T, C] CNN output,
        sel [B, T] masked valid frames), the quantizer output over them, and the logits [M, 1 + N]."""
        q = self.quantizer(feats[sel])
        y = self.project_q(q.x)  # [M, F] positives
        c = self.final_proj(x[sel])  # [M, F] context
        neg_idx = sample_negatives(sel.nonzero()[:, 0], self.num_negatives, self._gen)  # [M, N]
        with fp32(x.device.type):
            y32, c32 = y.float(), c.float()
            negs = y32[neg_idx]
            logits = F.cosine_similarity(c32.unsqueeze(1), torch.cat([y32.unsqueeze(1), negs], 1), dim=-1)
            logits = logits / self.logit_temp
            same = (negs == y32.unsqueeze(1)).all(-1)  # a negative identical to the positive is no negative
            logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
            ce = cross_entropy_fp32(logits, torch.zeros(len(y), dtype=torch.long, device=x.device), "none")
        return ce, q, logits

    def ctc_branch(self, x: Tensor, feats: Tensor, valid: Tensor, labeled: Tensor, batch: dict
                   ) -> tuple[Tensor, int]:
        """Summed CTC loss of the labeled utterances and the number of replaced frames (x [B, T, D],
        feats [B, T, C], valid [B, T]); the replacement mixes quantized latents into the context (training)."""
        rows = labeled.nonzero()[:, 0]
        xl, fl, vl = x[rows], feats[rows], valid[rows]
        replaced = 0
        if self.training and self.replace_prob > 0:
            rep = replacement_mask(tuple(vl.shape), self.replace_prob, self._gen, x.device) & vl
            replaced = int(rep.sum())
            if replaced:
                qh = self.q2h_proj(self.quantizer(fl[rep]).x).to(xl.dtype)  # [R, D]
                xl = xl.masked_scatter(rep.unsqueeze(-1), qh)
        logits = self.ctc_proj(self.ctc_dropout(xl))  # [L, T, V]
        targets = torch.as_tensor(batch["ctc_targets"]).to(x.device)[rows].long()
        lens = torch.as_tensor(batch["ctc_lens"]).to(x.device)[rows].long()
        if bool((targets >= self.vocab_size).any()):
            raise ValueError(f"a CTC target id ({int(targets.max())}) is >= objective.kwargs.vocab_size "
                             f"({self.vocab_size}): set vocab_size to the labeled vocabulary's size + 1")
        with fp32(x.device.type):
            lp = logits.float().log_softmax(-1).transpose(0, 1)  # [T, L, V]
            loss = F.ctc_loss(lp, targets.clamp_min(0), vl.sum(1), lens, blank=0, reduction="sum",
                              zero_infinity=True)
        return loss, replaced

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S], ``audio_lens`` [B]; optional ``labeled`` [B] bool, ``ctc_targets`` [B, L],
        ``ctc_lens`` [B]. Loss per masked frame (``sample_size``)."""
        audio, lens = self.audio_of(batch)
        frames, T = self.encoder_frames(lens, audio.shape[1])
        mask = self.span_mask(frames, T)
        out = self.encoder(audio, lens, mask_indices=mask)
        x = out.last_hidden_state  # [B, T, D]
        self.check_frames(x, T)
        valid = ~out.padding_mask
        sel = mask & valid
        M = int(sel.sum())
        if M == 0:
            raise ValueError(f"no masked frame in the batch (cuts {batch.get('cut_ids', '?')}): utterances too "
                             "short for the encoder?")
        labeled = self.labeled_of(batch, x.shape[0], x.device)
        ce, q, logits = self.contrastive_terms(x, out.extract_features, sel)
        weight = torch.where(labeled, 1.0 - self.ctc_weight, 1.0)[sel.nonzero()[:, 0]]  # [M] per frame
        ctc, replaced = (self.ctc_branch(x, out.extract_features, valid, labeled, batch) if bool(labeled.any())
                         else (x.new_zeros((), dtype=torch.float32), 0))
        if replaced == 0:  # keep the CTC-side parameters in the graph with a zero gradient: a DDP rank whose
            ctc = ctc + 0.0 * self._ctc_params_sum()  # batch has no labeled (or replaced) frame must still reduce them
        with fp32(x.device.type):
            contrastive = (weight * ce).sum()
            loss = (contrastive + self.ctc_weight * ctc) / M + self.diversity_weight * q.diversity_loss.float() \
                + self.feature_pen_weight * out.features_pen.float()
        n_lab = int(labeled.sum())
        logs = self._logs(loss, ce, ctc / max(1, n_lab), q, logits, out.features_pen)
        logs.update({"masked_frames": float(M), "labeled_utts": float(n_lab), "replaced_frames": float(replaced),
                     "replaced_fraction": replaced / max(1, int(valid[labeled].sum()))})
        return StepOutput(loss, logs, sample_size=M)

    def _ctc_params_sum(self) -> Tensor:
        return sum(p.sum() for m in (self.q2h_proj, self.ctc_proj) for p in m.parameters())

    def _logs(self, loss: Tensor, ce: Tensor, ctc: Tensor, q, logits: Tensor, pen: Tensor) -> dict[str, float]:
        """The step's numbers: contrastive CE per masked frame, CTC per labeled utterance, accuracy ..."""
        with torch.no_grad():
            lg = logits.detach()
            # fairseq's accuracy: the positive is the argmax, and not merely because all logits tie
            acc = float(((lg.argmax(-1) == 0) & ~(lg.argmin(-1) == 0)).float().mean())
        return {"loss": float(loss.detach()), "contrastive": float(ce.detach().mean()), "ctc": float(ctc.detach()),
                "diversity": float(q.diversity_loss.detach()), "features_pen": float(pen.detach()), "acc": acc,
                "prob_perplexity": float(q.prob_perplexity.detach()), "temp": float(q.temp)}
