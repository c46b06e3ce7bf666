"""Compression: DistilHuBERT / layer-to-layer distillation, DPHuBERT structured pruning with HardConcrete gates,
materialisation of gated encoders into smaller dense ones, and profiling (params, MACs, real-time factor).

Modules: ``hardconcrete`` (gates), ``distill`` (students, losses, `speechssl distill`), ``prune`` (gate sets,
expected parameter count, Lagrangian, `speechssl prune`), ``materialize`` (gates -> dense encoder), ``profile``.
Names below are imported on first use so ``import speechssl.compress`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "HardConcrete": "hardconcrete",
    "distill_loss": "distill", "build_distilhubert_student": "distill", "HeadDistiller": "distill",
    "LayerDistiller": "distill", "DistillConfig": "distill", "run_distill": "distill", "load_teacher": "distill",
    "PruningGates": "prune", "PruneDistiller": "prune", "PruneConfig": "prune", "run_prune": "prune",
    "EncoderStructure": "prune", "param_count": "prune",
    "materialize": "materialize",
    "analytic_macs": "profile", "count_params": "profile", "measure_rtf": "profile", "profile_models": "profile",
    "format_table": "profile", "plot_structure": "profile",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
