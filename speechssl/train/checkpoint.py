"""Atomic, resumable training checkpoints: ``EXP/checkpoints/step-N/``.

A checkpoint directory holds::

    model.safetensors     the unwrapped model's state dict (safetensors; shared tensors de-duplicated)
    optimizer.pt          optimiser state dict           (torch.save, loaded with weights_only=True)
    scheduler.pt          lr scheduler state dict
    scaler.pt             fp16 GradScaler state (only with precision=fp16)
    loader-R.pt           data loader / sampler state of rank R (consumed batches, epoch)
    rng-R.pt              python, numpy, torch and cuda RNG states of rank R
    trainer_state.json    step, epoch, bad-step counter, best metric, max_steps and schedule
    manifest.json         every other file with its size in bytes (written last)

It is assembled in ``checkpoints/.tmp-step-N`` and renamed into place with ``os.replace``, so a run killed while
writing leaves the previous checkpoints untouched and at worst a stale ``.tmp-*`` folder (removed next time).
A checkpoint is complete or it is not a checkpoint: ``step-N`` counts only when its manifest is readable and every
file it lists is there with that size, so a file lost or cut short later (a full disk, a copy interrupted, a
hand edit) makes the directory incomplete; ``latest_checkpoint`` reports it by name, and any other entry that is
no checkpoint, and falls back to the previous complete one. Checkpoints written before manifests existed count
when their required files are there and ``model.safetensors`` is whole.
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
    "save_state_file", "scan_checkpoints", "checkpoint_problem", "safetensors_problem", "has_step_dirs",
    "MANIFEST", "resume_checkpoint", "schedule_changes", "truncate_metrics", "load_rank_states",
    "save_training_checkpoint",
]
log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
# what every checkpoint holds (the loader, scaler and other ranks' files are optional: the manifest lists them)
_REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt", "trainer_state.json")


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


def save_training_checkpoint(ckpt_root: Path, step: int, runtime, *, trainer_state: dict, keep_last: int,
                             keep: set[int], scheduler, loader, model: nn.Module | None = None, optimizer=None,
                             model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """``ckpt_root/step-N`` written atomically by every rank of ``runtime`` (all must call it): each rank its loader
    and RNG state, the main rank the model (``model``, unwrapped, or a gathered ``model_state``), the optimiser
    (likewise), scheduler, fp16 scaler and ``trainer_state``; then older checkpoints beyond ``keep_last`` go,
    except the steps in ``keep``."""
    main = runtime.is_main
    final, tmp = Path(ckpt_root) / f"step-{step}", tmp_dir_for(ckpt_root, step)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    scaler = runtime.acc.scaler
    save_checkpoint_dir(
        tmp, model=model if main else None, optimizer=optimizer if main else None,
        model_state=model_state if main else None, optimizer_state=optimizer_state if main else None,
        scheduler=scheduler if main else None, scaler=scaler if main else None, rank=runtime.rank,
        loader_state=loader.state_dict() if hasattr(loader, "state_dict") else None)
    runtime.barrier()
    if main:
        finalize_checkpoint(tmp, final, trainer_state)
        prune_checkpoints(ckpt_root, keep_last, keep)
    runtime.barrier()
    return final


def finalize_checkpoint(tmp: Path, final: Path, trainer_state: dict) -> None:
    """Write ``trainer_state.json`` last, fsync, and rename ``tmp`` onto ``final`` (replacing an older copy)."""
    with open(tmp / "trainer_state.json", "w") as f:
        json.dump(trainer_state, f, indent=2)
    for p in tmp.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    # the manifest goes last: a checkpoint without it, or whose files differ from it, is not a checkpoint
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
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


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (missing, truncated, a damaged header), or None when it is.
    Reads the header only: the file must be exactly 8 + header length + the end of the last tensor's data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return f"{path} is truncated ({size} bytes; its header alone needs {8 + n})"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError, UnicodeDecodeError) as e:  # ValueError: a header that is not JSON
        return f"{path} has a damaged header ({type(e).__name__})"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return f"{path} has a damaged header (no tensor offsets)"
    if size != 8 + n + end:
        return f"{path} is truncated ({size} bytes; its header describes {8 + n + end})"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why directory ``ckpt`` is not a complete checkpoint, or None when it is (see the module docstring)."""
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        if not (ckpt / "trainer_state.json").is_file():
            return "incomplete: no manifest.json (killed while it was written, or not a checkpoint)"
        # written before manifests existed: the required files must be there and the weights whole
        missing = [f for f in _REQUIRED if not (ckpt / f).is_file()]
        if missing:
            return f"incomplete: {', '.join(missing)} missing"
        return safetensors_problem(ckpt / "model.safetensors")
    try:
        files = json.loads(manifest.read_text())["files"]
        files = {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "incomplete: manifest.json is unreadable"
    problems = []
    for name, size in files.items():
        p = ckpt / name
        if not p.is_file():
            problems.append(f"{name} missing")
        elif p.stat().st_size != size:
            problems.append(f"{name} is {p.stat().st_size} bytes, the manifest says {size}")
    problems += [f"{f} missing" for f in _REQUIRED if f not in files and f"{f} missing" not in problems]
    return "incomplete: " + "; ".join(problems) if problems else None


def scan_checkpoints(ckpt_root: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """(complete checkpoints as (step, path) oldest first, one line per other entry of ``ckpt_root``: an
    incomplete ``step-N`` or something that is no checkpoint). Half-written ``.tmp-*`` / ``.old-*`` folders are
    expected after a kill and are not reported."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return [], []
    out, problems = [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith((".tmp-", ".old-")):
            continue
        m = _STEP_RE.match(p.name)
        if m is None or not p.is_dir():
            problems.append(f"{p}: not a checkpoint (expected step-N directories); ignored")
            continue
        why = checkpoint_problem(p)
        if why is None:
            out.append((int(m.group(1)), p))
        else:
            problems.append(f"{p}: {why}; skipped")
    return sorted(out), problems


def has_step_dirs(ckpt_root: Path) -> bool:
    """Whether ``ckpt_root`` holds any ``step-N`` entry, complete or not (an earlier run's)."""
    root = Path(ckpt_root)
    return root.is_dir() and any(_STEP_RE.match(p.name) for p in root.iterdir())


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    return scan_checkpoints(ckpt_root)[0]


def latest_checkpoint(ckpt_root: Path, report: bool = True) -> Path | None:
    """The newest complete checkpoint; with ``report`` every incomplete or unknown entry is logged as a warning
    (the run then resumes from an older checkpoint than the newest directory: the user must know)."""
    ckpts, problems = scan_checkpoints(ckpt_root)
    if report:
        for line in problems:
            log.warning("checkpoint %s", line)
        if problems and ckpts:
            log.warning("resuming from the newest complete checkpoint, %s", ckpts[-1][1])
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
    return load_file_checked(path, torch.load, map_location=map_location, weights_only=True)


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
    """Load ``ckpt/model.safetensors`` into ``model``; a damaged file or weights of another architecture raise
    ExperimentError (one line at the command line) naming the checkpoint and the differences."""
    from safetensors.torch import load_model

    from speechssl.config import ExperimentError

    path = Path(ckpt) / "model.safetensors"
    why = safetensors_problem(path)
    if why is not None:
        raise ExperimentError(f"checkpoint file {why}: move {ckpt} away to resume from the previous checkpoint")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)  # handles tied (de-duplicated) weights
        shapes = []
    except RuntimeError as e:  # torch's "size mismatch for KEY: copying a param with shape ..." lines
        missing, unexpected = [], []
        shapes = [x.strip() for x in str(e).splitlines() if "size mismatch" in x]
        if not shapes:
            raise
    if shapes or (strict and (missing or unexpected)):
        raise ExperimentError(
            f"checkpoint {ckpt} does not match the model built from this config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}{', ' + '; '.join(shapes[:2]) if shapes else ''}): resume with "
            "the config the run was started with (its config.yaml), or start a new --out")


def load_file_checked(path: Path, loader, *args, **kwargs):
    """``loader(path, ...)`` with an unreadable file (damaged after its checkpoint was complete) reported as
    ExperimentError naming the file, instead of a library traceback that names none."""
    from speechssl.config import ExperimentError

    try:
        return loader(str(path), *args, **kwargs)
    except Exception as e:  # safetensors, zip (torch.save) and pickle-free loaders raise many types
        if isinstance(e, ExperimentError):
            raise
        raise ExperimentError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {str(e)[:120]}): it is "
                              f"damaged; move {Path(path).parent} away to resume from the previous "
                              "checkpoint") from e


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


