"""Self-supervised objectives: each wraps an encoder and maps a batch to a ``StepOutput`` (loss, logs, sample size:
the model-to-trainer contract of ``speechssl.train.contract``).

``build_objective(name, encoder, **kwargs)`` with name ``wav2vec2`` | ``hubert`` | ``wavlm`` | ``bestrq``; the
keyword arguments are those of the objective's class (see each class's docstring).
"""
from __future__ import annotations

import difflib
import inspect

from torch import nn

from .base import Objective
from .bestrq import BestRQObjective
from .hubert import HubertObjective
from .wav2vec2 import Wav2Vec2Objective
from .wavlm import WavLMObjective, utterance_mix

__all__ = ["Objective", "Wav2Vec2Objective", "HubertObjective", "WavLMObjective", "BestRQObjective",
           "OBJECTIVES", "build_objective", "utterance_mix"]

OBJECTIVES: dict[str, type[Objective]] = {
    "wav2vec2": Wav2Vec2Objective,
    "hubert": HubertObjective,
    "wavlm": WavLMObjective,
    "bestrq": BestRQObjective,
}


def _accepted(cls) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (Objective, nn.Module, object):
            break
        sig = inspect.signature(klass.__init__)
        names |= {p for p, v in sig.parameters.items() if p not in ("self", "encoder")
                  and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    return names


def build_objective(name: str, encoder: nn.Module, **kwargs) -> Objective:
    """Build objective ``name`` around ``encoder``; an unknown name or keyword is a ValueError naming it."""
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name), list(OBJECTIVES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown objective '{name}' (known: {', '.join(OBJECTIVES)}){hint}")
    cls = OBJECTIVES[name]
    ok = _accepted(cls)
    for k in kwargs:
        if k not in ok:
            close = difflib.get_close_matches(k, sorted(ok), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(ok))}"
            raise ValueError(f"objective '{name}' has no option '{k}'{hint}")
    return cls(encoder, **kwargs)
