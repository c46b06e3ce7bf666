"""Hidden states of chosen layers for padded batches, equal to running one utterance at a time.

``LayerEncoder(model, layers)(audio, lens)`` runs one padded forward and returns each utterance's frames of each
chosen layer, cut to ``model.num_frames(len)``. Layer indices follow ``EncoderOutput.hidden_states``: 0 is the
input of the first transformer layer, ``i`` the output of layer ``i``, up to ``model.num_layers``; any other
index is a ``ValueError`` naming the layer and the model's range (a silent wrong-layer extraction is the most
common unit bug).

Padding exactness: the Base CNN front end (``extractor_mode: group_norm``) normalises every channel of its first
block over the whole time axis, so on a padded batch the padding would change every frame of the shorter
utterances. During the forward the first block's GroupNorm is swapped for the same normalisation taken over each
utterance's valid frames only (same weights); every later frame count then matches the utterance on its own, the
encoder zeroes padding frames before the positional convolution and masks them in attention. A batch thus gives
each utterance the states it gets alone, up to float rounding (``padding_rule: cnn``; encoders converted with
fairseq's ``fairseq_block`` rule mark slightly more frames valid on padded batches, as fairseq does).

``HiddenStates(encoder, dtype)`` is the extraction source of hidden states: ``source(batch)`` ->
``{field: [array [T_i, D]]}`` with fields named ``layer_<i>``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from speechssl.constants import SAMPLE_RATE
from speechssl.models.frames import conv_layer_frames, front_end_layer_frames

__all__ = ["check_layers", "layer_field", "LayerEncoder", "HiddenStates", "FieldSpec", "StoreDtype"]

StoreDtype = Literal["fp16", "fp32"]
_NUMPY_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass(frozen=True)
class FieldSpec:
    """One output field of an extraction: what it holds and at which rate.

    kind: "hidden" (float [T, D]) or "units" (int [T]); layer: the hidden-state index it came from (None for
    features that are not a layer, such as MFCC); frame_shift: seconds per frame.
    """

    kind: Literal["hidden", "units"]
    layer: int | None
    frame_shift: float


def layer_field(layer: int) -> str:
    """The custom field that holds hidden-state index ``layer``: ``layer_<layer>``."""
    return f"layer_{int(layer)}"


def check_layers(layers: Sequence[int], num_layers: int, key: str = "layers", model: str = "the model") -> list[int]:
    """``layers`` as a list of ints, each in ``0..num_layers``; else a ValueError naming the layer and the range."""
    out = [int(x) for x in layers]
    if not out:
        raise ValueError(f"argument '{key}' names no layer: give at least one of 0..{num_layers}")
    for x in out:
        if not 0 <= x <= num_layers:
            raise ValueError(f"argument '{key}': layer {x} is out of range: {model} has hidden states 0..{num_layers} "
                             f"(0 = transformer input, i = output of layer i of {num_layers})")
    if len(set(out)) != len(out):
        raise ValueError(f"argument '{key}' names a layer twice: {out}")
    return out


class _MaskedGroupNorm(nn.Module):
    """``GroupNorm(C, C)`` whose statistics cover each utterance's first ``frames[b]`` frames only: [B, C, T]."""

    def __init__(self, norm: nn.GroupNorm, frames: Tensor):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x: Tensor) -> Tensor:
        # the native kernel on each utterance's own frames (fused statistics and affine); frames past the end stay
        # zero: the unpadded convolutions after this block never read them into a valid frame
        out = torch.zeros_like(x)
        for b, n in enumerate(self.frames.tolist()):
            if n > 0:
                out[b, :, :n] = nn.functional.group_norm(x[b:b + 1, :, :n], self.norm.num_groups, self.norm.weight,
                                                         self.norm.bias, self.norm.eps)[0]
        return out


class _MaskedBlock(nn.Module):
    """A conv block whose output frames past each utterance's ``frames[b]`` are zero, as the zero padding of the
    next block's convolution sees them when the utterance runs alone: [B, C, T] -> [B, C', T']."""

    def __init__(self, block: nn.Module, frames: Tensor):
        super().__init__()
        self.block, self.frames = block, frames

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        valid = torch.arange(y.shape[-1], device=y.device)[None] < self.frames.to(y.device)[:, None]
        return y * valid[:, None].to(y.dtype)


