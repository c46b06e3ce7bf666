"""The generic training engine (CPU, one GPU, DDP or FSDP over many; fp32, bf16 or fp16), on ``Runtime``.

A model works with it when ``model(batch)`` returns a ``StepOutput(loss, logs, sample_size)`` and it declares the
optional hooks it offers (``set_step``, ``set_layerdrop_seed``): the contract, with its gradient semantics, is
``speechssl.train.contract``; the Trainer checks the declaration when it is built.

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
audio_sec_per_sec, mem_peak_mb and the model's logs; eval lines have ``"split": "valid"``), ``checkpoints/step-N/``
(atomic, see ``speechssl.train.checkpoint``), ``final/`` through ``save_final``, TensorBoard events under ``tb/``
and ``config.yaml`` when a ``run_config`` dataclass is given. Nothing there changes before ``fit`` has checked
what it resumes (``checkpoint.resume_checkpoint``: earlier runs, incomplete checkpoints, a changed lr curve and
weights that do not fit all raise ``ExperimentError``).

Layer-drop skips layers independently on each rank, so DDP runs with ``find_unused_parameters`` when a module's
config has ``layerdrop > 0``. FSDP (``trainer.distributed_strategy: fsdp``, 2+ processes; ``speechssl.train.fsdp``)
shards every transformer layer; layer-drop then needs the model's ``shared_layerdrop`` capability, and fp16 is
refused. With one process FSDP has nothing to shard and the model trains unwrapped.

A non-finite loss or gradient skips the update on every rank (the check uses all-reduced values), counted and
warned about; ``max_bad_steps`` in a row stop the run. fp16 gradient overflows are the GradScaler's (it skips and
lowers the scale) and do not count.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from speechssl.config import ConfigError, save_config, to_dict
from speechssl.constants import SAMPLE_RATE
from speechssl.train import checkpoint as ckpt_lib
from speechssl.train.contract import StepSums, check_step_output, declared_capabilities
from speechssl.train.optim import (OptimConfig, ScheduleConfig, build_optimizer, build_scheduler,
                                   default_param_groups, follow_new_schedule)
from speechssl.train import fsdp
from speechssl.train.runtime import Runtime, is_oom, move_to_device, peak_memory_mb
from speechssl.utils.io import append_jsonl
from speechssl.utils.progress import progress_bar

__all__ = ["TrainerConfig", "Trainer", "TrainingDiverged", "batch_audio_seconds"]
log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    max_steps: int = 1000          # optimiser updates
    grad_accum: int = 1            # micro-batches per update
    clip_norm: float = 0.0         # max global gradient norm; 0 = no clipping (the norm is still logged)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: dynamic loss scaling, GPU only
    log_every: int = 10
    ckpt_every: int = 1000         # also saved at the last step
    eval_every: int = 0            # 0 = only at the end (when an evaluate callback is given)
    keep_last: int = 2             # checkpoints to keep (plus the best one)
    seed: int = 0
    num_workers: int = 2           # dataloader workers (read by the loader factories)
    max_bad_steps: int = 10        # consecutive non-finite steps before giving up
    tensorboard: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ddp_find_unused: bool | None = None  # None = on when the model uses layer-drop
    sample_rate: int = SAMPLE_RATE  # to count audio seconds from batch["audio_lens"]
    progress: bool = True          # progress bar on the main process
    ckpt_at_end: bool = True       # save a checkpoint after the last update (off for benchmarks / smoke runs)
    # FSDP2 sharding per transformer layer (layer-drop shared across ranks; no fp16)
    distributed_strategy: Literal["ddp", "fsdp"] = "ddp"
    # resume although max_steps, optim.lr or the schedule differ from the checkpoint's (the lr curve then changes
    # from the resumed step on); off, such a resume is refused (--allow-schedule-change sets it)
    allow_schedule_change: bool = False

    def validate(self) -> None:
        if self.distributed_strategy == "fsdp" and self.precision == "fp16":
            raise ConfigError("config key 'trainer.precision' fp16 is not supported with "
                              "trainer.distributed_strategy=fsdp (its loss scaler would see only local gradient "
                              "shards): use bf16")
        for k in ("max_steps", "grad_accum", "log_every", "ckpt_every", "max_bad_steps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"config key 'trainer.{k}' must be >= 1, got {getattr(self, k)}")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


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


def _uses_layerdrop(model: nn.Module) -> bool:
    """Whether any module (or its config) has layer-drop > 0."""
    for m in model.modules():
        for ld in (getattr(m, "layerdrop", None), getattr(getattr(m, "config", None), "layerdrop", None)):
            if isinstance(ld, (int, float)) and not isinstance(ld, bool) and ld > 0:
                return True
    return False


class _Meter:
    """Averages of the update records between two log lines, and the audio throughput over that time."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n, self.audio, self.t0 = 0, 0.0, time.perf_counter()

    def add(self, out: dict[str, float]) -> None:
        self.audio += out.pop("audio_sec")
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def flush(self) -> tuple[dict[str, float], float]:
        """(averages, audio seconds per second) since the last flush; starts over."""
        now = time.perf_counter()
        avg = {k: v / self.n for k, v in self.sums.items()}
        rate = self.audio / max(1e-9, now - self.t0)
        self.__init__()
        return avg, rate


