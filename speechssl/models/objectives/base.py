"""What every pretraining objective shares: the encoder, mask sampling, the sample-size hook and fp32 losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..masking import compute_span_mask

__all__ = ["Objective", "fp32", "cross_entropy_fp32", "crop_or_pad"]

PAD_ID = -100  # padding in unit targets (docs/internals.md: never a real id)


def fp32(device_type: str):
    """Context that turns autocast off, for norms, cosines, softmax and CE (inputs must be cast with .float())."""
    return torch.autocast(device_type=device_type, enabled=False)


def cross_entropy_fp32(logits: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """Cross-entropy in fp32 whatever the autocast state: logits [N, K], target [N] long."""
    with fp32(logits.device.type):
        return F.cross_entropy(logits.float(), target, reduction=reduction, ignore_index=PAD_ID)


def crop_or_pad(x: Tensor, length: int, value) -> Tensor:
    """Crop or right-pad dim 1 of x [B, T, ...] to ``length`` (labels that are a frame longer or shorter than the
    encoder output, from rounding at the utterance end)."""
    T = x.shape[1]
    if T == length:
        return x
    if T > length:
        return x[:, :length]
    pad_shape = (x.shape[0], length - T) + tuple(x.shape[2:])
    return torch.cat([x, x.new_full(pad_shape, value)], dim=1)


class Objective(nn.Module):
    """Base class: ``forward(batch) -> (loss, logs)`` with ``self.encoder`` the model being pretrained.

    ``loss`` is normalised by :meth:`sample_size` (masked frames), which the trainer reads after the forward to
    reduce gradients across ranks and accumulation steps. Masks come from the global torch RNG (checkpointed by
    the trainer, so resume is exact) unless ``seed`` gives the objective its own generator.
    """

    def __init__(self, encoder: nn.Module, *, mask_prob: float, mask_length: int, seed: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.mask_prob, self.mask_length = float(mask_prob), int(mask_length)
        self.step = 0
        self._gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        self._last_size: tuple[int, int] | None = None  # (id(batch), sample size) of the last forward

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def sample_size(self, batch: dict) -> int:
        """Masked frames that the last ``forward(batch)`` normalised its loss by."""
        if self._last_size is None or self._last_size[0] != id(batch):
            raise RuntimeError("sample_size(batch) is known only after forward(batch)")
        return self._last_size[1]

    def _remember(self, batch: dict, size: int) -> None:
        self._last_size = (id(batch), int(size))

    def span_mask(self, frames: Tensor, T: int) -> Tensor:
        """Span mask [B, T] on encoder frames (``frames`` [B] valid frames), on the frames' device."""
        if self._gen is not None:
            m = compute_span_mask((frames.shape[0], T), frames.cpu(), self.mask_prob, self.mask_length,
                                  generator=self._gen)
            return m.to(frames.device)
        return compute_span_mask((frames.shape[0], T), frames, self.mask_prob, self.mask_length,
                                 device=frames.device)

    @staticmethod
    def audio_of(batch: dict) -> tuple[Tensor, Tensor]:
        if "audio" not in batch:
            raise KeyError(f"the batch has no 'audio' (keys: {sorted(batch)})")
        audio = batch["audio"]
        lens = batch.get("audio_lens")
        if lens is None:
            lens = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long, device=audio.device)
        return audio, lens.to(audio.device).long()

    def encoder_frames(self, lens: Tensor, T: int) -> tuple[Tensor, int]:
        """(valid encoder frames [B], padded encoder frames) for ``lens`` samples in a batch of ``T`` samples."""
        frames = self.encoder.num_frames(lens)
        Tp = int(self.encoder.num_frames(torch.tensor([T])).item())
        return frames.to(lens.device).clamp_max(Tp), Tp
