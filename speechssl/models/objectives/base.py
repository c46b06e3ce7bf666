"""What every pretraining objective shares: the encoder, mask sampling, label alignment and fp32 losses.

An objective is a model for the ``Trainer``: ``forward(batch) -> StepOutput`` (``speechssl.train.contract``) with
the loss normalised per masked frame and that count as ``sample_size``. It declares the ``step`` capability
(``set_step``: temperature schedules) and ``shared_layerdrop`` (``set_layerdrop_seed``: FSDP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.constants import PAD_ID

from ..masking import compute_span_mask

__all__ = ["OBJECTIVES", "Objective", "fp32", "cross_entropy_fp32", "crop_or_pad", "PAD_ID"]


def fp32(device_type: str):
    """Context that turns autocast off, for norms, cosines, softmax and CE (inputs must be cast with .float())."""
    return torch.autocast(device_type=device_type, enabled=False)


def cross_entropy_fp32(logits: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """Cross-entropy in fp32 whatever the autocast state: logits [N, K], target [N] long."""
    with fp32(logits.device.type):
        return F.cross_entropy(logits.float(), target, reduction=reduction, ignore_index=PAD_ID)


def crop_or_pad(x: Tensor, length: int, value) -> Tensor:
    """Crop or right-pad dim 1 of x [B, T, ...] to ``length``, the encoder's frame count for the batch width
    (``Objective.encoder_frames``): labels may be a frame longer or shorter from rounding at the utterance end."""
    T = x.shape[1]
    if T == length:
        return x
    if T > length:
        return x[:, :length]
    pad_shape = (x.shape[0], length - T) + tuple(x.shape[2:])
    return torch.cat([x, x.new_full(pad_shape, value)], dim=1)


OBJECTIVES: dict[str, type["Objective"]] = {}
"""``objective.name`` -> class: every ``Objective`` subclass that sets ``name``, registered when its module is
imported (``speechssl.models.objectives`` imports every module of the package)."""


class Objective(nn.Module):
    """Base class: ``forward(batch) -> StepOutput`` with ``self.encoder`` the model being pretrained.

    The loss is normalised by the masked frames, returned as ``StepOutput.sample_size`` so the trainer reduces
    gradients across ranks and accumulation steps by the global count. Masks come from the global torch RNG
    (checkpointed by the trainer, so resume is exact) unless ``seed`` gives the objective its own generator.
    """

    trainer_capabilities = ("step", "shared_layerdrop")
    name: str = ""
    """The ``objective.name`` a config selects it by; a subclass that sets it is registered in ``OBJECTIVES``."""
    predicts_units: bool = False
    """Whether it predicts unit labels stored on the cuts: pretraining then requires ``data.units`` and
    ``objective.kwargs.num_classes``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            if name in OBJECTIVES and OBJECTIVES[name] is not cls:
                raise ValueError(f"objective name '{name}' is taken by {OBJECTIVES[name].__qualname__}")
            OBJECTIVES[name] = cls

    def __init__(self, encoder: nn.Module, *, mask_prob: float, mask_length: int, seed: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.mask_prob, self.mask_length = float(mask_prob), int(mask_length)
        self.step = 0
        self._gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def set_layerdrop_seed(self, seed: int) -> None:
        """The encoder draws this micro-batch's layer-drop decisions from ``seed`` (same on every rank)."""
        self.encoder.layerdrop_seed = int(seed) % (2**63)

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
        """(valid encoder frames [B], padded encoder frames) for ``lens`` samples in a batch of ``T`` samples, by
        the encoder's own frame count (``encoder.num_frames``)."""
        frames = self.encoder.num_frames(lens)
        Tp = int(self.encoder.num_frames(torch.tensor([T])).item())
        return frames.to(lens.device).clamp_max(Tp), Tp

    @staticmethod
    def check_frames(x: Tensor, T: int) -> None:
        """The encoder output x [B, T', D] has the ``T`` frames its ``num_frames`` announced (masks and labels
        were built on that grid)."""
        if x.shape[1] != T:
            raise RuntimeError(f"the encoder returned {x.shape[1]} frames where its num_frames gives {T}: masks and "
                               "labels would not line up with its output")