def _replacements(model: nn.Module, lens: Tensor) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, child name, replacement) for the front-end parts whose padded-batch output would differ from the
    utterance alone."""
    cfg, blocks = model.config, model.feature_extractor.conv_layers
    if cfg.frontend == "cnn":  # unpadded convs: only the first block's GroupNorm sees the padding
        if getattr(blocks[0], "norm", None) != "group":
            return []
        first = conv_layer_frames(lens, cfg.conv_layers[:1], padded=False)[0]
        return [(blocks[0], "layer_norm", _MaskedGroupNorm(blocks[0].layer_norm, first))]
    # fbank subsampler: convs padded by k // 2 see the next frames, which must be zeros past the end
    frames = front_end_layer_frames(cfg, lens)
    return [(blocks, str(i), _MaskedBlock(block, frames[i])) for i, block in enumerate(blocks)]


@contextlib.contextmanager
def _padding_exact(model: nn.Module, lens: Tensor) -> Iterator[None]:
    """During the block: the front-end parts that would let padding change valid frames work per utterance."""
    swaps = _replacements(model, lens.cpu())
    originals = [parent.get_submodule(name) for parent, name, _ in swaps]
    for parent, name, new in swaps:
        parent.register_module(name, new)
    try:
        yield
    finally:
        for (parent, name, _), old in zip(swaps, originals):
            parent.register_module(name, old)


class LayerEncoder:
    """Chosen layers' hidden states of padded batches: ``enc(audio [B, T], lens [B])`` -> (``{layer: [B, T', D]}``
    float32 on the CPU, frames [B]); utterance ``b`` holds ``frames[b] = model.num_frames(lens[b])`` valid frames.

    Args:
        model: an ``Encoder`` (put in eval mode here).
        layers: hidden-state indices, checked against ``model.num_layers``.
        device: where the forward runs.
        name: the model's path (recorded in ``extract.json`` and named in errors).
        key: the argument errors name for ``layers``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], device: str | torch.device = "cpu",
                 name: str = "<encoder>", key: str = "layers"):
        self.layers = check_layers(layers, model.num_layers, key=key, model=f"model {name}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.name = name
        self.hidden_size = int(model.hidden_size)
        self.frame_shift = model.downsample_rate / SAMPLE_RATE

    @classmethod
    def from_path(cls, path: str, layers: Sequence[int], device: str | torch.device = "cpu") -> "LayerEncoder":
        """Load the model with ``speechssl.load_pretrained`` (a speechssl, HF or fairseq checkpoint)."""
        from speechssl.models.io import load_pretrained

        return cls(load_pretrained(str(path)), layers, device, name=str(Path(path).resolve()))

    @torch.inference_mode()
    def __call__(self, audio: Tensor, lens: Tensor) -> tuple[dict[int, Tensor], Tensor]:
        lens = torch.as_tensor(lens).long()
        with _padding_exact(self.model, lens):
            out = self.model(audio.to(self.device), lens.to(self.device))
        frames = self.model.num_frames(lens).clamp_max(out.hidden_states[0].shape[1])
        return {i: out.hidden_states[i].float().cpu() for i in self.layers}, frames

    def per_utterance(self, audio: Tensor, lens: Tensor) -> dict[int, list[np.ndarray]]:
        """As ``__call__``, split per utterance: ``{layer: [float32 array [frames_b, D]]}``."""
        states, frames = self(audio, lens)
        return {i: [h[b, : int(frames[b])].numpy() for b in range(len(frames))] for i, h in states.items()}


class HiddenStates:
    """Extraction source: ``source(batch)`` -> ``{"layer_<i>": [array [T_b, D] in dtype]}`` for each chosen layer."""

    def __init__(self, encoder: LayerEncoder, dtype: StoreDtype = "fp16"):
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"argument 'dtype' must be one of {'|'.join(_NUMPY_DTYPES)}, got {dtype!r}")
        self.encoder, self.dtype = encoder, dtype
        self.fields = {layer_field(i): FieldSpec("hidden", i, encoder.frame_shift) for i in encoder.layers}

    def __call__(self, batch: dict) -> dict[str, list[np.ndarray]]:
        per = self.encoder.per_utterance(batch["audio"], batch["audio_lens"])
        cast = _NUMPY_DTYPES[self.dtype]
        return {layer_field(i): [h.astype(cast) for h in hs] for i, hs in per.items()}

    def describe(self) -> dict:
        """What ``extract.json`` records about this source."""
        return {"kind": "hidden", "model": self.encoder.name, "layers": self.encoder.layers, "dtype": self.dtype}
