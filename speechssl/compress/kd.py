"""Distillation building blocks shared by every student recipe (DistilHuBERT, layer-to-layer, DPHuBERT,
Recycle-and-Distill, OS-KDFT): the frozen teacher, the frame-masked L1 + cosine loss, the frame check, identity-
initialised layer maps and the student's shared layer-drop capability."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["valid_frame_mask", "distill_loss", "FrozenTeacher", "identity_maps"]


def valid_frame_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B] valid frame counts -> [B, T'] bool, True on valid frames."""
    return torch.arange(num_frames, device=lengths.device)[None, :] < lengths[:, None]


def distill_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *, cos_weight: float = 1.0,
                 cos_type: str = "logsig") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1 + cosine distillation loss over valid frames.

    Args:
        pred, target: [B, T', D] student prediction and teacher feature.
        valid: [B, T'] bool, True where the frame is real audio (padding is excluded from every term).
        cos_weight: weight of the cosine term.
        cos_type: "logsig" for mean(-log sigmoid(cos)) (DistilHuBERT), "neg" for -mean(cos) (DPHuBERT).
    Returns:
        (loss, l1, cos) scalars; ``cos`` is the mean cosine similarity (for logging).
    """
    if pred.shape != target.shape:
        raise ValueError(f"distillation shapes differ: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
    if valid.shape != pred.shape[:2]:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match features {tuple(pred.shape[:2])}")
    p = pred[valid].float()  # [N, D]: only real frames
    t = target[valid].float()
    if p.shape[0] == 0:
        raise ValueError("distillation batch has no valid frames (all lengths are 0)")
    l1 = (p - t).abs().mean()
    cos = F.cosine_similarity(p, t, dim=-1)  # [N]
    if cos_type == "logsig":
        cos_term = -F.logsigmoid(cos).mean()
    elif cos_type == "neg":
        cos_term = -cos.mean()
    else:
        raise ValueError(f"cos_type must be 'logsig' or 'neg', got {cos_type!r}")
    return l1 + cos_weight * cos_term, l1.detach(), cos.mean().detach()


class FrozenTeacher:
    """Holds a teacher encoder outside the student's module tree: eval mode, no grad, moved to the input's device.

    Not an ``nn.Module`` on purpose: it must not show up in ``parameters()`` or ``state_dict()``.
    """

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor, lengths: torch.Tensor | None, mask_indices: torch.Tensor | None = None):
        """wav [B, S], lengths [B], mask_indices [B, T'] (frames replaced by the teacher's mask embedding)."""
        p = next(self.encoder.parameters())
        if p.device != wav.device:
            self.encoder.to(wav.device)
        self.encoder.eval()  # a caller's .train() on the distiller never reaches it, but be explicit
        return self.encoder(wav, lengths, mask_indices=mask_indices)


def _check_frames(s_out, t_out) -> torch.Tensor:
    """Student and teacher share the CNN arithmetic, hence frame counts; return the [B, T'] valid mask."""
    s_len, t_len = s_out.lengths, t_out.lengths
    if s_out.hidden_states[-1].shape[1] != t_out.hidden_states[-1].shape[1] or not torch.equal(s_len, t_len):
        raise ValueError("student and teacher disagree on frame counts: their CNN kernels/strides must match")
    return valid_frame_mask(s_len, s_out.hidden_states[-1].shape[1])


class _StudentLayerDrop:
    """The ``shared_layerdrop`` capability for a distiller: its student draws layer-drop from the given seed."""

    trainer_capabilities = ("shared_layerdrop",)

    def set_layerdrop_seed(self, seed: int) -> None:
        self.student.layerdrop_seed = int(seed) % (2**63)


def identity_maps(d_s: int, d_t: int, count: int) -> nn.ModuleList:
    """``count`` Linear(d_s -> d_t) maps that start as the identity on the shared dims (zero elsewhere)."""
    maps = nn.ModuleList(nn.Linear(d_s, d_t) for _ in range(count))
    d = min(d_s, d_t)
    with torch.no_grad():
        for m in maps:
            m.weight.zero_()
            m.weight[:d, :d] = torch.eye(d)
            m.bias.zero_()
    return maps