# ------------------------------------------------------------------------------------------- resuming a run
def schedule_changes(ckpt: Path, now: dict) -> list[str]:
    """'key old -> new' for every learning-rate-curve key (flat config keys, ``now``) that differs from the
    checkpoint's record (none for checkpoints written before the curve was recorded)."""
    saved = load_trainer_state(ckpt).get("lr_schedule")
    if not isinstance(saved, dict):
        return []
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def resume_checkpoint(ckpt_root: Path, resume: bool, *, lr_schedule: dict, allow_schedule_change: bool,
                      report: bool) -> Path | None:
    """The checkpoint a run continues from, checked before anything is written (ExperimentError otherwise).

    A fresh run never starts over an earlier run's checkpoints (they would count as newest, and keep_last would
    delete the new ones); a resume with only incomplete checkpoints is refused, and so is one whose learning-rate
    curve (``lr_schedule``) differs from the checkpoint's unless ``allow_schedule_change``."""
    from speechssl.config import ExperimentError

    if not resume:
        if has_step_dirs(ckpt_root):
            raise ExperimentError(f"{ckpt_root} holds checkpoints of an earlier run: resume it (--resume) or clear "
                                  "it (--overwrite)")
        return None
    ckpt = latest_checkpoint(ckpt_root, report=report)
    if ckpt is None and has_step_dirs(ckpt_root):
        raise ExperimentError(f"--resume: no complete checkpoint in {ckpt_root} (the incomplete ones are listed "
                              "above): move them away to start from scratch, or use --overwrite")
    if ckpt is None:
        if report:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_root)
        return None
    changes = schedule_changes(ckpt, lr_schedule)
    if changes and not allow_schedule_change:
        raise ExperimentError(
            f"--resume would change the learning-rate curve of {ckpt}: {'; '.join(changes)}; resume with the run's "
            "values, or pass --allow-schedule-change (trainer.allow_schedule_change=true) to continue on the new "
            "curve from this step")
    if changes and report:
        log.warning("resuming %s on a changed learning-rate curve: %s", ckpt, "; ".join(changes))
    return ckpt


