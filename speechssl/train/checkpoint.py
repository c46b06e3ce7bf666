"""Atomic, resumable training checkpoints: ``EXP/checkpoints/step-N/``.

A checkpoint directory holds::

    model.safetensors     the unwrapped model's state dict (safetensors; shared tensors de-duplicated)
    optimizer.pt          optimiser state dict           (torch.save, loaded with weights_only=True)
    scheduler.pt          lr scheduler state dict
    scaler.pt             fp16 GradScaler state (only with precision=fp16)
    loader-R.pt           data loader / sampler state of rank R (consumed batches, epoch)
    rng-R.pt              python, numpy, torch and cuda RNG states of rank R
    trainer_state.json    step, epoch, bad-step counter, best metric (written last)

It is assembled in ``checkpoints/.tmp-step-N`` and renamed into place with ``os.replace``, so a run killed while
writing leaves the previous checkpoints untouched and at worst a stale ``.tmp-*`` folder (removed next time).
Nothing is ever unpickled: tensors come back through safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "save_checkpoint_dir", "finalize_checkpoint", "list_checkpoints", "latest_checkpoint", "prune_checkpoints",
    "load_trainer_state", "load_model_weights", "load_torch", "get_rng_state", "set_rng_state", "clean_tmp",
    "save_state_file",
]
log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step-(\d+)$")


def tmp_dir_for(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f".tmp-step-{step}"


def save_checkpoint_dir(tmp: Path, *, model: nn.Module | None = None, optimizer=None, scheduler=None,
                        scaler=None, loader_state: Any = None, rank: int = 0, extra_files: dict | None = None,
                        model_state: dict | None = None, optimizer_state: dict | None = None) -> None:
    """Write this rank's parts of a checkpoint into ``tmp`` (the main rank passes model/optimiser/scheduler).

    ``model_state`` / ``optimizer_state`` are already gathered state dicts (FSDP full state dicts) used instead of
    ``model`` / ``optimizer``."""
    tmp.mkdir(parents=True, exist_ok=True)
    if model is not None:
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
    if model_state is not None:
        save_state_file(model_state, tmp / "model.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    if loader_state is not None:
        torch.save(loader_state, tmp / f"loader-{rank}.pt")
    torch.save(get_rng_state(), tmp / f"rng-{rank}.pt")
    for name, obj in (extra_files or {}).items():
        torch.save(obj, tmp / name)


def finalize_checkpoint(tmp: Path, final: Path, trainer_state: dict) -> None:
    """Write ``trainer_state.json`` last, fsync, and rename ``tmp`` onto ``final`` (replacing an older copy)."""
    with open(tmp / "trainer_state.json", "w") as f:
        json.dump(trainer_state, f, indent=2)
    for p in tmp.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same step saved again after a resume: move the old one away first
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    try:  # make the rename durable
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def clean_tmp(ckpt_root: Path) -> None:
    """Remove half-written ``.tmp-*`` / ``.old-*`` folders left by a killed run."""
    if Path(ckpt_root).is_dir():
        for p in Path(ckpt_root).iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep: set[int] = frozenset()) -> None:
    """Delete all but the ``keep_last`` newest checkpoints and the steps in ``keep`` (e.g. the best one)."""
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(ckpt_root)
    for step, path in ckpts[:-keep_last]:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load_torch(path: Path, map_location="cpu"):
    if isinstance(map_location, torch.device) and map_location.type == "cpu":
        map_location = "cpu"  # accelerate's multi-process CPU device is cpu:0, which torch.load cannot map to
    return torch.load(path, map_location=map_location, weights_only=True)


def load_trainer_state(ckpt: Path) -> dict:
    with open(Path(ckpt) / "trainer_state.json") as f:
        return json.load(f)


def save_state_file(state: dict, path: Path) -> None:
    """A state dict as safetensors; tensors that share memory (tied weights) are cloned first."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -id(v)
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    save_file(out, str(path))


def load_model_weights(model: nn.Module, ckpt: Path, strict: bool = True) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(Path(ckpt) / "model.safetensors"), strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def get_rng_state() -> dict:
    """Every RNG the training step may touch, as tensors/ints/lists only (safe for weights_only loading)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
