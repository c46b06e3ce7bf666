"""The generic training engine, built on Hugging Face accelerate (CPU, one GPU, DDP over many; bf16/fp16).

Any model works as long as ``model(batch) -> (loss, logs)``: ``loss`` a scalar tensor already normalised per
sample (per masked frame, per utterance ...), ``logs`` a dict of floats (accuracies ...). Optional hooks:

- ``model.set_step(step)``: called before every update (temperature schedules, pruning warm-up ...).
- ``model.sample_size(batch) -> int | Tensor``: the count ``loss`` was normalised by (e.g. masked frames), read
  after the forward. When present, the gradient is renormalised by the count summed over gradient-accumulation
  micro-batches and over ranks, so 2 ranks x B give exactly the update of 1 rank x 2B (fairseq semantics).
  Without it every micro-batch and rank weighs the same.

Usage::

    trainer = Trainer(TrainerConfig(max_steps=1000), model, "exp/run", optim=OptimConfig(lr=5e-4),
                      schedule=ScheduleConfig(warmup_steps=100), make_train_loader=lambda: loader,
                      evaluate=lambda m: {"loss": ...}, best_metric="loss",
                      save_final=lambda m, d: export_pretrained(m.encoder, d, format="speechssl"))
    logs = trainer.fit(resume=True)

``make_train_loader()`` is called once, after the process group exists (so a Lhotse sampler sees its rank) and
returns an iterable of batches with optional ``set_epoch(e)``, ``state_dict()`` and ``load_state_dict(sd)``; the
state must count batches *consumed* by the trainer (not prefetched by workers) for an exact resume.

Outputs in ``out_dir``: ``metrics.jsonl`` (one line per ``log_every`` updates: step, split, loss, lr, grad_norm,
audio_sec_per_sec, mem_peak_mb and the model's logs; eval lines have ``"split": "valid"``), ``checkpoints/step-N/`` (atomic,
see ``speechssl.train.checkpoint``), ``final/`` through ``save_final``, TensorBoard events when enabled, and
``config.yaml`` when a ``run_config`` dataclass is given.

Nothing in ``out_dir`` changes before ``fit`` has checked what it resumes. A fresh run is refused when
``checkpoints/`` holds an earlier run's ``step-N``. ``--resume`` takes the newest complete checkpoint: an
incomplete one is reported and skipped (see ``speechssl.train.checkpoint``). The resume is refused when
``max_steps``, ``optim.lr`` or the schedule differ from the checkpoint's, unless
``trainer.allow_schedule_change`` is set, and when its weights do not fit the model. All of these raise
``ExperimentError``.

Layer-drop and DDP: layer-drop skips whole layers at random and independently on each rank, so some parameters
get no gradient on some ranks. We run DDP with ``find_unused_parameters=True`` (auto-enabled when a module
reports ``layerdrop > 0``): DDP then marks the skipped parameters ready and all-reduces zeros for them. The
alternative (always running layers and scaling their output by zero) would spend the compute layer-drop saves.

FSDP (``trainer.distributed_strategy: fsdp``, 2+ processes): torch FSDP2 ``fully_shard`` on every transformer layer
(each element of a ``layers`` ModuleList) and then on the whole model, so parameters, gradients and optimiser
state are split across ranks and a layer's weights are gathered only while it runs. Checkpoints hold full
(gathered) state dicts, written by rank 0 in the same files as with DDP, so ``--resume``, ``EXP/final`` and
evaluation work unchanged; rank 0 keeps an unsharded CPU copy of the model for ``save_final`` and ``evaluate``.
It runs on CPU (gloo) and GPU (NCCL). Layer-drop works because the trainer seeds each micro-batch's decisions
identically on every rank (``encoder.layerdrop_seed`` from seed, step and micro-batch), so all ranks skip the same
layers and their gathers match; models whose layer-drop cannot be seeded are refused. fp16 is not supported
with it (use bf16). With one process FSDP has nothing to shard and the model trains unwrapped (with the same
shared layer-drop decisions).

Non-finite loss or gradient: the update is skipped on every rank (the check uses all-reduced values so ranks
agree), counted and warned about; ``max_bad_steps`` skips in a row stop the run. With fp16, gradient overflows
are the GradScaler's business (it skips and lowers the scale) and do not count as bad steps.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from speechssl.config import ConfigError, ExperimentError, to_dict
from speechssl.train import checkpoint as ckpt_lib
from speechssl.train.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, default_param_groups

__all__ = ["TrainerConfig", "Trainer", "TrainingDiverged", "move_to_device", "batch_audio_seconds", "peak_memory_mb"]
log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    max_steps: int = 1000          # optimiser updates
    grad_accum: int = 1            # micro-batches per update
    clip_norm: float = 0.0         # max global gradient norm; 0 = no clipping (the norm is still logged)
    precision: str = "no"          # no | bf16 | fp16 (fp16 uses dynamic loss scaling)
    log_every: int = 10
    ckpt_every: int = 1000         # also saved at the last step
    eval_every: int = 0            # 0 = only at the end (when an evaluate callback is given)
    keep_last: int = 2             # checkpoints to keep (plus the best one)
    seed: int = 0
    num_workers: int = 2           # dataloader workers (read by the loader factories)
    max_bad_steps: int = 10        # consecutive non-finite steps before giving up
    tensorboard: bool = False
    device: str = "auto"           # auto | cpu | cuda
    ddp_find_unused: bool | None = None  # None = on when the model uses layer-drop
    sample_rate: int = 16000       # to count audio seconds from batch["audio_lens"]
    progress: bool = True          # tqdm bar on the main process
    ckpt_at_end: bool = True       # save a checkpoint after the last update (off for benchmarks / smoke runs)
    distributed_strategy: str = "ddp"  # ddp | fsdp (FSDP2 sharding per transformer layer; layer-drop shared across ranks; no fp16)
    # resume although max_steps, optim.lr or the schedule differ from the checkpoint's (the lr curve then changes
    # from the resumed step on); off, such a resume is refused (--allow-schedule-change sets it)
    allow_schedule_change: bool = False

    def validate(self) -> None:
        if self.precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"config key 'trainer.precision' must be no|bf16|fp16, got {self.precision!r}")
        if self.distributed_strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"config key 'trainer.distributed_strategy' must be ddp|fsdp, got "
                              f"{self.distributed_strategy!r}")
        if self.distributed_strategy == "fsdp" and self.precision == "fp16":
            raise ConfigError("config key 'trainer.precision' fp16 is not supported with "
                              "trainer.distributed_strategy=fsdp (its loss scaler would see only local gradient "
                              "shards): use bf16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"config key 'trainer.device' must be auto|cpu|cuda, got {self.device!r}")
        for k in ("max_steps", "grad_accum", "log_every", "ckpt_every", "max_bad_steps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"config key 'trainer.{k}' must be >= 1, got {getattr(self, k)}")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors in dicts/lists/tuples to ``device`` (other leaves untouched)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def batch_audio_seconds(batch: Any, sample_rate: int) -> float:
    """Seconds of (unpadded) audio in a batch dict with ``audio_lens`` [B]; 0 when unknown."""
    if isinstance(batch, dict) and isinstance(batch.get("audio_lens"), torch.Tensor):
        return float(batch["audio_lens"].sum()) / sample_rate
    return 0.0


def _describe_batch(batch: Any, sample_rate: int) -> str:
    if isinstance(batch, dict) and isinstance(batch.get("audio"), torch.Tensor):
        a = batch["audio"]
        ids = batch.get("cut_ids") or []
        return (f"{a.shape[0]} utterances, padded shape {tuple(a.shape)} = {a.shape[0] * a.shape[-1] / sample_rate:.1f}"
                f" s, {batch_audio_seconds(batch, sample_rate):.1f} s of speech, first cut {ids[0] if ids else '?'}")
    return f"batch of type {type(batch).__name__}"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on GPU, else the process's peak resident set size (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        return float("nan")


def _uses_layerdrop(model: nn.Module) -> bool:
    for m in model.modules():
        for ld in (getattr(m, "layerdrop", None), getattr(getattr(m, "config", None), "layerdrop", None)):
            if isinstance(ld, (int, float)) and not isinstance(ld, bool) and ld > 0:
                return True
    return False


def _layerdrop_seedable(model: nn.Module) -> bool:
    """Every module with layer-drop > 0 takes a shared ``layerdrop_seed`` (speechssl encoders do)."""
    for m in model.modules():
        for ld in (getattr(m, "layerdrop", None), getattr(getattr(m, "config", None), "layerdrop", None)):
            if isinstance(ld, (int, float)) and ld > 0 and not hasattr(m, "layerdrop_seed"):
                return False
    return True


def _set_layerdrop_seed(model: nn.Module, seed: int) -> None:
    for m in model.modules():
        if hasattr(m, "layerdrop_seed"):
            m.layerdrop_seed = seed % (2**63)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: every element of a ModuleList named ``layers`` (transformer layers)."""
    units = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            units.extend(m)
    return units


