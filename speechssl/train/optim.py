"""Optimisers, weight-decay parameter groups and learning-rate schedules.

``OptimConfig`` and ``ScheduleConfig`` are plain dataclasses embedded in every training config (pretrain, distill,
prune, superb). Schedules are multiplicative factors on the peak ``optim.lr`` applied through ``LambdaLR``, so the
scheduler state is tiny and checkpoints exactly.

Example::

    groups = default_param_groups(model, OptimConfig(weight_decay=0.01))
    opt = build_optimizer(groups, OptimConfig(lr=5e-4))
    sched = build_scheduler(opt, ScheduleConfig(name="polynomial", warmup_steps=32000), total_steps=400000)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from speechssl.config import ConfigError

__all__ = [
    "OptimConfig", "ScheduleConfig", "default_param_groups", "build_optimizer", "build_scheduler", "lr_factor",
    "follow_new_schedule",
]

OptimizerName = Literal["adamw", "adam", "sgd"]
ScheduleName = Literal["polynomial", "linear", "tri_stage", "constant", "cosine"]


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"  # adamw | adam (coupled L2) | sgd; fairseq's "adam" decays decoupled = adamw
    lr: float = 5e-4               # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    momentum: float = 0.9          # sgd only
    # torch's fused Adam/AdamW kernel: one pass over each parameter instead of several (2-3x faster updates on CPU,
    # same math up to float rounding); off falls back to torch's default implementation
    fused: bool = True
    # parameters whose name contains one of these, and every 1-D parameter (biases, norms), get no weight decay
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "mask_emb", "masked_spec_embed"])
    # learning-rate multipliers by parameter-name prefix, e.g. {"encoder.feature_extractor": 0.1}
    lr_scale: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"config key 'optim.lr' must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"config key 'optim.betas' must have 2 items, got {self.betas}")


@dataclass
class ScheduleConfig:
    name: ScheduleName = "polynomial"  # polynomial | linear | tri_stage | constant | cosine
    warmup_steps: int = 0          # linear warm-up from 0 (polynomial/linear/cosine/constant)
    warmup_ratio: float = 0.0      # alternative to warmup_steps: fraction of total steps (used when steps == 0)
    total_steps: int | None = None  # defaults to trainer.max_steps
    power: float = 1.0             # polynomial decay exponent (1 = linear)
    end_lr_ratio: float = 0.0      # final lr / peak lr
    # tri-stage (wav2vec2 fine-tuning): warm-up, hold, exponential decay over these fractions of total steps
    phase_ratio: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.5])
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.05

    def validate(self) -> None:
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("config keys 'schedule.warmup_steps' >= 0 and 0 <= 'schedule.warmup_ratio' < 1")
        if self.name == "tri_stage" and (len(self.phase_ratio) != 3 or abs(sum(self.phase_ratio) - 1) > 1e-6):
            raise ConfigError(f"config key 'schedule.phase_ratio' must be 3 fractions summing to 1, got "
                              f"{self.phase_ratio}")


def default_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups, per ``lr_scale`` prefix.

    Each group dict has ``params``, ``weight_decay``, ``lr_scale`` (multiplier applied on top of the schedule)
    and ``names`` (for logging / debugging; ignored by torch optimisers as an extra key).
    """
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or any(s in name for s in cfg.no_decay)
        scale = 1.0
        for prefix, s in cfg.lr_scale.items():
            if name.startswith(prefix):
                scale = float(s)
        key = (no_wd, scale)
        g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_wd else cfg.weight_decay,
                                    "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def _fused_ok(groups: list[dict]) -> bool:
    """torch's fused Adam kernels need floating-point parameters on CPU or an accelerator (not meta)."""
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda", "xpu", "mps") for p in params)


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Instantiate the optimiser; each group's ``lr`` is ``cfg.lr * group['lr_scale']``."""
    groups = []
    for g in param_groups:
        g = dict(g)
        g.setdefault("lr_scale", 1.0)
        g["lr"] = cfg.lr * g["lr_scale"]
        g["initial_lr"] = g["lr"]
        groups.append(g)
    if cfg.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        kwargs = {"fused": True} if cfg.fused and _fused_ok(groups) else {}
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier on the peak lr at optimiser update ``step`` (0-based: the factor used for update ``step + 1``)."""
    total = max(1, cfg.total_steps or total_steps)
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    end = cfg.end_lr_ratio
    if cfg.name == "tri_stage":
        w, h = int(cfg.phase_ratio[0] * total), int(cfg.phase_ratio[1] * total)
        d = max(1, total - w - h)
        if step < w:
            return cfg.init_lr_scale + (1.0 - cfg.init_lr_scale) * step / max(1, w)
        if step < w + h:
            return 1.0
        t = min(step - w - h, d)
        return math.exp(math.log(cfg.final_lr_scale) * t / d)
    # fairseq counts updates from 1: the first update already uses lr * 1/warmup, never exactly 0
    s = step + 1
    if warmup > 0 and s <= warmup:
        return s / warmup
    if cfg.name == "constant":
        return 1.0
    if s >= total:
        return end
    frac = (s - warmup) / max(1, total - warmup)
    if cfg.name == "cosine":
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    power = 1.0 if cfg.name == "linear" else cfg.power
    return end + (1.0 - end) * (1.0 - frac) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``cfg``; call ``.step()`` once per successful optimiser update."""
    fn: Callable[[int], float] = lambda step: lr_factor(cfg, step, total_steps)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def follow_new_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer, bases: list[float]) -> None:
    """After a resume allowed to change the lr curve: this config's peak lrs ``bases`` and curve from the resumed
    step on (the scheduler's lambdas are this config's already; its base lrs and the current lr came from the
    checkpoint)."""
    scheduler.base_lrs = list(bases)
    for group, base, fn in zip(optimizer.param_groups, bases, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