def load_rank_states(ckpt: Path, rank: int, epoch: int) -> tuple[Any, dict]:
    """(loader state or None, RNG state) of ``rank``; a rank the checkpoint does not know (more ranks than saved)
    is warned about, starts its epoch over and takes rank 0's RNG state."""
    loader_path = ckpt / f"loader-{rank}.pt"
    loader_state = load_torch(loader_path) if loader_path.is_file() else None
    if loader_state is None and (ckpt / "loader-0.pt").is_file():  # never silently restart the epoch
        log.warning("checkpoint %s has no loader state for rank %d (world size changed?): that rank starts its "
                    "epoch %d over", ckpt, rank, epoch)
    rng_path = ckpt / f"rng-{rank}.pt"
    if not rng_path.is_file():
        log.warning("checkpoint %s has no RNG state for rank %d (world size changed?)", ckpt, rank)
        rng_path = ckpt / "rng-0.pt"
    return loader_state, load_torch(rng_path)


def truncate_metrics(metrics_path: Path, step: int) -> None:
    """After a resume from ``step``, drop the metric lines logged after it so the file reads as one run."""
    if not metrics_path.is_file():
        return
    keep = []
    with open(metrics_path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    from speechssl.utils.io import atomic_write_text

    atomic_write_text(metrics_path, "".join(keep))