def _full_tensor(x):
    """A DTensor (FSDP gradient norm) as a plain tensor; anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def accelerate_state_conflicts(state: dict, precision: str, cpu: bool) -> bool:
    """Whether accelerate's per-process shared state (a dict; empty before the first Accelerator) was set up
    for another precision or another device type than a new Trainer asks for."""
    if not state:
        return False
    device = getattr(state.get("device"), "type", None)
    return state.get("_mixed_precision") != precision or (device is not None and (device == "cpu") != cpu)


def _is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or "out of memory" in str(e).lower()


class Trainer:
    """See the module docstring. ``fit(resume)`` trains to ``cfg.max_steps`` and returns the last logs."""

    def __init__(self, cfg: TrainerConfig, model: nn.Module, out_dir: str | os.PathLike, *,
                 optim: OptimConfig, schedule: ScheduleConfig,
                 make_train_loader: Callable[[], Any],
                 param_groups: Callable[[nn.Module], list[dict]] | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 best_metric: str | None = None, best_mode: str = "min",
                 save_final: Callable[[nn.Module, Path], None] | None = None,
                 run_config: Any = None):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.cfg, self.model, self.out_dir = cfg, model, Path(out_dir)
        self.optim_cfg, self.schedule_cfg = optim, schedule
        self.make_train_loader = make_train_loader
        self.param_groups = param_groups or (lambda m: default_param_groups(m, optim))
        self.evaluate, self.best_metric, self.best_mode = evaluate, best_metric, best_mode
        self.save_final, self.run_config = save_final, run_config
        self.ckpt_root = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        # mutable training state (saved in trainer_state.json)
        self.step = 0
        self.epoch = 0
        self.bad_steps = 0
        self.total_bad_steps = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.accelerator = None
        self.fsdp = False              # True once the model is sharded with FSDP2
        self._fsdp_copy: nn.Module | None = None  # rank 0's unsharded CPU copy (save_final, evaluate)

    # ------------------------------------------------------------------ set-up
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        cfg = self.cfg
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("config key 'trainer.device' is 'cuda' but no CUDA device is available")
        changed = accelerate_state_conflicts(AcceleratorState._shared_state, cfg.precision, cpu)
        if changed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one global state per process; a second Trainer with another precision or device
            # (tests, notebooks) may reset it when not distributed
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        find_unused = cfg.ddp_find_unused if cfg.ddp_find_unused is not None else _uses_layerdrop(self.model)
        log_with = None
        if cfg.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                try:
                    import tensorboardX  # noqa: F401
                except ImportError as e:
                    raise ConfigError("config key 'trainer.tensorboard' is true but neither tensorboard nor "
                                      "tensorboardX is installed (pip install tensorboard)") from e
            log_with = "tensorboard"
        return Accelerator(
            cpu=cpu, mixed_precision=cfg.precision, gradient_accumulation_steps=1,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.out_dir), logging_dir=str(self.out_dir / "tb")),
            step_scheduler_with_optimizer=False,
        )

    def _trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "bad_steps": self.bad_steps,
                "total_bad_steps": self.total_bad_steps, "best_value": self.best_value,
                "best_step": self.best_step, "best_metric": self.best_metric,
                "distributed_strategy": "fsdp" if self.fsdp else "ddp", "lr_schedule": self._lr_schedule()}

    def _lr_schedule(self) -> dict:
        """What fixes the learning-rate curve, as flat config keys: a resume compares it with the checkpoint's."""
        out = {"trainer.max_steps": self.cfg.max_steps, "optim.lr": self.optim_cfg.lr}
        out.update({f"schedule.{k}": v for k, v in to_dict(self.schedule_cfg).items()})
        return out

    def _schedule_changes(self, ckpt: Path) -> list[str]:
        """'key old -> new' for every lr-curve key that differs from the checkpoint's (none for checkpoints
        written before the curve was recorded)."""
        saved = ckpt_lib.load_trainer_state(ckpt).get("lr_schedule")
        if not isinstance(saved, dict):
            return []
        now = self._lr_schedule()
        return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)]

    def _resume_checkpoint(self, resume: bool, report: bool) -> Path | None:
        """The checkpoint to resume from, checked before anything is written: a fresh run never starts over an
        earlier run's checkpoints (they would count as newest, and keep_last would delete the new ones), a resume
        with only incomplete checkpoints is refused, and so is a changed lr curve unless allowed."""
        if not resume:
            if ckpt_lib.has_step_dirs(self.ckpt_root):
                raise ExperimentError(
                    f"{self.ckpt_root} holds checkpoints of an earlier run: resume it (--resume) or clear it "
                    "(--overwrite)")
            return None
        ckpt = ckpt_lib.latest_checkpoint(self.ckpt_root, report=report)
        if ckpt is None and ckpt_lib.has_step_dirs(self.ckpt_root):
            raise ExperimentError(
                f"--resume: no complete checkpoint in {self.ckpt_root} (the incomplete ones are listed above): "
                "move them away to start from scratch, or use --overwrite")
        if ckpt is None:
            if report:
                log.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt_root)
            return None
        changes = self._schedule_changes(ckpt)
        if changes and not self.cfg.allow_schedule_change:
            raise ExperimentError(
                f"--resume would change the learning-rate curve of {ckpt}: {'; '.join(changes)}; resume with the "
                "run's values, or pass --allow-schedule-change (trainer.allow_schedule_change=true) to continue "
                "on the new curve from this step")
        if changes and report:
            log.warning("resuming %s on a changed learning-rate curve: %s", ckpt, "; ".join(changes))
        return ckpt

    def _shard_fsdp(self, model: nn.Module) -> nn.Module:
        """FSDP2 per transformer layer, then the root; rank 0 first keeps an unsharded CPU copy."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        acc = self.accelerator
        if _uses_layerdrop(model) and not _layerdrop_seedable(model):
            raise ConfigError("trainer.distributed_strategy=fsdp cannot run this model's layer-drop: its modules "
                              "do not take a shared layerdrop_seed, so ranks would skip different layers and the "
                              "per-layer parameter gathers would not match; set layerdrop to 0 or use ddp")
        if acc.is_main_process:
            self._fsdp_copy = copy.deepcopy(model).cpu()
        model.to(acc.device)
        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        units = fsdp_units(model)
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        log.info("FSDP: %d transformer layers sharded over %d processes", len(units), acc.num_processes)
        self.fsdp = True
        return model

    def _full_model_state(self) -> dict:
        """The full model state dict on rank 0 (CPU tensors), {} elsewhere; every rank must call it (FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _plain_model(self) -> nn.Module:
        """An unsharded model holding the current weights: the model itself, or with FSDP rank 0's copy filled
        from the gathered state (call on every rank; only rank 0's result is usable)."""
        if not self.fsdp:
            return self.accelerator.unwrap_model(self.model)
        sd = self._full_model_state()
        if self._fsdp_copy is not None:
            self._fsdp_copy.load_state_dict(sd)
        return self._fsdp_copy

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Save the full training state at ``self.step`` atomically (all ranks must call this)."""
        acc = self.accelerator
        final = self.ckpt_root / f"step-{self.step}"
        tmp = ckpt_lib.tmp_dir_for(self.ckpt_root, self.step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        main = acc.is_main_process
        model_state = optim_state = None
        if self.fsdp:  # gather full state dicts (collectives on every rank); rank 0 writes them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            model_state = self._full_model_state()
            optim_state = get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        ckpt_lib.save_checkpoint_dir(
            tmp, model=acc.unwrap_model(self.model) if (main and not self.fsdp) else None,
            optimizer=self.optimizer.optimizer if (main and not self.fsdp) else None,
            model_state=model_state if main else None, optimizer_state=optim_state if main else None,
            scheduler=self.scheduler if main else None,
            scaler=acc.scaler if (main and acc.scaler is not None) else None,
            loader_state=loader_state, rank=acc.process_index,
        )
        acc.wait_for_everyone()
        if main:
            ckpt_lib.finalize_checkpoint(tmp, final, self._trainer_state())
            keep = {self.best_step} if self.best_step is not None else set()
            ckpt_lib.prune_checkpoints(self.ckpt_root, self.cfg.keep_last, keep)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, ckpt: Path) -> tuple[Any, dict]:
        """Restore model/optimiser/scheduler/scaler/trainer state; return (loader state, rng state) for later."""
        acc = self.accelerator
        st = ckpt_lib.load_trainer_state(ckpt)
        saved = st.get("distributed_strategy", "ddp")
        if self.fsdp and saved != "fsdp":
            # the optimiser state is keyed by position with DDP and by parameter name with FSDP
            raise RuntimeError(f"checkpoint {ckpt} was written with distributed_strategy=ddp and this run shards "
                               "with fsdp: resume with ddp, or start a new run from its weights (model.init_from)")
        if saved == "fsdp":  # full state dicts keyed by name: every rank reads them and keeps its own shards
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            target = self.model if self.fsdp else acc.unwrap_model(self.model)
            set_model_state_dict(target, ckpt_lib.load_file_checked(ckpt / "model.safetensors", load_file),
                                 options=opts)
            set_optimizer_state_dict(target, self.optimizer.optimizer,
                                     ckpt_lib.load_torch(ckpt / "optimizer.pt"), options=opts)
        else:
            ckpt_lib.load_model_weights(acc.unwrap_model(self.model), ckpt)
            self.optimizer.optimizer.load_state_dict(ckpt_lib.load_torch(ckpt / "optimizer.pt", acc.device))
        bases = list(self.scheduler.base_lrs)  # this config's peak lrs; loading puts the checkpoint's back
        self.scheduler.load_state_dict(ckpt_lib.load_torch(ckpt / "scheduler.pt"))
        if self.cfg.allow_schedule_change:
            self._follow_new_schedule(bases)
        if acc.scaler is not None and (ckpt / "scaler.pt").is_file():
            acc.scaler.load_state_dict(ckpt_lib.load_torch(ckpt / "scaler.pt"))
        self.step, self.epoch = int(st["step"]), int(st["epoch"])
        self.bad_steps, self.total_bad_steps = int(st.get("bad_steps", 0)), int(st.get("total_bad_steps", 0))
        self.best_value, self.best_step = st.get("best_value"), st.get("best_step")
        rank = acc.process_index
        loader_path = ckpt / f"loader-{rank}.pt"
        loader_state = ckpt_lib.load_torch(loader_path) if loader_path.is_file() else None
        if loader_state is None and (ckpt / "loader-0.pt").is_file():  # never silently restart the epoch
            log.warning("checkpoint %s has no loader state for rank %d (world size changed?): that rank starts "
                        "its epoch %d over", ckpt, rank, self.epoch)
        rng_path = ckpt / f"rng-{rank}.pt"
        if not rng_path.is_file():  # resumed with more ranks than saved: reuse rank 0's and offset nothing
            log.warning("checkpoint %s has no RNG state for rank %d (world size changed?)", ckpt, rank)
            rng_path = ckpt / "rng-0.pt"
        return loader_state, ckpt_lib.load_torch(rng_path)

    def _follow_new_schedule(self, bases: list[float]) -> None:
        """After a resume allowed to change the lr curve: this config's peak lrs and curve from the resumed step on
        (the scheduler's lambdas are this config's already; its base lrs and the current lr came from the file)."""
        sched = self.scheduler
        sched.base_lrs = list(bases)
        for group, base, fn in zip(self.optimizer.param_groups, bases, sched.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _truncate_metrics(self) -> None:
        """After a resume, drop metric lines logged after the checkpoint so the file reads as one run."""
        if not self.metrics_path.is_file():
            return
        keep = []
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
        from speechssl.utils.io import atomic_write_text

        atomic_write_text(self.metrics_path, "".join(keep))

    # ------------------------------------------------------------------- loop
    def _next_batch(self):
        try:
            return next(self._iter)
        except StopIteration:
            pass
        self.epoch += 1
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            raise RuntimeError(
                f"the training loader yielded no batch in epoch {self.epoch}: is the manifest empty, or are all "
                "cuts longer than data.max_duration?") from None

    def _forward_backward(self, batch, sync: bool) -> tuple[float, float, float, dict]:
        """One micro-batch. Returns (loss * weight, weight, audio seconds, logs * weight)."""
        acc, model = self.accelerator, self.model
        unwrapped = acc.unwrap_model(model)
        if self.fsdp:  # FSDP2: skip the reduce-scatter on accumulation micro-batches
            model.set_requires_gradient_sync(sync)
            ctx = contextlib.nullcontext()
        else:
            ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
        try:
            with ctx:
                with acc.autocast():
                    loss, logs = model(batch)
                size_fn = getattr(unwrapped, "sample_size", None)
                if size_fn is not None:
                    w = size_fn(batch)
                    w = float(w.detach().sum()) if isinstance(w, torch.Tensor) else float(w)
                    # unnormalise; the gradient is divided by the global count in _update
                    acc.backward(loss.float() * w)
                else:
                    w = 1.0
                    acc.backward(loss.float() / self.cfg.grad_accum)
        except Exception as e:
            if _is_oom(e):
                raise RuntimeError(
                    f"out of memory at step {self.step} on a batch of {_describe_batch(batch, self.cfg.sample_rate)}"
                    f"; lower data.max_duration or use trainer.grad_accum / trainer.precision=bf16") from e
            raise
        lv = float(loss.detach().float())
        wlogs = {}
        for k, v in (logs or {}).items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    continue
                v = float(v.detach().float())
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                wlogs[k] = float(v) * w
        return lv * w, w, batch_audio_seconds(batch, self.cfg.sample_rate), wlogs

    def _train_step(self) -> dict | None:
        """One optimiser update over ``grad_accum`` micro-batches; None when the update was skipped."""
        acc, cfg = self.accelerator, self.cfg
        unwrapped = acc.unwrap_model(self.model)
        if hasattr(unwrapped, "set_step"):
            unwrapped.set_step(self.step)
        loss_sum = weight_sum = audio = 0.0
        logs_sum: dict[str, float] = {}
        for i in range(cfg.grad_accum):
            if cfg.distributed_strategy == "fsdp":
                # same layer-drop decisions on every rank, derived from (seed, step, micro-batch): exact on resume
                _set_layerdrop_seed(unwrapped, (cfg.seed * 1_000_003 + self.step) * 64 + i)
            batch = move_to_device(self._next_batch(), acc.device)
            lw, w, sec, wlogs = self._forward_backward(batch, sync=i == cfg.grad_accum - 1)
            loss_sum += lw
            weight_sum += w
            audio += sec
            for k, v in wlogs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + v
        keys = sorted(logs_sum)
        vec = torch.tensor([loss_sum, weight_sum, audio] + [logs_sum[k] for k in keys], dtype=torch.float64,
                           device=acc.device)
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="sum")
        loss_sum, weight_sum, audio = vec[0].item(), vec[1].item(), vec[2].item()
        has_size = hasattr(unwrapped, "sample_size")
        # gradients: with sample_size, DDP averaged sum_m loss*w over ranks -> rescale to sum / global count
        acc.unscale_gradients(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if has_size:
            scale = acc.num_processes / weight_sum if weight_sum > 0 else float("nan")
            for p in params:
                p.grad.mul_(scale)
        max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
        grad_norm = float(_full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))) if params else 0.0
        denom = weight_sum if has_size else cfg.grad_accum * acc.num_processes
        loss = loss_sum / denom if denom > 0 else float("nan")
        if not math.isfinite(grad_norm) and acc.scaler is not None and math.isfinite(loss):
            self.optimizer.step()  # the GradScaler sees inf, skips the update and lowers the scale
            self.optimizer.zero_grad(set_to_none=True)
            log.info("fp16 gradient overflow at step %d: loss scale lowered to %s", self.step, acc.scaler.get_scale())
            return None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if acc.scaler is not None:
                acc.scaler.update()  # close this iteration's unscale_ bookkeeping
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.total_bad_steps += 1
            log.warning("non-finite %s at step %d (loss %s, grad norm %s): update skipped (%d in a row, %d total)",
                        "loss" if not math.isfinite(loss) else "gradient", self.step, loss, grad_norm,
                        self.bad_steps, self.total_bad_steps)
            if self.bad_steps >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_steps} consecutive non-finite steps at step {self.step} (trainer.max_bad_steps="
                    f"{cfg.max_bad_steps}); lower optim.lr, raise schedule.warmup_steps, set trainer.clip_norm or "
                    "use trainer.precision=bf16 instead of fp16")
            return None
        self.optimizer.step()
        skipped = getattr(self.optimizer, "step_was_skipped", False)
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            return None
        self.scheduler.step()
        self.bad_steps = 0
        self.step += 1
        out = {"loss": loss, "grad_norm": grad_norm, "audio_sec": audio}
        for i, k in enumerate(keys):
            out[k] = vec[3 + i].item() / denom if k != "loss" else loss
        return out

    def _run_eval(self) -> dict[str, float]:
        acc = self.accelerator
        result: dict[str, float] = {}
        plain = self._plain_model() if self.evaluate is not None else None  # FSDP: a gather on every rank
        if self.evaluate is not None and acc.is_main_process:
            model = plain
            if self.fsdp:
                model.to(acc.device)
            was_training = model.training
            model.eval()
            # forked RNG: evaluation (masks, crops) must not shift the training streams (exact resume, DDP)
            devices = [acc.device] if acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad(), acc.autocast():
                result = {k: float(v) for k, v in self.evaluate(model).items()}
            model.train(was_training)
            if self.fsdp:
                model.cpu()
            rec = {"step": self.step, "split": "valid", **result}
            from speechssl.utils.io import append_jsonl

            append_jsonl(self.metrics_path, rec)
            if self.cfg.tensorboard:
                acc.log({f"valid/{k}": v for k, v in result.items()}, step=self.step)
        acc.wait_for_everyone()
        return result

    def _is_better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if self.best_mode == "min" else value > self.best_value

    def fit(self, resume: bool = False) -> dict:
        """Train until ``cfg.max_steps`` updates; with ``resume`` continue from the newest checkpoint."""
        from tqdm.auto import tqdm

        from speechssl.utils.io import append_jsonl

        cfg = self.cfg
        acc = self.accelerator = self._make_accelerator()
        main = acc.is_main_process
        acc.wait_for_everyone()  # rank 0 has cleared an --overwrite directory before any rank looks into it
        # everything is validated (the checkpoint, its lr curve, its weights) before anything is written
        ckpt = self._resume_checkpoint(resume, report=main)
        # distinct dropout/masking streams per rank; the model itself was built by the caller (DDP syncs it)
        from accelerate.utils import set_seed

        set_seed(cfg.seed + acc.process_index)
        model = self.model
        use_fsdp = cfg.distributed_strategy == "fsdp" and acc.num_processes > 1
        if cfg.distributed_strategy == "fsdp" and not use_fsdp:
            log.info("trainer.distributed_strategy=fsdp with one process: nothing to shard, training unwrapped")
        if use_fsdp:
            model = self._shard_fsdp(model)  # before the optimiser: it must hold the sharded parameters
        groups = self.param_groups(model)
        optimizer = build_optimizer(groups, self.optim_cfg)
        self.scheduler = build_scheduler(optimizer, self.schedule_cfg, cfg.max_steps)
        if use_fsdp:  # accelerate would wrap the model in DDP: it only gets the optimiser
            self.model, self.optimizer = model, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)

        loader_state = rng_state = None
        if ckpt is not None:
            loader_state, rng_state = self._load_checkpoint(ckpt)
        if main:  # all checks passed: now the directory may change
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt_lib.clean_tmp(self.ckpt_root)
            if self.run_config is not None:
                from speechssl.config import save_config

                save_config(self.run_config, self.out_dir / "config.yaml")
            if ckpt is not None:
                log.info("resumed from %s (step %d, epoch %d)", ckpt, self.step, self.epoch)
                self._truncate_metrics()
            elif self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run in a directory that holds no earlier run
        acc.wait_for_everyone()
        if cfg.tensorboard:
            acc.init_trackers("tb")

        self.loader = self.make_train_loader()
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        if loader_state is not None:
            if hasattr(self.loader, "load_state_dict"):
                self.loader.load_state_dict(loader_state)
                if isinstance(loader_state, dict) and "epoch" in loader_state:
                    # ranks may be in different epochs (Shar: shards give ranks unequal batch counts); the
                    # trainer state holds rank 0's, the loader state this rank's
                    self.epoch = int(loader_state["epoch"])
            else:
                log.warning("the training loader cannot restore its position; the resumed epoch starts over")
        # the iterator is created before the RNG states are restored: creating a DataLoader iterator draws from
        # the torch RNG, which in the uninterrupted run happened before the checkpoint
        self._iter = iter(self.loader)
        if rng_state is not None:
            ckpt_lib.set_rng_state(rng_state)

        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (main and cfg.progress), dynamic_ncols=True,
                   desc="train", unit="step")
        agg: dict[str, float] = {}
        n_agg = 0
        audio_since = 0.0
        t_last = time.perf_counter()
        last_logs: dict[str, float] = {}
        eval_logs: dict[str, float] = {}
        while self.step < cfg.max_steps:
            out = self._train_step()
            if out is None:
                continue
            bar.update(1)
            audio_since += out.pop("audio_sec")
            for k, v in out.items():
                agg[k] = agg.get(k, 0.0) + v
            n_agg += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                now = time.perf_counter()
                rec = {"step": self.step, "split": "train", "epoch": self.epoch}
                rec.update({k: v / n_agg for k, v in agg.items()})
                rec["lr"] = self.scheduler.get_last_lr()[0]
                rec["audio_sec_per_sec"] = audio_since / max(1e-9, now - t_last)
                if acc.scaler is not None:
                    rec["loss_scale"] = float(acc.scaler.get_scale())
                rec["mem_peak_mb"] = peak_memory_mb(acc.device)
                if main:
                    append_jsonl(self.metrics_path, rec)
                    if cfg.tensorboard:
                        acc.log({f"train/{k}": v for k, v in rec.items() if k not in ("step", "split")},
                                step=self.step)
                    post = {"loss": f"{rec['loss']:.3f}"}
                    post.update({k: f"{v:.3f}" for k, v in rec.items() if k.startswith("acc")})
                    post["lr"] = f"{rec['lr']:.2e}"
                    post["sec/s"] = f"{rec['audio_sec_per_sec']:.1f}"
                    bar.set_postfix(post, refresh=False)
                last_logs = rec
                agg, n_agg, audio_since, t_last = {}, 0, 0.0, now
            is_last = self.step == cfg.max_steps
            force_ckpt = False
            if self.evaluate is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or is_last):
                eval_logs = self._run_eval()
                if main and self.best_metric is not None:
                    if self.best_metric not in eval_logs:
                        raise KeyError(f"best_metric {self.best_metric!r} is not among the evaluation results "
                                       f"{sorted(eval_logs)}")
                    if self._is_better(eval_logs[self.best_metric]):
                        self.best_value, self.best_step = eval_logs[self.best_metric], self.step
                        force_ckpt = True
                flag = torch.tensor([1 if force_ckpt else 0], device=acc.device)
                if acc.num_processes > 1:
                    flag = acc.reduce(flag, reduction="sum")
                force_ckpt = bool(flag.item())
            if force_ckpt or (is_last and cfg.ckpt_at_end) or self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
        bar.close()

        if self.save_final is not None:
            plain = self._plain_model()  # FSDP: a gather on every rank
            if main:
                final = self.out_dir / "final"
                tmp = self.out_dir / ".tmp-final"
                shutil.rmtree(tmp, ignore_errors=True)
                self.save_final(plain, tmp)
                old = self.out_dir / ".old-final"
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()
        if cfg.tensorboard:
            acc.end_training()
        result = dict(last_logs)
        result.update({f"valid_{k}": v for k, v in eval_logs.items()})
        result["bad_steps_total"] = self.total_bad_steps
        if self.best_step is not None:
            result["best_step"], result["best_value"] = self.best_step, self.best_value
        return result
