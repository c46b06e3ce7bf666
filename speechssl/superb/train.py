"""The SUPERB task loop: data from manifests, upstream -> featurizer -> head training, dev selection, test scoring.

Protocol: duration-bucketed batches, gradient clipping, dev evaluation every ``trainer.eval_every`` steps, the
best-dev checkpoint of each trial is kept; over a learning-rate sweep (``sweep.lrs``) the rate with the best dev
score wins, and only the winner's best-dev checkpoints are scored on the test split(s). Test scores never take
part in any choice. With ``data.skip_bad`` (the default, as in pretraining) every utterance is decoded once
before training (the cache fill, when there is a cache) and the bad ones are dropped from every split, counted
by reason and listed in ``results.json`` (``skipped``), which also says how many test utterances were scored.
Writes ``EXP/results.json``, ``EXP/metrics.jsonl``, ``EXP/config.yaml`` and per-trial
``EXP/trials/lr-LR[/fold-F]/{best.safetensors,summary.json}`` (``--resume`` reuses finished trials).

The loop is not the pretraining ``Trainer``: its unit of work is a small head over cached hidden states, trained
many times per run (learning rates x folds). It shares the trainer's ``Runtime`` (device, ``trainer.precision``
fp32 | bf16 | fp16, several processes via ``accelerate launch`` / ``torchrun``), its optimiser config
(``speechssl.train.optim.OptimConfig``) and the names of its loop knobs (``trainer.max_steps``, ``eval_every``,
``log_every``, ``clip_norm``, ``seed``, ``progress``). With several processes every rank takes its share of each
epoch's duration buckets and of the evaluation batches, gradients are averaged over ranks after every backward,
evaluation outputs are gathered so every rank computes the same dev score (and so takes the same best-checkpoint
decisions), and only rank 0 writes files.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from speechssl.config import ConfigError, save_config
from speechssl.constants import PRECISIONS, SAMPLE_RATE
from speechssl.superb.cache import FeatureSource, upstream_fingerprint
from speechssl.superb.data import SkipLog, bucket_batches, carve_dev, class_weights, load_examples
from speechssl.superb.loop import Downstream, evaluate, load_trial_state, train_trial
from speechssl.superb.tasks import TASKS, DecodingConfig, HeadConfig, SpecAugConfig, Task, build_task, make_trials, \
    read_trials
from speechssl.superb.upstream import MODES, STATES_VERSION, build_upstream, is_random_spec
from speechssl.train.optim import OptimConfig
from speechssl.train.runtime import Runtime
from speechssl.utils.io import append_jsonl, atomic_write_json

__all__ = ["SuperbConfig", "DataConfig", "SuperbOptimConfig", "LoopConfig", "SweepConfig", "CacheConfig",
           "AsvConfig", "Unit", "run_superb", "bucket_batches", "carve_dev", "class_weights", "load_examples",
           "train_trial", "evaluate", "SkipLog"]

log = logging.getLogger(__name__)


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


# the parent's annotation of ``name`` (its choices), resolved here so SUPERB accepts exactly what the trainer does
_OPTIM_NAME = typing.get_type_hints(OptimConfig)["name"]


@dataclass
class SuperbOptimConfig(OptimConfig):
    """The trainer's optimiser config with SUPERB's defaults: Adam as torch defines it (betas 0.9 / 0.999, eps
    1e-8), lr 1e-4, no weight decay. Every trainable parameter is decayed alike (``no_decay`` stays empty) and the
    upstream's lr multiplier is ``sweep.upstream_lr_scale`` (``lr_scale`` stays empty)."""

    name: _OPTIM_NAME = "adam"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool = False               # torch's default kernels (the fused one rounds differently)
    no_decay: list[str] = field(default_factory=list)


