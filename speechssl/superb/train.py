"""The SUPERB task loop: data from manifests, upstream -> featurizer -> head training, dev selection, test scoring.

Protocol: duration-bucketed batches, gradient clipping, dev evaluation every ``optim.eval_every`` steps, the
best-dev checkpoint of each trial is kept; over a learning-rate sweep (``optim.lrs``) the rate with the best dev
score wins, and only the winner's best-dev checkpoints are scored on the test split(s). Test scores never take
part in any choice. With ``data.skip_bad`` (the default, as in pretraining) every utterance is decoded once
before training (the cache fill, when there is a cache) and the bad ones are dropped from every split, counted
by reason and listed in ``results.json`` (``skipped``), which also says how many test utterances were scored. Writes ``EXP/results.json``, ``EXP/metrics.jsonl``, ``EXP/config.yaml`` and per-trial
``EXP/trials/lr-LR[/fold-F]/{best.safetensors,summary.json}`` (``--resume`` reuses finished trials).

The loop stands on its own rather than on the generic pretraining trainer: its unit of work is a small head over
cached hidden states, trained many times per run (learning rates x folds). It uses accelerate (as the trainer does)
for mixed precision (``precision: bf16|fp16``) and for several processes (``accelerate launch`` / ``torchrun``):
every rank takes its share of each epoch's duration buckets and of the evaluation batches, gradients are averaged
over ranks after every backward, evaluation outputs are gathered so every rank computes the same dev score (and so
takes the same best-checkpoint decisions), and only rank 0 writes files. With one process and ``fp32`` it is plain
PyTorch on one device.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from speechssl.config import ConfigError, save_config
from speechssl.superb.cache import Example, FeatureSource, upstream_fingerprint
from speechssl.superb.data import SkipLog, bucket_batches, carve_dev, class_weights, load_examples
from speechssl.superb.featurizer import Featurizer
from speechssl.superb.tasks import (TASKS, DecodingConfig, HeadConfig, SpecAugConfig, Task, build_task, make_trials,
                                    read_trials)
from speechssl.superb.upstream import MODES, Upstream, build_upstream, is_random_spec
from speechssl.utils.io import append_jsonl, atomic_write, atomic_write_json

__all__ = ["SuperbConfig", "DataConfig", "OptimConfig", "CacheConfig", "AsvConfig", "Engine", "run_superb",
           "bucket_batches", "load_examples", "train_trial"]

log = logging.getLogger(__name__)
SR = 16000
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # config value -> accelerate's mixed_precision


@dataclass
class DataConfig:
    manifest_dir: str = "data/mini"   # holds cuts_SPLIT.jsonl.gz
    train_split: str = ""             # default: TASK_train
    dev_split: str = ""               # default: TASK_dev; "none" carves dev_fraction of the training utterances
    test_splits: list[str] = field(default_factory=list)  # default: [TASK_test]
    dev_fraction: float = 0.1
    trials: str = ""                  # ASV test trials file (lines `1|0 ENROLL TEST`)
    max_duration: float = 60.0        # seconds of audio per training batch (padded)
    eval_max_duration: float = 120.0
    num_buckets: int = 10
    train_crop: float = 0.0           # seconds; random training crops (SID: 8)
    min_duration: float = 0.0         # drop shorter training utterances (ASV: 2)
    max_utts: int = 0                 # use at most this many utterances per split (0 = all; quick checks)
    skip_bad: bool = True             # drop bad utterances (unreadable audio, no label), counted in results.json
    folds: list[int] = field(default_factory=list)  # cross-validation fold ids (IEMOCAP sessions 1..5)
    fold_field: str = "session"
    fold_splits: list[str] = field(default_factory=list)  # splits pooled for cross-validation


@dataclass
class OptimConfig:
    name: str = "adam"                # adam | adamw
    lr: float = 1e-4
    lrs: list[float] = field(default_factory=list)  # learning-rate sweep; empty = [lr]
    weight_decay: float = 0.0
    steps: int = 1000
    eval_every: int = 200
    log_every: int = 50
    grad_clip: float = 1.0
    upstream_lr_scale: float = 1.0    # lr multiplier for trainable upstream parameters (fine-tune, adapters, LoRA)


@dataclass
class CacheConfig:
    enabled: bool = True              # cache hidden states of a frozen upstream
    dir: str = ""                     # on-disk cache root ("" = memory only)
    memory: bool = True
    dtype: str = "float32"            # float32 (exact) | float16
    batch_seconds: float = 60.0


@dataclass
class AsvConfig:
    p_target: float = 0.01
    c_miss: float = 1.0
    c_fa: float = 1.0
    dev_trials: int = 2000


@dataclass
class SuperbConfig:
    task: str = "sid"                 # asr | pr | sid | asv | er | ks
    upstream: str = "fbank"           # fbank | mfcc | a model path for speechssl.load_pretrained |
                                      # random:PRESET_OR_MODEL (that architecture, fresh weights from seed)
    upstream_mode: str = "frozen"     # frozen | finetune | adapter | lora
    layer: int | None = None          # a single hidden state instead of the weighted sum
    layer_norm: bool = False
    adapter_dim: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)  # substrings of linear-layer names; empty = all
    tokenizer: str = "char"           # asr: char | bpe
    vocab_size: int = 300             # bpe
    balanced: bool | None = None      # class-balanced batches (default: KS only)
    head: HeadConfig = field(default_factory=HeadConfig)
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    asv: AsvConfig = field(default_factory=AsvConfig)
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"           # fp32 | bf16 | fp16 (autocast; fp16 with loss scaling, GPU only)
    num_threads: int = 0              # CPU threads while training heads (0 = leave torch's setting); small
                                      # heads run fastest on 1, extraction keeps the default
    progress: bool = True

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"config key 'task' must be one of {list(TASKS)}, got {self.task!r}")
        if self.upstream_mode not in MODES:
            raise ConfigError(f"config key 'upstream_mode' must be one of {list(MODES)}, got {self.upstream_mode!r}")
        if self.optim.name not in ("adam", "adamw"):
            raise ConfigError(f"config key 'optim.name' must be adam or adamw, got {self.optim.name!r}")
        if self.cache.dtype not in ("float32", "float16"):
            raise ConfigError(f"config key 'cache.dtype' must be float32 or float16, got {self.cache.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"config key 'precision' must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.optim.steps < 1 or self.optim.eval_every < 1:
            raise ConfigError("config keys 'optim.steps' and 'optim.eval_every' must be >= 1")


# ------------------------------------------------------------------------------------------- processes, precision


def _make_accelerator(mixed_precision: str, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # one global accelerate state per process (as in speechssl.train.trainer): a run with another precision
        # in the same process (tests, notebooks, several tasks) resets it when not distributed
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


class Engine:
    """Where and how the task loop runs: device, rank / world size, autocast, loss scaling, gradient averaging
    and gathering over ranks. One process in fp32 needs none of accelerate; otherwise it drives an Accelerator
    (started by ``accelerate launch`` or ``torchrun``: one process per device)."""

    def __init__(self, precision: str = "fp32", device: str = "auto"):
        if precision not in PRECISIONS:
            raise ConfigError(f"config key 'precision' must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.acc = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or precision != "fp32":
            if device not in ("auto", "cpu", "cuda"):
                raise ConfigError(f"config key 'device' must be auto, cpu or cuda with precision {precision} or "
                                  f"several processes (accelerate places each rank), got {device!r}")
            cpu = device == "cpu" or not torch.cuda.is_available()
            if precision == "fp16" and cpu:
                raise ConfigError("config key 'precision': fp16 needs a GPU; use bf16 on CPU")
            self.acc = _make_accelerator(PRECISIONS[precision], cpu)
            self.device, self.rank, self.world = self.acc.device, self.acc.process_index, self.acc.num_processes
        else:
            self.device, self.rank, self.world = _device(device), 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return self.acc.autocast() if self.acc is not None else contextlib.nullcontext()

    def prepare_optimizer(self, opt: torch.optim.Optimizer):
        """The optimiser as accelerate wraps it (fp16: steps skipped on overflow)."""
        return self.acc.prepare_optimizer(opt) if self.acc is not None else opt

    def release(self) -> None:
        """Drop accelerate's references to a finished trial's optimiser (a sweep trains many heads)."""
        if self.acc is not None:
            self.acc.free_memory()

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc is not None:
            self.acc.backward(loss)  # scales the loss for fp16
        else:
            loss.backward()

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Is the loss finite on every rank? (All ranks must agree to skip a step, or the gradient average
        would wait for a rank that never comes.)"""
        ok = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.world > 1:
            ok = self.acc.reduce(ok.to(self.device), reduction="sum") / self.world
        return bool(ok.item() == 1.0)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Mean of the gradients over ranks, in one flat all-reduce (head, featurizer and any trainable upstream
        parameters alike; a missing gradient counts as zero)."""
        if self.world == 1 or not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = self.acc.reduce(flat, reduction="mean")
        i = 0
        for p in params:
            n = p.numel()
            p.grad = flat[i:i + n].view_as(p).clone()
            i += n

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values on every rank (fresh heads are seeded alike; adapters / LoRA may not be)."""
        if self.world > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def clip(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        if self.acc is not None:
            return float(self.acc.clip_grad_norm_(params, max_norm))  # unscales fp16 gradients first
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        return float(self.acc.reduce(torch.tensor([value], dtype=torch.float64, device=self.device), "mean").item())

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def shard(self, batches: list) -> list:
        """This rank's share of a batch list that every rank built the same way: the first
        ``len // world * world`` batches dealt round-robin, so every rank takes the same number of steps."""
        if self.world == 1:
            return batches
        n = len(batches) // self.world * self.world
        if n == 0:
            raise ValueError(f"{len(batches)} training batch(es) for {self.world} processes: lower "
                             f"data.max_duration (config key) or use fewer processes")
        return batches[self.rank:n:self.world]


# ----------------------------------------------------------------------------------------------- training


class Downstream(nn.Module):
    """Featurizer + head (+ the upstream when it has trainable parameters)."""

    def __init__(self, featurizer: Featurizer, head: nn.Module):
        super().__init__()
        self.featurizer, self.head = featurizer, head


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _trainable_state(model: Downstream, upstream: Upstream) -> dict[str, torch.Tensor]:
    state = {f"downstream.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if not upstream.frozen:
        trainable = {n for n, p in upstream.named_parameters() if p.requires_grad}
        for k, v in upstream.state_dict().items():
            if k in trainable:
                state[f"upstream.{k}"] = v.detach().cpu().clone()
    return state


def _load_state(model: Downstream, upstream: Upstream, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k[len("downstream."):]: v for k, v in state.items() if k.startswith("downstream.")})
    up = {k[len("upstream."):]: v for k, v in state.items() if k.startswith("upstream.")}
    if up:
        missing = upstream.load_state_dict(up, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"checkpoint has unknown upstream keys {missing.unexpected_keys[:3]}")


def evaluate(task: Task, model: Downstream, source: FeatureSource, examples: Sequence[Example],
             max_samples: int, engine: Engine | None = None, **context) -> dict:
    """Score ``examples`` (sorted, padded batches) with the model in eval mode. With several processes each rank
    predicts every ``world``-th batch and the outputs are gathered, in batch order, before scoring."""
    engine = engine or Engine()
    model.eval()
    source.upstream.eval()
    batches = bucket_batches([e.num_samples for e in examples], max_samples)
    mine = []
    with torch.no_grad(), engine.autocast():
        for k in range(engine.rank, len(batches), engine.world):
            ex = [examples[i] for i in batches[k]]
            states, frames = source.states(ex)
            mine.append((k, task.predict(model.head, ex, model.featurizer(states), frames)))
    records = [r for _, recs in sorted(engine.gather(mine), key=lambda kr: kr[0]) for r in recs]
    return task.score(records, **context)


def train_trial(task: Task, source: FeatureSource, train: Sequence[Example], dev: Sequence[Example],
                cfg: SuperbConfig, lr: float, out_dir: Path, tag: dict, dev_context: dict | None = None,
                metrics_path: Path | None = None, engine: Engine | None = None
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train one head at learning rate ``lr``; returns (summary, best-dev state) and writes (rank 0)
    ``out_dir/best.safetensors`` and ``out_dir/summary.json``."""
    from tqdm import tqdm

    engine = engine or Engine(cfg.precision, cfg.device)
    upstream, device = source.upstream, source.device
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    rng = np.random.default_rng(cfg.seed)  # the same batch lists on every rank (each takes its share)
    model = Downstream(Featurizer(upstream.num_states, cfg.layer, cfg.layer_norm),
                       task.build_head(upstream.hidden_size, upstream.downsample_rate)).to(device)
    crop_rng = rng
    if engine.world > 1:  # dropout, SpecAugment and crops differ between ranks
        torch.manual_seed(cfg.seed + 1000 * engine.rank)
        crop_rng = np.random.default_rng([cfg.seed, engine.rank])
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    up_params = [p for p in upstream.parameters() if p.requires_grad]
    if up_params:
        groups.append({"params": up_params, "lr": lr * cfg.optim.upstream_lr_scale})
    opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    opt = engine.prepare_optimizer(opt_cls(groups, lr=lr, weight_decay=cfg.optim.weight_decay))
    params = [p for g in groups for p in g["params"]]
    engine.broadcast_params(params)
    max_samples = int(cfg.data.max_duration * SR)
    eval_samples = int(cfg.data.eval_max_duration * SR)
    weights = class_weights(train) if task.balanced else None
    crop = int(cfg.data.train_crop * SR / upstream.downsample_rate) if cfg.data.train_crop > 0 else None
    metrics_path = metrics_path or out_dir / "metrics.jsonl"
    best, best_step, best_state, history = None, 0, None, []
    step, t0, run_loss, n_loss, bad_steps = 0, time.perf_counter(), 0.0, 0, 0
    bar = tqdm(total=cfg.optim.steps, desc=f"{task.name} lr={lr:g}", disable=not (cfg.progress and engine.is_main),
               leave=False)
    while step < cfg.optim.steps:
        batches = bucket_batches([e.num_samples for e in train], max_samples, cfg.data.num_buckets, rng, weights)
        for b in engine.shard(batches):
            if step >= cfg.optim.steps:
                break
            model.train()
            upstream.train(True)
            ex = [train[i] for i in b]
            with engine.autocast():
                states, frames = source.states(ex, crop_frames=crop, rng=crop_rng)
                loss, logs = task.loss(model.head, model.featurizer(states), frames, ex)
            if not engine.all_finite(loss):
                bad_steps += 1
                log.warning("non-finite loss at step %d (batch %s); skipped", step, [e.id for e in ex[:3]])
                if bad_steps > 10:
                    raise RuntimeError(f"more than 10 non-finite losses at lr={lr}: lower optim.lr")
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            engine.backward(loss)
            engine.average_gradients(params)
            gnorm = engine.clip(params, cfg.optim.grad_clip)
            opt.step()
            step += 1
            bar.update(1)
            run_loss += float(loss.detach())
            n_loss += 1
            if step % cfg.optim.log_every == 0 or step == cfg.optim.steps:
                mean_loss = engine.mean(run_loss / n_loss)
                if engine.is_main:
                    append_jsonl(metrics_path, {**tag, "step": step, "loss": mean_loss, "grad_norm": gnorm,
                                                **{k: v for k, v in logs.items() if k != "loss"}})
                run_loss, n_loss = 0.0, 0
            if step % cfg.optim.eval_every == 0 or step == cfg.optim.steps:
                scores = evaluate(task, model, source, dev, eval_samples, engine, **(dev_context or {}))
                value = scores[task.metric]
                history.append({"step": step, task.metric: value})
                if engine.is_main:
                    append_jsonl(metrics_path, {**tag, "step": step, "split": "dev",
                                                **{k: v for k, v in scores.items() if not isinstance(v, list)}})
                if task.better(value, best):
                    best, best_step, best_state = value, step, _trainable_state(model, upstream)
                    best_scores = scores
                bar.set_postfix({task.metric: f"{value:.4f}", "best": f"{best:.4f}"})
    bar.close()
    from safetensors.torch import save_file

    if engine.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "best.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in best_state.items()}, tmp))
    model.load_state_dict({k[len("downstream."):]: v for k, v in best_state.items() if k.startswith("downstream.")})
    summary = {**tag, "lr": lr, "best_dev": best, "best_step": best_step, "steps": step,
               "dev": {k: v for k, v in best_scores.items()}, "dev_history": history,
               "layer_weights": model.featurizer.layer_weights().tolist(),
               "train_s": round(time.perf_counter() - t0, 2)}
    if engine.is_main:
        atomic_write_json(out_dir / "summary.json", summary)
    engine.release()
    engine.barrier()  # the trial's files exist before any rank reads them (resume, test scoring)
    return summary, best_state


def _build_source(cfg: SuperbConfig, device: torch.device) -> FeatureSource:
    up = build_upstream(cfg.upstream, mode=cfg.upstream_mode, adapter_dim=cfg.adapter_dim,
                        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                        seed=cfg.seed) \
        if cfg.upstream not in ("fbank", "mfcc") else build_upstream(cfg.upstream)
    up = up.to(device)
    cache_dir = None
    if cfg.cache.dir:
        cache_dir = Path(cfg.cache.dir) / upstream_fingerprint(cfg.upstream, cfg.upstream_mode, cfg.cache.dtype,
                                                                seed=cfg.seed)
    return FeatureSource(up, cache=cfg.cache.enabled, cache_dir=cache_dir, memory=cfg.cache.memory,
                         dtype=getattr(torch, cfg.cache.dtype), device=device,
                         batch_seconds=cfg.cache.batch_seconds, progress=cfg.progress)


def _units(cfg: SuperbConfig, task: Task, skips: SkipLog | None = None) -> list[dict]:
    """The train/dev/test example sets: one unit, or one per cross-validation fold."""
    d, t = cfg.data, cfg.task
    kw = dict(max_utts=d.max_utts, skips=skips)
    if d.folds:
        pool = []
        for split in d.fold_splits or [d.train_split or f"{t}_train"]:
            pool += load_examples(d.manifest_dir, split, task.field, fold_field=d.fold_field, **kw)
        units = []
        for f in d.folds:
            test = [e for e in pool if e.session == f]
            rest = [e for e in pool if e.session != f]
            if not test or not rest:
                raise ValueError(f"fold {f}: {len(test)} test and {len(rest)} training utterances "
                                 f"(field '{d.fold_field}', config key data.folds)")
            train, dev = carve_dev(rest, d.dev_fraction, cfg.seed + f)
            units.append({"fold": f, "train": train, "dev": dev, "tests": {"test": test}})
        return units
    train = load_examples(d.manifest_dir, d.train_split or f"{t}_train", task.field, min_duration=d.min_duration,
                          **kw)
    dev_split = d.dev_split or f"{t}_dev"
    if dev_split == "none" or (not d.dev_split and not (Path(d.manifest_dir) / f"cuts_{dev_split}.jsonl.gz").exists()):
        train, dev = carve_dev(train, d.dev_fraction, cfg.seed, by_label=(t == "asv"))
        log.info("dev = %d utterances held out of the training split", len(dev))
    else:
        dev = load_examples(d.manifest_dir, dev_split, task.field, **kw)
    tests = {s: load_examples(d.manifest_dir, s, task.field, **kw) for s in (d.test_splits or [f"{t}_test"])}
    return [{"fold": None, "train": train, "dev": dev, "tests": tests}]


def _drop_bad(u: dict, source: FeatureSource, skips: SkipLog) -> None:
    """Screen a unit's utterances (one decode each) and drop the bad ones from every list, counted in ``skips``
    under the split each was read from. A list left empty is an error naming the split."""
    lists = [("train", u["train"]), ("dev", u["dev"])] + [(f"test {k}", v) for k, v in u["tests"].items()]
    bad = {e.id for e in source.screen([e for _, exs in lists for e in exs])}
    if not bad:
        return
    for cut_id in bad:
        skips.add(skips.origin.get(cut_id, "?"), cut_id, source.bad[cut_id].reason)
    keep = lambda exs: [e for e in exs if e.id not in bad]  # noqa: E731
    u["train"], u["dev"] = keep(u["train"]), keep(u["dev"])
    u["tests"] = {k: keep(v) for k, v in u["tests"].items()}
    for name, exs in [("train", u["train"]), ("dev", u["dev"])] + [(f"test {k}", v) for k, v in u["tests"].items()]:
        if not exs:
            raise ValueError(f"every {name} utterance{'' if u['fold'] is None else ' of fold %s' % u['fold']} is "
                             f"bad ({skips.report()}): fix the data (speechssl prepare validate DIR --decode)")
    example = source.bad[next(iter(sorted(bad)))]
    log.warning("skipped %d bad utterances (data.skip_bad): %s; e.g. %s", len(bad),
                {s: skips.counts(s) for s in skips.by_split}, example)


def _drop_unscorable_trials(trials: list, units: list[dict], skips: SkipLog) -> list:
    """ASV trials whose enrolment or test utterance was skipped cannot be scored: drop and count them."""
    kept_ids = {e.id for u in units for exs in u["tests"].values() for e in exs}
    kept = [t for t in trials if t[1] in kept_ids and t[2] in kept_ids]
    skips.trials_dropped = len(trials) - len(kept)
    if skips.trials_dropped:
        log.warning("%d of %d ASV trials name skipped utterances and are not scored", skips.trials_dropped,
                    len(trials))
    if not kept:
        raise ValueError("no ASV trial is left to score: every trial names a skipped utterance")
    return kept


def run_superb(cfg: SuperbConfig, out_dir: str | os.PathLike, resume: bool = False,
               source_pool: dict | None = None) -> dict | list[dict]:
    """Run one task on one upstream with an optional learning-rate sweep; returns what results.json holds.

    ``source_pool``: a dict shared by several calls in one process (several tasks on one upstream): a frozen,
    cached upstream is then loaded once and utterances shared between tasks are encoded once.
    """
    out = Path(out_dir)
    engine = Engine(cfg.precision, cfg.device)
    device = engine.device
    task = build_task(cfg.task, cfg.head, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, specaug=cfg.specaug,
                      decoding=cfg.decoding, balanced=cfg.balanced, p_target=cfg.asv.p_target,
                      c_miss=cfg.asv.c_miss, c_fa=cfg.asv.c_fa)
    if cfg.task == "asv" and not cfg.data.trials:
        raise ConfigError("task asv needs config key data.trials (the test trial list)")
    skips = SkipLog() if cfg.data.skip_bad else None
    units = _units(cfg, task, skips)
    trials = read_trials(cfg.data.trials) if cfg.task == "asv" else None
    if trials is not None:  # fail before training, not after it
        ids = {e.id for u in units for exs in u["tests"].values() for e in exs}
        missing = sorted({x for _, a, b in trials for x in (a, b) if x not in ids and not (skips and x in skips)})
        if missing:
            raise ValueError(f"{cfg.data.trials}: {len(missing)} trial utterances are not in the test split(s) "
                             f"{cfg.data.test_splits or ['asv_test']}, e.g. {missing[:3]}")
    lrs = list(cfg.optim.lrs) or [cfg.optim.lr]
    shareable = source_pool is not None and cfg.upstream_mode == "frozen" and cfg.cache.enabled
    # a random-init upstream's weights come from cfg.seed: tasks with different seeds must not share one
    key = (cfg.upstream, cfg.seed if is_random_spec(cfg.upstream) else None, cfg.cache.dir, cfg.cache.dtype,
           cfg.cache.memory, str(device))
    if shareable and key in source_pool:
        source = source_pool[key]
    else:
        source = _build_source(cfg, device)
        if shareable:
            source_pool[key] = source
    source.progress = cfg.progress and engine.is_main
    if engine.is_main:  # the data, trials and upstream are checked: only now rank 0 writes into the directory
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if not resume and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
    upstream_params = source.upstream.upstream_params()
    cache_since = source.counters()
    log.info("superb %s: upstream %s (%s, %d params, %d states x %d dims), %d fold(s), lrs %s", cfg.task,
             cfg.upstream, cfg.upstream_mode, upstream_params, source.upstream.num_states,
             source.upstream.hidden_size, len(units), lrs)
    # ranks > 0 fit the same vocabularies into a scratch directory of their own
    scratch = None if engine.is_main else tempfile.TemporaryDirectory(prefix=f"superb-rank{engine.rank}-")
    for u in units:
        u["work"] = (out if scratch is None else Path(scratch.name)) / (
            "labels" if u["fold"] is None else f"labels/fold-{u['fold']}")
        if skips is not None:  # before the labels are fitted: a dropped utterance adds no label
            _drop_bad(u, source, skips)
        task.fit(u["train"], u["work"])
        u["dev_context"] = {}
        if cfg.task == "asv":
            u["dev_context"] = {"trials": make_trials(u["dev"], cfg.asv.dev_trials, cfg.seed)}
        if source.cache:
            for name, exs in [("train", u["train"]), ("dev", u["dev"])] + list(u["tests"].items()):
                source.prepare(exs, desc=f"caching {name}")
    if trials is not None and skips is not None:
        trials = _drop_unscorable_trials(trials, units, skips)
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.num_threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    try:
        return _sweep_and_score(cfg, task, source, units, lrs, trials, out, device, resume, upstream_params,
                                t_start, cache_since, engine, skips)
    finally:
        torch.set_num_threads(threads)
        if scratch is not None:
            scratch.cleanup()


def _sweep_and_score(cfg, task, source, units, lrs, trials, out, device, resume, upstream_params, t_start,
                     cache_since, engine, skips=None):
    # sweep: every lr on every fold, scored on dev only
    summaries: dict[float, list[dict]] = {}
    for lr in lrs:
        summaries[lr] = []
        for u in units:
            tag = {"lr": lr} if u["fold"] is None else {"lr": lr, "fold": u["fold"]}
            tdir = out / "trials" / f"lr-{lr:g}"
            if u["fold"] is not None:
                tdir = tdir / f"fold-{u['fold']}"
            if resume and (tdir / "summary.json").exists() and (tdir / "best.safetensors").exists():
                import json

                summaries[lr].append(json.loads((tdir / "summary.json").read_text()))
                log.info("resume: reusing finished trial %s", tdir)
                continue
            if not source.upstream.frozen and len(lrs) * len(units) > 1:
                source = _build_source(cfg, device)  # fresh upstream weights / adapters for every trial
            task.fit(u["train"], u["work"])
            s, _ = train_trial(task, source, u["train"], u["dev"], cfg, lr, tdir, tag, u["dev_context"],
                               metrics_path=out / "metrics.jsonl", engine=engine)
            summaries[lr].append(s)
            log.info("lr %g%s: best dev %s = %.4f at step %d", lr, "" if u["fold"] is None else f" fold {u['fold']}",
                     task.metric, s["best_dev"], s["best_step"])
    mean_dev = {lr: float(np.mean([s["best_dev"] for s in ss])) for lr, ss in summaries.items()}
    best_lr = None
    for lr in lrs:
        if task.better(mean_dev[lr], None if best_lr is None else mean_dev[best_lr]):
            best_lr = lr
    log.info("learning-rate sweep: %s -> best lr %g (dev %s %.4f)",
             {f"{k:g}": round(v, 4) for k, v in mean_dev.items()}, best_lr, task.metric, mean_dev[best_lr])
    # score the winner's best-dev checkpoints on test
    from safetensors.torch import load_file

    test_scores: dict[str, list[dict]] = {}
    scored: dict[str, int] = {}  # test utterances scored per split (summed over folds)
    for u, s in zip(units, summaries[best_lr]):
        tdir = out / "trials" / f"lr-{best_lr:g}"
        if u["fold"] is not None:
            tdir = tdir / f"fold-{u['fold']}"
        if not source.upstream.frozen:
            source = _build_source(cfg, device)
        task.fit(u["train"], u["work"])
        model = Downstream(Featurizer(source.upstream.num_states, cfg.layer, cfg.layer_norm),
                           task.build_head(source.upstream.hidden_size,
                                           source.upstream.downsample_rate)).to(device)
        _load_state(model, source.upstream, load_file(str(tdir / "best.safetensors")))
        for split, exs in u["tests"].items():
            ctx = {"trials": trials} if trials is not None else {}
            sc = evaluate(task, model, source, exs, int(cfg.data.eval_max_duration * SR), engine, **ctx)
            sc["fold"] = u["fold"]
            test_scores.setdefault(split, []).append(sc)
            scored[split] = scored.get(split, 0) + len(exs)
            if engine.is_main:
                append_jsonl(out / "metrics.jsonl", {"lr": best_lr, "fold": u["fold"], "split": split,
                                                     **{k: v for k, v in sc.items() if not isinstance(v, list)}})
    layer_weights = np.mean([s["layer_weights"] for s in summaries[best_lr]], axis=0).tolist()
    common = {
        "task": cfg.task, "upstream": cfg.upstream, "upstream_mode": cfg.upstream_mode,
        "upstream_params": upstream_params, "metric": task.metric, "higher_better": task.higher_better,
        "best_lr": best_lr, "lr_sweep": {f"{k:g}": v for k, v in mean_dev.items()},
        "dev": {task.metric: mean_dev[best_lr], **({} if len(units) > 1 else summaries[best_lr][0]["dev"])},
        "layer_weights": layer_weights, "num_states": source.upstream.num_states,
        "layer": cfg.layer, "steps": cfg.optim.steps, "train_s": round(time.perf_counter() - t_start, 2),
        "cache": source.cache_stats(since=cache_since),
        "skipped": skips.report() if skips is not None else None,
    }
    results = []
    for split, scs in test_scores.items():
        r = {**common, "split": split, "value": float(np.mean([sc[task.metric] for sc in scs])),
             "scored": scored[split]}
        if len(scs) > 1:
            r["folds"] = [{"fold": sc["fold"], "value": sc[task.metric]} for sc in scs]
        else:
            r["scores"] = {k: v for k, v in scs[0].items() if k != "fold"}
        results.append(r)
    final = results[0] if len(results) == 1 else results
    if engine.is_main:
        atomic_write_json(out / "results.json", final)
    engine.barrier()
    for r in results:
        log.info("%s on %s (%s): %s = %.4f (best lr %g, %d utterances scored)", cfg.task, r["split"], cfg.upstream,
                 task.metric, r["value"], best_lr, r["scored"])
    return final
