"""The contract between a model and the ``Trainer``: what ``forward`` returns and which optional hooks it offers.

**Forward.** The trainer calls ``model(batch)`` with one micro-batch (a dict of tensors from the loader, moved to
the device) and needs a :class:`StepOutput` back:

- ``loss``: a scalar tensor, already normalised (per masked frame, per utterance ...); the trainer backpropagates it.
- ``logs``: name -> float or one-element tensor (accuracies, loss terms); averaged over the update the same way as
  the loss and written to ``metrics.jsonl``. Other values are left out of the record.
- ``sample_size``: the count ``loss`` was normalised by (masked frames ...), an int or a tensor, or None.
  With a count the trainer un-normalises each micro-batch (``loss * sample_size``), divides the gradient by the
  count summed over gradient-accumulation micro-batches and ranks, and weighs the logs by it: 2 ranks x B give
  exactly the update of 1 rank x 2B (fairseq semantics). With None every micro-batch and rank weighs the same.
  All micro-batches of an update must agree (all counts or all None).

Anything else returned by ``forward`` is a ``TypeError`` naming the model class.

**Optional capabilities.** A model class declares the hooks it offers in ``trainer_capabilities`` (a tuple of the
names below); the trainer checks the declaration when it is built (an unknown name or a missing method is a
``TypeError`` naming the class and the method) and calls nothing it was not offered:

- ``"step"`` -> ``set_step(step: int)``: called before every update with the number of updates done so far
  (temperature schedules, sparsity ramps).
- ``"shared_layerdrop"`` -> ``set_layerdrop_seed(seed: int)``: called before every micro-batch under
  ``trainer.distributed_strategy: fsdp`` with a seed derived from (trainer seed, step, micro-batch) that is the same
  on every rank; the model draws its layer-drop decisions from it, so every rank skips the same layers and FSDP's
  per-layer gathers match. A model with layer-drop > 0 must declare it to train with FSDP.

Example, a complete new objective::

    class L1Objective(nn.Module):
        trainer_capabilities = ("step",)

        def __init__(self, encoder):
            super().__init__()
            self.encoder, self.head, self.step = encoder, nn.Linear(encoder.hidden_size, 1), 0

        def set_step(self, step: int) -> None:
            self.step = step

        def forward(self, batch) -> StepOutput:
            out = self.encoder(batch["audio"], batch["audio_lens"])
            valid = ~out.padding_mask                                   # [B, T'] frames that hold audio
            err = self.head(out.last_hidden_state[valid]).abs()         # [N, 1]
            return StepOutput(err.mean(), {"err": err.mean()}, sample_size=int(valid.sum()))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

__all__ = ["StepOutput", "StepSums", "CAPABILITIES", "declared_capabilities", "check_step_output"]

CAPABILITIES: dict[str, str] = {
    "step": "set_step",
    "shared_layerdrop": "set_layerdrop_seed",
}
"""Capability name -> the method a model declaring it must have."""


@dataclass
class StepOutput:
    """What ``forward(batch)`` returns to the trainer (see the module docstring)."""

    loss: Tensor
    logs: dict[str, Union[float, Tensor]] = field(default_factory=dict)
    sample_size: Union[int, Tensor, None] = None

    def scalar_logs(self) -> dict[str, float]:
        """The logs that are numbers (floats, ints, one-element tensors) as floats; the rest left out."""
        out = {}
        for k, v in self.logs.items():
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    continue
                v = float(v.detach().float())
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
        return out

    def weight(self) -> float | None:
        """``sample_size`` as a float (a tensor is summed), or None."""
        if self.sample_size is None:
            return None
        if isinstance(self.sample_size, Tensor):
            return float(self.sample_size.detach().sum())
        return float(self.sample_size)


@dataclass
class StepSums:
    """How the StepOutputs of one update's micro-batches add up on a rank (the trainer sums these over ranks):
    loss x weight, weights, audio seconds and logs x weight, the weight being the sample size (``sized``) or 1.
    The update's loss and logs are the sums over the summed weights."""

    loss: float = 0.0
    weight: float = 0.0
    audio: float = 0.0
    logs: dict[str, float] = field(default_factory=dict)
    sized: bool | None = None

    def add(self, loss: float, size: float | None, audio: float, logs: dict[str, float], model_name: str) -> None:
        """Add one micro-batch: its loss, ``StepOutput.weight()``, audio seconds and ``scalar_logs()``."""
        if self.sized is not None and self.sized != (size is not None):
            raise TypeError(f"{model_name}.forward returned a sample_size for some micro-batches of an update and "
                            "None for others: return it always or never (speechssl.train.contract)")
        self.sized = size is not None
        w = size if size is not None else 1.0
        self.loss += loss * w
        self.weight += w
        self.audio += audio
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v * w


def declared_capabilities(model_class: type) -> frozenset[str]:
    """The capabilities ``model_class`` declares in ``trainer_capabilities``, each checked to name a known
    capability whose method the class has; a TypeError names the class and what is wrong."""
    declared = tuple(getattr(model_class, "trainer_capabilities", ()))
    name = model_class.__name__
    for cap in declared:
        if cap not in CAPABILITIES:
            raise TypeError(f"{name}.trainer_capabilities names unknown capability {cap!r} "
                            f"(known: {', '.join(CAPABILITIES)}; see speechssl.train.contract)")
        method = CAPABILITIES[cap]
        if not callable(getattr(model_class, method, None)):
            raise TypeError(f"{name} declares trainer capability {cap!r} but has no method {method}(): define it "
                            "or drop the capability (see speechssl.train.contract)")
    return frozenset(declared)


def check_step_output(out, model_class: type) -> StepOutput:
    """``out`` when it is a StepOutput with a one-element loss tensor; otherwise a TypeError naming the class."""
    name = model_class.__name__
    if not isinstance(out, StepOutput):
        raise TypeError(f"{name}.forward(batch) returned {type(out).__name__}; the Trainer needs "
                        "speechssl.train.contract.StepOutput(loss, logs, sample_size)")
    if not isinstance(out.loss, torch.Tensor) or out.loss.numel() != 1:
        raise TypeError(f"{name}.forward(batch) returned a StepOutput whose loss is not a one-element tensor "
                        f"({type(out.loss).__name__})")
    return out