@dataclass
class LoopConfig:
    """Section ``trainer``: the loop's knobs, named as in the pretraining ``TrainerConfig``."""

    max_steps: int = 1000             # optimiser updates per trial
    eval_every: int = 200             # dev evaluation (and best-checkpoint choice) every this many updates
    log_every: int = 50
    clip_norm: float = 1.0            # max global gradient norm; 0 = no clipping
    precision: Literal[PRECISIONS] = "fp32"  # bf16 | fp16 autocast; fp16 with loss scaling, GPU only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0                     # head init, batch order, dev hold-out, random:X upstream weights
    progress: bool = True
    num_threads: int = 0              # CPU threads while training heads (0 = leave torch's setting); small
                                      # heads run fastest on 1, extraction keeps the default

    def validate(self) -> None:
        for k in ("max_steps", "eval_every", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"config key 'trainer.{k}' must be >= 1, got {getattr(self, k)}")


@dataclass
class SweepConfig:
    lrs: list[float] = field(default_factory=list)  # learning rates tried; empty = [optim.lr]
    upstream_lr_scale: float = 1.0    # lr multiplier for trainable upstream parameters (fine-tune, adapters, LoRA)


@dataclass
class CacheConfig:
    enabled: bool = True              # cache hidden states of a frozen upstream
    dir: str = ""                     # on-disk cache root ("" = memory only)
    memory: bool = True
    dtype: Literal["float32", "float16"] = "float32"  # float32 keeps results identical to no cache
    batch_seconds: float = 60.0


@dataclass
class AsvConfig:
    p_target: float = 0.01
    c_miss: float = 1.0
    c_fa: float = 1.0
    dev_trials: int = 2000