class Trainer:
    """See the module docstring. ``fit(resume)`` trains to ``cfg.max_steps`` and returns the last logs."""

    def __init__(self, cfg: TrainerConfig, model: nn.Module, out_dir: str | os.PathLike, *,
                 optim: OptimConfig, schedule: ScheduleConfig,
                 make_train_loader: Callable[[], Any],
                 param_groups: Callable[[nn.Module], list[dict]] | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 best_metric: str | None = None, best_mode: Literal["min", "max"] = "min",
                 save_final: Callable[[nn.Module, Path], None] | None = None,
                 run_config: Any = None):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.model_class = type(model)
        self.capabilities = declared_capabilities(self.model_class)
        if cfg.distributed_strategy == "fsdp" and _uses_layerdrop(model) \
                and "shared_layerdrop" not in self.capabilities:
            raise ConfigError(
                f"trainer.distributed_strategy=fsdp cannot run the layer-drop of {self.model_class.__name__}: it does "
                "not declare the 'shared_layerdrop' capability (set_layerdrop_seed), so ranks would skip different "
                "layers and the per-layer parameter gathers would not match; set layerdrop to 0 or use ddp")
        self.cfg, self.model, self.out_dir = cfg, model, Path(out_dir)
        self.optim_cfg, self.schedule_cfg = optim, schedule
        self.make_train_loader = make_train_loader
        self.param_groups = param_groups or (lambda m: default_param_groups(m, optim))
        self.evaluate, self.best_metric, self.best_mode = evaluate, best_metric, best_mode
        self.save_final, self.run_config = save_final, run_config
        self.ckpt_root = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        # mutable training state (saved in trainer_state.json)
        self.step = self.epoch = self.bad_steps = self.total_bad_steps = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.runtime: Runtime | None = None  # built by fit(), after the process group exists
        self.fsdp = False              # True once the model is sharded with FSDP2
        self._fsdp_copy: nn.Module | None = None  # rank 0's unsharded CPU copy (save_final, evaluate)

    # ------------------------------------------------------------------ set-up
    def _make_runtime(self) -> Runtime:
        cfg = self.cfg
        find_unused = cfg.ddp_find_unused if cfg.ddp_find_unused is not None else _uses_layerdrop(self.model)
        return Runtime(cfg.precision, cfg.device, config_key="trainer", find_unused_parameters=find_unused,
                       log_dir=self.out_dir / "tb" if cfg.tensorboard else None)

    def _unwrapped(self) -> nn.Module:
        return self.runtime.acc.unwrap_model(self.model)

    def _lr_schedule(self) -> dict:
        """What fixes the learning-rate curve, as flat config keys: a resume compares it with the checkpoint's."""
        out = {"trainer.max_steps": self.cfg.max_steps, "optim.lr": self.optim_cfg.lr}
        out.update({f"schedule.{k}": v for k, v in to_dict(self.schedule_cfg).items()})
        return out

    def _trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "bad_steps": self.bad_steps,
                "total_bad_steps": self.total_bad_steps, "best_value": self.best_value,
                "best_step": self.best_step, "best_metric": self.best_metric,
                "distributed_strategy": "fsdp" if self.fsdp else "ddp", "lr_schedule": self._lr_schedule()}

    def _build_optimisation(self) -> None:
        """Per-rank seeds, FSDP sharding, optimiser, scheduler and accelerate's wrapping."""
        from accelerate.utils import set_seed

        cfg, rt = self.cfg, self.runtime
        # distinct dropout/masking streams per rank; the model itself was built by the caller (DDP syncs it)
        set_seed(cfg.seed + rt.rank)
        model = self.model
        use_fsdp = cfg.distributed_strategy == "fsdp" and rt.world > 1
        if cfg.distributed_strategy == "fsdp" and not use_fsdp:
            log.info("trainer.distributed_strategy=fsdp with one process: nothing to shard, training unwrapped")
        if use_fsdp:  # before the optimiser: it must hold the sharded parameters
            model, self._fsdp_copy = fsdp.shard(model, rt)
            self.fsdp = True
        optimizer = build_optimizer(self.param_groups(model), self.optim_cfg)
        self.scheduler = build_scheduler(optimizer, self.schedule_cfg, cfg.max_steps)
        if use_fsdp:  # accelerate would wrap the model in DDP: it only gets the optimiser
            self.model, self.optimizer = model, rt.acc.prepare(optimizer)
        else:
            self.model, self.optimizer = rt.acc.prepare(model, optimizer)

    def _prepare_out_dir(self, ckpt: Path | None) -> None:
        """All checks passed: the main process writes config.yaml and makes metrics.jsonl read as one run."""
        if self.runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt_lib.clean_tmp(self.ckpt_root)
            if self.run_config is not None:
                save_config(self.run_config, self.out_dir / "config.yaml")
            if ckpt is not None:
                log.info("resumed from %s (step %d, epoch %d)", ckpt, self.step, self.epoch)
                ckpt_lib.truncate_metrics(self.metrics_path, self.step)
            elif self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run in a directory that holds no earlier run
        self.runtime.barrier()
        if self.cfg.tensorboard:
            self.runtime.acc.init_trackers("tb")

    def _start_loader(self, loader_state: Any, rng_state: dict | None) -> None:
        """Build the loader, put it at the checkpoint's position, then restore the RNG streams."""
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

    # --------------------------------------------------------------------- FSDP
    def _plain_model(self) -> nn.Module:
        """An unsharded model holding the current weights: the model itself, or with FSDP rank 0's copy filled
        from the gathered state (call on every rank; only rank 0's result is usable)."""
        if not self.fsdp:
            return self._unwrapped()
        sd = fsdp.full_model_state(self.model)
        if self._fsdp_copy is not None:
            self._fsdp_copy.load_state_dict(sd)
        return self._fsdp_copy

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Save the full training state at ``self.step`` atomically (all ranks must call this)."""
        if self.fsdp:  # gather full state dicts (collectives on every rank); rank 0 writes them
            weights = {"model_state": fsdp.full_model_state(self.model),
                       "optimizer_state": fsdp.full_optimizer_state(self.model, self.optimizer.optimizer)}
        else:
            weights = {"model": self._unwrapped(), "optimizer": self.optimizer.optimizer}
        return ckpt_lib.save_training_checkpoint(
            self.ckpt_root, self.step, self.runtime, trainer_state=self._trainer_state(), keep_last=self.cfg.keep_last,
            keep={self.best_step} if self.best_step is not None else set(), scheduler=self.scheduler,
            loader=self.loader, **weights)

    def _load_weights(self, ckpt: Path, saved_strategy: str) -> None:
        """Model and optimiser state: positional with DDP, full state dicts keyed by name with FSDP (every rank
        reads them and keeps its own shards)."""
        if self.fsdp and saved_strategy != "fsdp":
            raise RuntimeError(f"checkpoint {ckpt} was written with distributed_strategy=ddp and this run shards "
                               "with fsdp: resume with ddp, or start a new run from its weights (model.init_from)")
        if saved_strategy == "fsdp":
            fsdp.load_full_state(self.model if self.fsdp else self._unwrapped(), self.optimizer.optimizer, ckpt)
        else:
            ckpt_lib.load_model_weights(self._unwrapped(), ckpt)
            self.optimizer.optimizer.load_state_dict(ckpt_lib.load_torch(ckpt / "optimizer.pt", self.runtime.device))

    def _restore(self, ckpt: Path) -> tuple[Any, dict]:
        """Restore model/optimiser/scheduler/scaler/trainer state; return (loader state, rng state) for later."""
        st = ckpt_lib.load_trainer_state(ckpt)
        self._load_weights(ckpt, st.get("distributed_strategy", "ddp"))
        bases = list(self.scheduler.base_lrs)  # this config's peak lrs; loading puts the checkpoint's back
        self.scheduler.load_state_dict(ckpt_lib.load_torch(ckpt / "scheduler.pt"))
        if self.cfg.allow_schedule_change:
            follow_new_schedule(self.scheduler, self.optimizer, bases)
        scaler = self.runtime.acc.scaler
        if scaler is not None and (ckpt / "scaler.pt").is_file():
            scaler.load_state_dict(ckpt_lib.load_torch(ckpt / "scaler.pt"))
        self.step, self.epoch = int(st["step"]), int(st["epoch"])
        self.bad_steps, self.total_bad_steps = int(st.get("bad_steps", 0)), int(st.get("total_bad_steps", 0))
        self.best_value, self.best_step = st.get("best_value"), st.get("best_step")
        return ckpt_lib.load_rank_states(ckpt, self.runtime.rank, self.epoch)

    # -------------------------------------------------------------- one update
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

    def _forward_backward(self, batch, sync: bool, sums: StepSums) -> None:
        """One micro-batch: forward, backward (un-normalised by the sample size when there is one: the gradient
        is divided by the global count in ``_update``), its numbers added to ``sums``."""
        rt, model = self.runtime, self.model
        if self.fsdp:  # FSDP2: skip the reduce-scatter on accumulation micro-batches
            model.set_requires_gradient_sync(sync)
            ctx = contextlib.nullcontext()
        else:
            ctx = contextlib.nullcontext() if sync else rt.acc.no_sync(model)
        try:
            with ctx:
                with rt.autocast():
                    out = check_step_output(model(batch), self.model_class)
                size = out.weight()
                rt.backward(out.loss.float() * size if size is not None else out.loss.float() / self.cfg.grad_accum)
        except Exception as e:
            if is_oom(e):
                raise RuntimeError(
                    f"out of memory at step {self.step} on a batch of {_describe_batch(batch, self.cfg.sample_rate)}"
                    f"; lower data.max_duration or use trainer.grad_accum / trainer.precision=bf16") from e
            raise
        sums.add(float(out.loss.detach().float()), size, batch_audio_seconds(batch, self.cfg.sample_rate),
                 out.scalar_logs(), self.model_class.__name__)

    def _train_step(self) -> dict | None:
        """One optimiser update over ``grad_accum`` micro-batches; None when the update was skipped."""
        cfg = self.cfg
        if "step" in self.capabilities:
            self._unwrapped().set_step(self.step)
        shared_drop = cfg.distributed_strategy == "fsdp" and "shared_layerdrop" in self.capabilities
        sums = StepSums()
        for i in range(cfg.grad_accum):
            if shared_drop:
                # same layer-drop decisions on every rank, derived from (seed, step, micro-batch): exact on resume
                self._unwrapped().set_layerdrop_seed((cfg.seed * 1_000_003 + self.step) * 64 + i)
            batch = move_to_device(self._next_batch(), self.runtime.device)
            self._forward_backward(batch, i == cfg.grad_accum - 1, sums)
        return self._update(sums)

    def _update(self, sums: StepSums) -> dict | None:
        """Reduce the micro-batch sums over ranks, normalise and clip the gradient, step (or skip)."""
        rt, cfg = self.runtime, self.cfg
        keys = sorted(sums.logs)
        total = rt.sum([sums.loss, sums.weight, sums.audio] + [sums.logs[k] for k in keys])
        loss_sum, weight_sum, audio = total[:3]
        rt.acc.unscale_gradients(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if sums.sized:  # DDP averaged sum_m loss*w over ranks: rescale to the sum over the global count
            scale = rt.world / weight_sum if weight_sum > 0 else float("nan")
            for p in params:
                p.grad.mul_(scale)
        max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
        grad_norm = float(fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))) if params else 0.0
        denom = weight_sum if sums.sized else cfg.grad_accum * rt.world
        loss = loss_sum / denom if denom > 0 else float("nan")
        if self._skip_update(loss, grad_norm):
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
        out.update({k: total[3 + i] / denom for i, k in enumerate(keys) if k != "loss"})
        return out

    def _skip_update(self, loss: float, grad_norm: float) -> bool:
        """Skip a non-finite update (every rank sees the same reduced numbers): an fp16 overflow goes to the
        GradScaler, a non-finite loss or gradient is counted, and ``max_bad_steps`` in a row stop the run."""
        scaler = self.runtime.acc.scaler
        if not math.isfinite(grad_norm) and scaler is not None and math.isfinite(loss):
            self.optimizer.step()  # the GradScaler sees inf, skips the update and lowers the scale
            self.optimizer.zero_grad(set_to_none=True)
            log.info("fp16 gradient overflow at step %d: loss scale lowered to %s", self.step, scaler.get_scale())
            return True
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        if scaler is not None:
            scaler.update()  # close this iteration's unscale_ bookkeeping
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.total_bad_steps += 1
        log.warning("non-finite %s at step %d (loss %s, grad norm %s): update skipped (%d in a row, %d total)",
                    "loss" if not math.isfinite(loss) else "gradient", self.step, loss, grad_norm,
                    self.bad_steps, self.total_bad_steps)
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_steps} consecutive non-finite steps at step {self.step} (trainer.max_bad_steps="
                f"{self.cfg.max_bad_steps}); lower optim.lr, raise schedule.warmup_steps, set trainer.clip_norm or "
                "use trainer.precision=bf16 instead of fp16")
        return True

    # ------------------------------------------------------------ logs, evaluation
    def _log_train(self, meter: _Meter, bar) -> dict:
        """The averaged train record since the last one: to metrics.jsonl, TensorBoard and the bar."""
        rt = self.runtime
        avg, rate = meter.flush()
        rec = {"step": self.step, "split": "train", "epoch": self.epoch, **avg,
               "lr": self.scheduler.get_last_lr()[0], "audio_sec_per_sec": rate}
        if rt.acc.scaler is not None:
            rec["loss_scale"] = float(rt.acc.scaler.get_scale())
        rec["mem_peak_mb"] = peak_memory_mb(rt.device)
        if rt.is_main:
            append_jsonl(self.metrics_path, rec)
            if self.cfg.tensorboard:
                rt.acc.log({f"train/{k}": v for k, v in rec.items() if k not in ("step", "split")}, step=self.step)
            post = {"loss": f"{rec['loss']:.3f}"}
            post.update({k: f"{v:.3f}" for k, v in rec.items() if k.startswith("acc")})
            post["lr"], post["sec/s"] = f"{rec['lr']:.2e}", f"{rec['audio_sec_per_sec']:.1f}"
            bar.set_postfix(post, refresh=False)
        return rec

    def _run_eval(self) -> dict[str, float]:
        rt = self.runtime
        result: dict[str, float] = {}
        plain = self._plain_model()  # FSDP: a gather on every rank
        if rt.is_main:
            if self.fsdp:
                plain.to(rt.device)
            was_training = plain.training
            plain.eval()
            # forked RNG: evaluation (masks, crops) must not shift the training streams (exact resume, DDP)
            devices = [rt.device] if rt.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad(), rt.autocast():
                result = {k: float(v) for k, v in self.evaluate(plain).items()}
            plain.train(was_training)
            if self.fsdp:
                plain.cpu()
            append_jsonl(self.metrics_path, {"step": self.step, "split": "valid", **result})
            if self.cfg.tensorboard:
                rt.acc.log({f"valid/{k}": v for k, v in result.items()}, step=self.step)
        rt.barrier()
        return result

    def _is_new_best(self, eval_logs: dict[str, float]) -> bool:
        """Record a better ``best_metric`` (main process); True on every rank when it improved."""
        better = False
        if self.runtime.is_main and self.best_metric is not None:
            if self.best_metric not in eval_logs:
                raise KeyError(f"best_metric {self.best_metric!r} is not among the evaluation results "
                               f"{sorted(eval_logs)}")
            value = eval_logs[self.best_metric]
            if self.best_value is None or (value < self.best_value if self.best_mode == "min"
                                           else value > self.best_value):
                self.best_value, self.best_step, better = value, self.step, True
        return self.runtime.any(better)

    # ---------------------------------------------------------------------- fit
    def _loop(self) -> tuple[dict, dict]:
        """Updates until ``max_steps``, with logging, evaluation and checkpoints; (last train, last eval) logs."""
        cfg = self.cfg
        self.model.train()
        bar = progress_bar(total=cfg.max_steps, initial=self.step, disable=not (self.runtime.is_main and cfg.progress),
                           desc="train", unit="step")
        meter, last_logs, eval_logs = _Meter(), {}, {}
        while self.step < cfg.max_steps:
            out = self._train_step()
            if out is None:
                continue
            bar.update(1)
            meter.add(out)
            is_last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or is_last:
                last_logs = self._log_train(meter, bar)
            new_best = False
            if self.evaluate is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or is_last):
                eval_logs = self._run_eval()
                new_best = self._is_new_best(eval_logs)
            if new_best or (is_last and cfg.ckpt_at_end) or self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
        bar.close()
        return last_logs, eval_logs

    def _export_final(self) -> None:
        """``save_final`` into ``out_dir/final``, swapped in whole (a kill leaves the previous one)."""
        plain = self._plain_model()  # FSDP: a gather on every rank
        if self.runtime.is_main:
            final, tmp, old = self.out_dir / "final", self.out_dir / ".tmp-final", self.out_dir / ".old-final"
            shutil.rmtree(tmp, ignore_errors=True)
            self.save_final(plain, tmp)
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.runtime.barrier()

    def fit(self, resume: bool = False) -> dict:
        """Train until ``cfg.max_steps`` updates; with ``resume`` continue from the newest checkpoint."""
        rt = self.runtime = self._make_runtime()
        rt.barrier()  # rank 0 has cleared an --overwrite directory before any rank looks into it
        # everything is validated (the checkpoint, its lr curve, its weights) before anything is written
        ckpt = ckpt_lib.resume_checkpoint(self.ckpt_root, resume, lr_schedule=self._lr_schedule(),
                                          allow_schedule_change=self.cfg.allow_schedule_change, report=rt.is_main)
        self._build_optimisation()
        loader_state, rng_state = self._restore(ckpt) if ckpt is not None else (None, None)
        self._prepare_out_dir(ckpt)
        self._start_loader(loader_state, rng_state)
        last_logs, eval_logs = self._loop()
        if self.save_final is not None:
            self._export_final()
        if self.cfg.tensorboard:
            rt.acc.end_training()
        result = dict(last_logs)
        result.update({f"valid_{k}": v for k, v in eval_logs.items()})
        result["bad_steps_total"] = self.total_bad_steps
        if self.best_step is not None:
            result["best_step"], result["best_value"] = self.best_step, self.best_value
        return result
