"""Self-supervised objectives: each wraps an encoder and maps a batch to a ``StepOutput`` (loss, logs, sample size:
the model-to-trainer contract of ``speechssl.train.contract``).

An objective is one module in this package with one ``Objective`` subclass that sets ``name`` (the config's
``objective.name``): importing this package imports every module in it, which registers the class in
``OBJECTIVES``. ``build_objective(name, encoder, **kwargs)`` builds it; the keyword arguments are those of the
class (see each class's docstring), checked by name.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil

from torch import nn

from .base import OBJECTIVES, Objective
from .bestrq import BestRQObjective
from .hubert import HubertObjective
from .wav2vec2 import Wav2Vec2Objective
from .wavlm import WavLMObjective, utterance_mix

__all__ = ["Objective", "Wav2Vec2Objective", "HubertObjective", "WavLMObjective", "BestRQObjective",
           "OBJECTIVES", "build_objective", "objective_class", "utterance_mix"]

for _module in pkgutil.iter_modules(__path__):  # the rest register themselves on import
    importlib.import_module(f"{__name__}.{_module.name}")


def objective_class(name: str) -> type[Objective]:
    """The class registered as ``name``; an unknown name is a ValueError naming it and the closest known one."""
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name), list(OBJECTIVES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown objective '{name}' (known: {', '.join(sorted(OBJECTIVES))}){hint}")
    return OBJECTIVES[name]


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
    cls = objective_class(name)
    ok = _accepted(cls)
    for k in kwargs:
        if k not in ok:
            close = difflib.get_close_matches(k, sorted(ok), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(ok))}"
            raise ValueError(f"objective '{name}' has no option '{k}'{hint}")
    return cls(encoder, **kwargs)
