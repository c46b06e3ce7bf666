"""FSDP2 for the Trainer (``trainer.distributed_strategy: fsdp``, 2+ processes): sharding and full state dicts.

``shard(model, runtime)`` applies torch's ``fully_shard`` to every transformer layer (each element of a
ModuleList named ``layers``) and then to the whole model, so parameters, gradients and optimiser state are split
across ranks and a layer's weights are gathered only while it runs. Checkpoints hold full (gathered) state dicts
keyed by name, written by rank 0 into the same files as with DDP, so ``--resume``, ``EXP/final`` and evaluation
work unchanged; ``load_full_state`` gives every rank its own shards back.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

from torch import nn

from speechssl.train import checkpoint as ckpt_lib

__all__ = ["fsdp_units", "shard", "full_model_state", "full_optimizer_state", "load_full_state", "full_tensor"]
log = logging.getLogger(__name__)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: every element of a ModuleList named ``layers`` (transformer layers)."""
    units = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            units.extend(m)
    return units


def full_tensor(x):
    """A DTensor (FSDP gradient norm) as a plain tensor; anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def shard(model: nn.Module, runtime) -> tuple[nn.Module, nn.Module | None]:
    """(the model sharded in place over ``runtime``'s ranks, rank 0's unsharded CPU copy taken first or None)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain = copy.deepcopy(model).cpu() if runtime.is_main else None
    model.to(runtime.device)
    mesh = init_device_mesh(runtime.device.type, (runtime.world,))
    units = fsdp_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    log.info("FSDP: %d transformer layers sharded over %d processes", len(units), runtime.world)
    return model, plain


def full_model_state(model: nn.Module) -> dict:
    """The full model state dict on rank 0 (CPU tensors), {} elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The full optimiser state dict keyed by parameter name on rank 0; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, ckpt: Path) -> None:
    """Load a checkpoint written with FSDP (full state dicts keyed by name) into ``model`` (sharded or not) and
    ``optimizer``; every rank reads the files and keeps its own shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt_lib.load_file_checked(ckpt / "model.safetensors", load_file), options=opts)
    set_optimizer_state_dict(model, optimizer, ckpt_lib.load_torch(ckpt / "optimizer.pt"), options=opts)
