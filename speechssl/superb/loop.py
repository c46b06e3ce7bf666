"""One SUPERB trial: a fresh featurizer + head (and any trainable upstream part) trained at one learning rate,
evaluated on dev every ``trainer.eval_every`` updates; the best-dev state is kept, saved and returned.

Steps of :func:`train_trial`: :func:`_new_trial` (seeded head, optimiser from ``optim`` with the trial's lr),
then per batch :func:`_update` (forward under autocast, a non-finite loss skipped on every rank alike, backward,
gradient average over ranks, clipping, optimiser step), :func:`_log_loss` and :func:`_evaluate_dev` at their
intervals, and :func:`_finish` (best state saved by rank 0, summary written).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn as nn

from speechssl.constants import SAMPLE_RATE
from speechssl.superb.cache import Example, FeatureSource
from speechssl.superb.data import bucket_batches, class_weights
from speechssl.superb.featurizer import Featurizer
from speechssl.superb.tasks import Task
from speechssl.superb.upstream import Upstream
from speechssl.train.optim import build_optimizer
from speechssl.train.runtime import Runtime
from speechssl.utils.io import append_jsonl, atomic_write, atomic_write_json
from speechssl.utils.progress import progress_bar

if TYPE_CHECKING:
    from speechssl.superb.train import SuperbConfig

__all__ = ["Downstream", "train_trial", "evaluate", "load_trial_state", "MAX_BAD_STEPS"]

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 10
"""Non-finite losses a trial skips before it stops with an error (the lr is too high)."""


class Downstream(nn.Module):
    """Featurizer + head: what every trial trains (with the upstream's trainable parameters, if any)."""

    def __init__(self, featurizer: Featurizer, head: nn.Module):
        super().__init__()
        self.featurizer, self.head = featurizer, head

    @classmethod
    def build(cls, task: Task, upstream: Upstream, layer: int | None, layer_norm: bool) -> "Downstream":
        return cls(Featurizer(upstream.num_states, layer, layer_norm),
                   task.build_head(upstream.hidden_size, upstream.downsample_rate))


def _trainable_state(model: Downstream, upstream: Upstream) -> dict[str, torch.Tensor]:
    """``downstream.*`` (featurizer and head) and the upstream's trainable ``upstream.*`` tensors, on the CPU."""
    state = {f"downstream.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if not upstream.frozen:
        trainable = {n for n, p in upstream.named_parameters() if p.requires_grad}
        for k, v in upstream.state_dict().items():
            if k in trainable:
                state[f"upstream.{k}"] = v.detach().cpu().clone()
    return state


def load_trial_state(model: Downstream, upstream: Upstream, state: dict[str, torch.Tensor]) -> None:
    """Load a trial's best state (``best.safetensors``) into a fresh downstream and upstream of the same config."""
    model.load_state_dict({k[len("downstream."):]: v for k, v in state.items() if k.startswith("downstream.")})
    up = {k[len("upstream."):]: v for k, v in state.items() if k.startswith("upstream.")}
    if up:
        missing = upstream.load_state_dict(up, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"checkpoint has unknown upstream keys {missing.unexpected_keys[:3]}")


def evaluate(task: Task, model: Downstream, source: FeatureSource, examples: Sequence[Example],
             max_samples: int, rt: Runtime | None = None, **context) -> dict:
    """Score ``examples`` (sorted, padded batches) with the model in eval mode. With several processes each rank
    predicts every ``world``-th batch and the outputs are gathered, in batch order, before scoring."""
    rt = rt or Runtime()
    model.eval()
    source.upstream.eval()
    batches = bucket_batches([e.num_samples for e in examples], max_samples)
    mine = []
    with torch.no_grad(), rt.autocast():
        for k in range(rt.rank, len(batches), rt.world):
            ex = [examples[i] for i in batches[k]]
            states, frames = source.states(ex)
            mine.append((k, task.predict(model.head, ex, model.featurizer(states), frames)))
    records = [r for _, recs in sorted(rt.gather(mine), key=lambda kr: kr[0]) for r in recs]
    return task.score(records, **context)


@dataclass
class _Trial:
    """A trial in progress: the model and optimiser, its random streams and what it has seen so far."""

    model: Downstream
    opt: torch.optim.Optimizer
    params: list[nn.Parameter]        # every trained parameter: head, featurizer, trainable upstream part
    rng: np.random.Generator          # batch lists: the same on every rank (each takes its share)
    crop_rng: np.random.Generator     # training crops: differ between ranks
    step: int = 0
    bad_steps: int = 0
    run_loss: float = 0.0
    n_loss: int = 0
    best: float | None = None
    best_step: int = 0
    best_state: dict | None = None
    best_scores: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _new_trial(task: Task, upstream: Upstream, cfg: "SuperbConfig", lr: float, rt: Runtime,
               device: torch.device) -> _Trial:
    """A seeded fresh head (the same on every rank) and its optimiser at learning rate ``lr``."""
    seed = cfg.trainer.seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Downstream.build(task, upstream, cfg.layer, cfg.layer_norm).to(device)
    crop_rng = rng
    if rt.world > 1:  # dropout, SpecAugment and crops differ between ranks
        torch.manual_seed(seed + 1000 * rt.rank)
        crop_rng = np.random.default_rng([seed, rt.rank])
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    up_params = [p for p in upstream.parameters() if p.requires_grad]
    if up_params:
        groups.append({"params": up_params, "lr_scale": cfg.sweep.upstream_lr_scale})
    opt = rt.acc.prepare_optimizer(build_optimizer(groups, dataclasses.replace(cfg.optim, lr=lr)))
    params = [p for g in groups for p in g["params"]]
    rt.broadcast_params(params)
    return _Trial(model, opt, params, rng, crop_rng)


def _update(t: _Trial, task: Task, source: FeatureSource, ex: list[Example], crop: int | None, clip_norm: float,
            rt: Runtime, lr: float) -> tuple[dict, float] | None:
    """One optimiser update on batch ``ex`` -> (the task's logs, gradient norm), or None when the loss was not
    finite on some rank (then no rank steps)."""
    t.model.train()
    source.upstream.train(True)
    with rt.autocast():
        states, frames = source.states(ex, crop_frames=crop, rng=t.crop_rng)
        loss, logs = task.loss(t.model.head, t.model.featurizer(states), frames, ex)
    t.opt.zero_grad(set_to_none=True)
    if not rt.all_finite(loss):
        t.bad_steps += 1
        log.warning("non-finite loss at step %d (batch %s); skipped", t.step, [e.id for e in ex[:3]])
        if t.bad_steps > MAX_BAD_STEPS:
            raise RuntimeError(f"more than {MAX_BAD_STEPS} non-finite losses at lr={lr}: lower optim.lr "
                               f"(or the sweep.lrs)")
        return None
    rt.backward(loss)
    rt.average_gradients(t.params)
    gnorm = rt.clip(t.params, clip_norm if clip_norm > 0 else float("inf"))
    t.opt.step()
    t.step += 1
    t.run_loss += float(loss.detach())
    t.n_loss += 1
    return logs, gnorm


def _log_loss(t: _Trial, logs: dict, gnorm: float, tag: dict, metrics_path: Path, rt: Runtime) -> None:
    """The mean loss since the last log line (over ranks), written by rank 0."""
    mean_loss = rt.mean(t.run_loss / t.n_loss)
    if rt.is_main:
        append_jsonl(metrics_path, {**tag, "step": t.step, "loss": mean_loss, "grad_norm": gnorm,
                                    **{k: v for k, v in logs.items() if k != "loss"}})
    t.run_loss, t.n_loss = 0.0, 0


def _evaluate_dev(t: _Trial, task: Task, source: FeatureSource, dev: Sequence[Example], max_samples: int,
                  dev_context: dict, tag: dict, metrics_path: Path, rt: Runtime) -> float:
    """Score dev, log it, keep the state when it is the best so far; returns the dev score."""
    scores = evaluate(task, t.model, source, dev, max_samples, rt, **dev_context)
    value = scores[task.metric]
    t.history.append({"step": t.step, task.metric: value})
    if rt.is_main:
        append_jsonl(metrics_path, {**tag, "step": t.step, "split": "dev",
                                    **{k: v for k, v in scores.items() if not isinstance(v, list)}})
    if task.better(value, t.best):
        t.best, t.best_step, t.best_state = value, t.step, _trainable_state(t.model, source.upstream)
        t.best_scores = scores
    return value


def _finish(t: _Trial, lr: float, out_dir: Path, tag: dict, rt: Runtime, t0: float) -> dict:
    """Save the best state (rank 0), load it back into the model, write and return the trial's summary."""
    from safetensors.torch import save_file

    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "best.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in t.best_state.items()}, tmp))
    t.model.load_state_dict({k[len("downstream."):]: v for k, v in t.best_state.items()
                             if k.startswith("downstream.")})
    summary = {**tag, "lr": lr, "best_dev": t.best, "best_step": t.best_step, "steps": t.step,
               "dev": dict(t.best_scores), "dev_history": t.history,
               "layer_weights": t.model.featurizer.layer_weights().tolist(),
               "train_s": round(time.perf_counter() - t0, 2)}
    if rt.is_main:
        atomic_write_json(out_dir / "summary.json", summary)
    rt.release()
    rt.barrier()  # the trial's files exist before any rank reads them (resume, test scoring)
    return summary


def train_trial(task: Task, source: FeatureSource, train: Sequence[Example], dev: Sequence[Example],
                cfg: "SuperbConfig", lr: float, out_dir: Path, tag: dict, dev_context: dict | None = None,
                metrics_path: Path | None = None, rt: Runtime | None = None
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train one head at learning rate ``lr`` for ``trainer.max_steps`` updates; returns (summary, best-dev
    state) and writes (rank 0) ``out_dir/best.safetensors`` and ``out_dir/summary.json``."""
    tc, d = cfg.trainer, cfg.data
    rt = rt or Runtime(tc.precision, tc.device, config_key="trainer")
    t = _new_trial(task, source.upstream, cfg, lr, rt, source.device)
    max_samples = int(d.max_duration * SAMPLE_RATE)
    weights = class_weights(train) if task.balanced else None
    crop = int(d.train_crop * SAMPLE_RATE / source.upstream.downsample_rate) if d.train_crop > 0 else None
    metrics_path = metrics_path or out_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    bar = progress_bar(total=tc.max_steps, desc=f"{task.name} lr={lr:g}", disable=not (tc.progress and rt.is_main),
                       leave=False)
    while t.step < tc.max_steps:
        batches = bucket_batches([e.num_samples for e in train], max_samples, d.num_buckets, t.rng, weights)
        for b in rt.shard(batches):
            if t.step >= tc.max_steps:
                break
            done = _update(t, task, source, [train[i] for i in b], crop, tc.clip_norm, rt, lr)
            if done is None:
                continue
            bar.update(1)
            last = t.step == tc.max_steps
            if t.step % tc.log_every == 0 or last:
                _log_loss(t, *done, tag, metrics_path, rt)
            if t.step % tc.eval_every == 0 or last:
                value = _evaluate_dev(t, task, source, dev, int(d.eval_max_duration * SAMPLE_RATE),
                                      dev_context or {}, tag, metrics_path, rt)
                bar.set_postfix({task.metric: f"{value:.4f}", "best": f"{t.best:.4f}"})
    bar.close()
    return _finish(t, lr, out_dir, tag, rt, t0), t.best_state