@dataclass
class SuperbConfig:
    task: Literal[TASKS] = "sid"
    upstream: str = "fbank"           # fbank | mfcc | a model path for speechssl.load_pretrained |
                                      # random:PRESET_OR_MODEL (that architecture, fresh weights from trainer.seed)
    upstream_mode: Literal[MODES] = "frozen"
    layer: int | None = None          # a single hidden state instead of the weighted sum
    layer_norm: bool = False
    adapter_dim: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)  # substrings of linear-layer names; empty = all
    tokenizer: Literal["char", "bpe"] = "char"  # asr
    vocab_size: int = 300             # bpe
    balanced: bool | None = None      # class-balanced batches (default: KS only)
    head: HeadConfig = field(default_factory=HeadConfig)
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    optim: SuperbOptimConfig = field(default_factory=SuperbOptimConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    trainer: LoopConfig = field(default_factory=LoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    asv: AsvConfig = field(default_factory=AsvConfig)

    def validate(self) -> None:
        if self.optim.lr_scale:
            raise ConfigError("config key 'optim.lr_scale' is not used by SUPERB: the head's parameters take the "
                              "trial's lr and the upstream's sweep.upstream_lr_scale times it")
        if self.optim.no_decay:
            raise ConfigError("config key 'optim.no_decay' is not used by SUPERB: optim.weight_decay applies to "
                              "every trainable parameter; leave optim.no_decay empty")


# ------------------------------------------------------------------------------------------------- the data


@dataclass
class Unit:
    """One train/dev/test set: the whole task, or one cross-validation fold."""

    fold: int | None
    train: list
    dev: list
    tests: dict[str, list]
    work: Path | None = None          # where the label vocabularies are saved
    dev_context: dict = field(default_factory=dict)  # ASV: the dev trials

    def lists(self) -> list[tuple[str, list]]:
        return [("train", self.train), ("dev", self.dev)] + [(f"test {k}", v) for k, v in self.tests.items()]


def _build_source(cfg: SuperbConfig, device: torch.device) -> FeatureSource:
    if cfg.upstream in ("fbank", "mfcc"):
        up = build_upstream(cfg.upstream)
    else:
        up = build_upstream(cfg.upstream, mode=cfg.upstream_mode, adapter_dim=cfg.adapter_dim,
                            lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                            seed=cfg.trainer.seed)
    up = up.to(device)
    cache_dir = None
    if cfg.cache.dir:
        # the states version in the key: states cached under an older frame rule are never served again
        cache_dir = Path(cfg.cache.dir) / upstream_fingerprint(
            cfg.upstream, cfg.upstream_mode, f"{cfg.cache.dtype}|states-v{STATES_VERSION}", seed=cfg.trainer.seed)
    return FeatureSource(up, cache=cfg.cache.enabled, cache_dir=cache_dir, memory=cfg.cache.memory,
                         dtype=getattr(torch, cfg.cache.dtype), device=device,
                         batch_seconds=cfg.cache.batch_seconds, progress=cfg.trainer.progress)


def _fold_units(cfg: SuperbConfig, task: Task, skips: SkipLog | None) -> list[Unit]:
    """Leave-one-fold-out over the pooled ``data.fold_splits``."""
    d = cfg.data
    pool = []
    for split in d.fold_splits or [d.train_split or f"{cfg.task}_train"]:
        pool += load_examples(d.manifest_dir, split, task.field, fold_field=d.fold_field, max_utts=d.max_utts,
                              skips=skips)
    units = []
    for f in d.folds:
        test = [e for e in pool if e.session == f]
        rest = [e for e in pool if e.session != f]
        if not test or not rest:
            raise ValueError(f"fold {f}: {len(test)} test and {len(rest)} training utterances "
                             f"(field '{d.fold_field}', config key data.folds)")
        train, dev = carve_dev(rest, d.dev_fraction, cfg.trainer.seed + f)
        units.append(Unit(f, train, dev, {"test": test}))
    return units


def _units(cfg: SuperbConfig, task: Task, skips: SkipLog | None = None) -> list[Unit]:
    """The train/dev/test example sets: one unit, or one per cross-validation fold."""
    d, t = cfg.data, cfg.task
    if d.folds:
        return _fold_units(cfg, task, skips)
    kw = dict(max_utts=d.max_utts, skips=skips)
    train = load_examples(d.manifest_dir, d.train_split or f"{t}_train", task.field, min_duration=d.min_duration,
                          **kw)
    dev_split = d.dev_split or f"{t}_dev"
    if dev_split == "none" or (not d.dev_split and not (Path(d.manifest_dir) / f"cuts_{dev_split}.jsonl.gz").exists()):
        train, dev = carve_dev(train, d.dev_fraction, cfg.trainer.seed, by_label=(t == "asv"))
        log.info("dev = %d utterances held out of the training split", len(dev))
    else:
        dev = load_examples(d.manifest_dir, dev_split, task.field, **kw)
    tests = {s: load_examples(d.manifest_dir, s, task.field, **kw) for s in (d.test_splits or [f"{t}_test"])}
    return [Unit(None, train, dev, tests)]


def _drop_bad(u: Unit, source: FeatureSource, skips: SkipLog) -> None:
    """Screen a unit's utterances (one decode each) and drop the bad ones from every list, counted in ``skips``
    under the split each was read from. A list left empty is an error naming the split."""
    bad = {e.id for e in source.screen([e for _, exs in u.lists() for e in exs])}
    if not bad:
        return
    for cut_id in bad:
        skips.add(skips.origin.get(cut_id, "?"), cut_id, source.bad[cut_id].reason)
    keep = lambda exs: [e for e in exs if e.id not in bad]  # noqa: E731
    u.train, u.dev, u.tests = keep(u.train), keep(u.dev), {k: keep(v) for k, v in u.tests.items()}
    for name, exs in u.lists():
        if not exs:
            raise ValueError(f"every {name} utterance{'' if u.fold is None else ' of fold %s' % u.fold} is "
                             f"bad ({skips.report()}): fix the data (speechssl prepare validate DIR --decode)")
    example = source.bad[next(iter(sorted(bad)))]
    log.warning("skipped %d bad utterances (data.skip_bad): %s; e.g. %s", len(bad),
                {s: skips.counts(s) for s in skips.by_split}, example)


def _check_trials(cfg: SuperbConfig, units: list[Unit], skips: SkipLog | None) -> list | None:
    """The ASV test trials (None for other tasks), checked against the test split(s) before any training."""
    if cfg.task != "asv":
        return None
    trials = read_trials(cfg.data.trials)
    ids = {e.id for u in units for exs in u.tests.values() for e in exs}
    missing = sorted({x for _, a, b in trials for x in (a, b) if x not in ids and not (skips and x in skips)})
    if missing:
        raise ValueError(f"{cfg.data.trials}: {len(missing)} trial utterances are not in the test split(s) "
                         f"{cfg.data.test_splits or ['asv_test']}, e.g. {missing[:3]}")
    return trials


def _drop_unscorable_trials(trials: list, units: list[Unit], skips: SkipLog) -> list:
    """ASV trials whose enrolment or test utterance was skipped cannot be scored: drop and count them."""
    kept_ids = {e.id for u in units for exs in u.tests.values() for e in exs}
    kept = [t for t in trials if t[1] in kept_ids and t[2] in kept_ids]
    skips.trials_dropped = len(trials) - len(kept)
    if skips.trials_dropped:
        log.warning("%d of %d ASV trials name skipped utterances and are not scored", skips.trials_dropped,
                    len(trials))
    if not kept:
        raise ValueError("no ASV trial is left to score: every trial names a skipped utterance")
    return kept


def _prepare_units(cfg: SuperbConfig, task: Task, units: list[Unit], source: FeatureSource, skips: SkipLog | None,
                   label_root: Path) -> None:
    """Per unit: drop bad utterances, fit the label vocabularies, build the ASV dev trials, fill the cache."""
    for u in units:
        u.work = label_root / ("labels" if u.fold is None else f"labels/fold-{u.fold}")
        if skips is not None:  # before the labels are fitted: a dropped utterance adds no label
            _drop_bad(u, source, skips)
        task.fit(u.train, u.work)
        if cfg.task == "asv":
            u.dev_context = {"trials": make_trials(u.dev, cfg.asv.dev_trials, cfg.trainer.seed)}
        if source.cache:
            for name, exs in [("train", u.train), ("dev", u.dev)] + list(u.tests.items()):
                source.prepare(exs, desc=f"caching {name}")


# ------------------------------------------------------------------------------------------- sweep and scoring


@dataclass
class _Run:
    """What the learning-rate sweep and the test scoring of one task share."""

    cfg: SuperbConfig
    task: Task
    rt: Runtime
    out: Path
    units: list[Unit]
    source: FeatureSource             # replaced by a fresh one per trial when the upstream trains
    trials: list | None               # ASV test trials
    skips: SkipLog | None
    resume: bool
    lrs: list[float]
    upstream_params: int
    cache_since: tuple
    t_start: float = field(default_factory=time.perf_counter)

    def trial_dir(self, lr: float, u: Unit) -> Path:
        d = self.out / "trials" / f"lr-{lr:g}"
        return d if u.fold is None else d / f"fold-{u.fold}"

    def fresh_source(self) -> None:
        """A trainable upstream (fine-tune, adapters, LoRA) starts every trial from the loaded weights."""
        self.source = _build_source(self.cfg, self.rt.device)


def _run_trial(run: _Run, lr: float, u: Unit) -> dict:
    """One (lr, fold) trial's summary: trained now, or read back from a finished trial under ``--resume``."""
    tdir = run.trial_dir(lr, u)
    if run.resume and (tdir / "summary.json").exists() and (tdir / "best.safetensors").exists():
        log.info("resume: reusing finished trial %s", tdir)
        return json.loads((tdir / "summary.json").read_text())
    if not run.source.upstream.frozen and len(run.lrs) * len(run.units) > 1:
        run.fresh_source()
    run.task.fit(u.train, u.work)
    tag = {"lr": lr} if u.fold is None else {"lr": lr, "fold": u.fold}
    s, _ = train_trial(run.task, run.source, u.train, u.dev, run.cfg, lr, tdir, tag, u.dev_context,
                       metrics_path=run.out / "metrics.jsonl", rt=run.rt)
    log.info("lr %g%s: best dev %s = %.4f at step %d", lr, "" if u.fold is None else f" fold {u.fold}",
             run.task.metric, s["best_dev"], s["best_step"])
    return s


def _sweep(run: _Run) -> tuple[dict[float, list[dict]], dict[float, float], float]:
    """Every lr on every unit, scored on dev only -> (summaries per lr, mean best dev per lr, the best lr)."""
    summaries = {lr: [_run_trial(run, lr, u) for u in run.units] for lr in run.lrs}
    mean_dev = {lr: float(np.mean([s["best_dev"] for s in ss])) for lr, ss in summaries.items()}
    best_lr = None
    for lr in run.lrs:
        if run.task.better(mean_dev[lr], None if best_lr is None else mean_dev[best_lr]):
            best_lr = lr
    log.info("learning-rate sweep: %s -> best lr %g (dev %s %.4f)",
             {f"{k:g}": round(v, 4) for k, v in mean_dev.items()}, best_lr, run.task.metric, mean_dev[best_lr])
    return summaries, mean_dev, best_lr


def _score_tests(run: _Run, best_lr: float) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The best lr's best-dev checkpoints on every test split -> (scores per split and unit, utterances scored)."""
    from safetensors.torch import load_file

    cfg, task = run.cfg, run.task
    test_scores: dict[str, list[dict]] = {}
    scored: dict[str, int] = {}  # test utterances scored per split (summed over folds)
    for u in run.units:
        if not run.source.upstream.frozen:
            run.fresh_source()
        up = run.source.upstream
        task.fit(u.train, u.work)
        model = Downstream.build(task, up, cfg.layer, cfg.layer_norm).to(run.rt.device)
        load_trial_state(model, up, load_file(str(run.trial_dir(best_lr, u) / "best.safetensors")))
        for split, exs in u.tests.items():
            ctx = {"trials": run.trials} if run.trials is not None else {}
            sc = evaluate(task, model, run.source, exs, int(cfg.data.eval_max_duration * SAMPLE_RATE), run.rt, **ctx)
            sc["fold"] = u.fold
            test_scores.setdefault(split, []).append(sc)
            scored[split] = scored.get(split, 0) + len(exs)
            if run.rt.is_main:
                append_jsonl(run.out / "metrics.jsonl", {"lr": best_lr, "fold": u.fold, "split": split,
                                                         **{k: v for k, v in sc.items() if not isinstance(v, list)}})
    return test_scores, scored


def _results(run: _Run, summaries: dict, mean_dev: dict, best_lr: float, test_scores: dict,
             scored: dict) -> list[dict]:
    """The records of results.json, one per test split."""
    cfg, task, up = run.cfg, run.task, run.source.upstream
    best = summaries[best_lr]
    common = {
        "task": cfg.task, "upstream": cfg.upstream, "upstream_mode": cfg.upstream_mode,
        "upstream_params": run.upstream_params, "metric": task.metric, "higher_better": task.higher_better,
        "best_lr": best_lr, "lr_sweep": {f"{k:g}": v for k, v in mean_dev.items()},
        "dev": {task.metric: mean_dev[best_lr], **({} if len(run.units) > 1 else best[0]["dev"])},
        "layer_weights": np.mean([s["layer_weights"] for s in best], axis=0).tolist(),
        "num_states": up.num_states, "layer": cfg.layer, "steps": cfg.trainer.max_steps,
        "train_s": round(time.perf_counter() - run.t_start, 2), "cache": run.source.cache_stats(since=run.cache_since),
        "skipped": run.skips.report() if run.skips is not None else None,
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
    return results


def _sweep_and_score(run: _Run) -> dict | list[dict]:
    """The sweep on dev, the winner on test, results.json (rank 0); returns what results.json holds."""
    summaries, mean_dev, best_lr = _sweep(run)
    results = _results(run, summaries, mean_dev, best_lr, *_score_tests(run, best_lr))
    final = results[0] if len(results) == 1 else results
    if run.rt.is_main:
        atomic_write_json(run.out / "results.json", final)
    run.rt.barrier()
    for r in results:
        log.info("%s on %s (%s): %s = %.4f (best lr %g, %d utterances scored)", run.cfg.task, r["split"],
                 run.cfg.upstream, run.task.metric, r["value"], best_lr, r["scored"])
    return final


# ---------------------------------------------------------------------------------------------------- the run


def _shared_source(cfg: SuperbConfig, device: torch.device, pool: dict | None) -> FeatureSource:
    """The feature source, taken from (and put into) ``pool`` when it can serve several tasks: a frozen, cached
    upstream. A random-init upstream's weights come from trainer.seed: tasks with different seeds never share."""
    shareable = pool is not None and cfg.upstream_mode == "frozen" and cfg.cache.enabled
    key = (cfg.upstream, cfg.trainer.seed if is_random_spec(cfg.upstream) else None, cfg.cache.dir, cfg.cache.dtype,
           cfg.cache.memory, str(device))
    if shareable and key in pool:
        return pool[key]
    source = _build_source(cfg, device)
    if shareable:
        pool[key] = source
    return source


def _start_out_dir(cfg: SuperbConfig, out: Path, resume: bool) -> None:
    """Rank 0 writes into the directory only now that the data, trials and upstream are checked."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if not resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()


def run_superb(cfg: SuperbConfig, out_dir: str | os.PathLike, resume: bool = False,
               source_pool: dict | None = None) -> dict | list[dict]:
    """Run one task on one upstream with an optional learning-rate sweep; returns what results.json holds.

    ``source_pool``: a dict shared by several calls in one process (several tasks on one upstream): a frozen,
    cached upstream is then loaded once and utterances shared between tasks are encoded once.
    """
    out, tc = Path(out_dir), cfg.trainer
    rt = Runtime(tc.precision, tc.device, config_key="trainer")
    task = build_task(cfg.task, cfg.head, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, specaug=cfg.specaug,
                      decoding=cfg.decoding, balanced=cfg.balanced, p_target=cfg.asv.p_target,
                      c_miss=cfg.asv.c_miss, c_fa=cfg.asv.c_fa)
    if cfg.task == "asv" and not cfg.data.trials:  # fail before reading any manifest
        raise ConfigError("task asv needs config key data.trials (the test trial list)")
    skips = SkipLog() if cfg.data.skip_bad else None
    units = _units(cfg, task, skips)
    trials = _check_trials(cfg, units, skips)  # fail before training, not after it
    source = _shared_source(cfg, rt.device, source_pool)
    source.progress = tc.progress and rt.is_main
    if rt.is_main:
        _start_out_dir(cfg, out, resume)
    run = _Run(cfg, task, rt, out, units, source, trials, skips, resume, list(cfg.sweep.lrs) or [cfg.optim.lr],
               source.upstream.upstream_params(), source.counters())
    log.info("superb %s: upstream %s (%s, %d params, %d states x %d dims), %d fold(s), lrs %s", cfg.task,
             cfg.upstream, cfg.upstream_mode, run.upstream_params, source.upstream.num_states,
             source.upstream.hidden_size, len(units), run.lrs)
    # ranks > 0 fit the same vocabularies into a scratch directory of their own
    scratch = None if rt.is_main else tempfile.TemporaryDirectory(prefix=f"superb-rank{rt.rank}-")
    threads = torch.get_num_threads()
    try:
        _prepare_units(cfg, task, units, source, skips, out if scratch is None else Path(scratch.name))
        if trials is not None and skips is not None:
            run.trials = _drop_unscorable_trials(trials, units, skips)
        run.t_start = time.perf_counter()
        if tc.num_threads > 0 and rt.device.type == "cpu":
            torch.set_num_threads(tc.num_threads)
        return _sweep_and_score(run)
    finally:
        torch.set_num_threads(threads)
        if scratch is not None:
            scratch.cleanup()
