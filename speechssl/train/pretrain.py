"""``speechssl pretrain``: config schema and the glue from manifests + encoder + objective to the Trainer.

``run_pretrain(cfg, out_dir, resume)`` builds

- the encoder from ``model.preset`` (a preset name such as ``tiny_hubert`` or a ``conf/model/*.yaml`` path)
  with ``model.overrides``, optionally initialised from ``model.init_from`` (any ``load_pretrained`` path);
- the objective with ``speechssl.models.objectives.build_objective(objective.name, encoder, **objective.kwargs)``;
- the training data through ``speechssl.data.loader`` (the ``data:`` section is its ``DataConfig``): Lhotse
  manifests (``data.train``, several are chained) or Shar shards (``data.shar_dir``), duration-bucketed batches
  of ``data.max_duration`` padded seconds per rank, ``SpeechDataset`` batches (crops on the encoder frame grid,
  units aligned to the encoder's frames), exact resume; ``data.valid`` manifests feed a periodic validation pass;
- collapse diagnostics (``diagnostics``, see ``DiagnosticsConfig``) at every trainer evaluation, on a fixed batch
  of the first cuts of ``data.valid`` (else of the training data): per-layer temporal std and effective rank,
  the objective's numbers on that batch, the unit prior (and PNMI when the cuts carry phone alignments) and
  ``CollapseMonitor`` warnings; with ``trainer.eval_every`` set, evaluations run even without ``data.valid``;
- the ``Trainer``, which writes ``EXP/config.yaml``, ``EXP/metrics.jsonl``, ``EXP/checkpoints/`` and
  ``EXP/final/`` (the encoder via ``export_pretrained(format="speechssl")``, the objective head as part
  ``objective``; ``speechssl.load_pretrained(EXP/final)`` loads it).

Example::

    cfg = load_config(PretrainConfig, "conf/pretrain/mini_hubert_iter1.yaml", ["trainer.max_steps=50"])
    logs = run_pretrain(cfg, "exp/hubert_iter1")
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from speechssl.config import ConfigError, to_dict
from speechssl.data.loader import DataConfig, build_dataset, build_loader, split_cuts
from speechssl.train.diagnostics import DiagnosticsConfig, RunDiagnostics
from speechssl.train.optim import OptimConfig, ScheduleConfig
from speechssl.train.trainer import Trainer, TrainerConfig

__all__ = ["PretrainConfig", "DataConfig", "ModelConfig", "ObjectiveConfig", "DiagnosticsConfig", "run_pretrain",
           "build_model", "build_train_loader"]
log = logging.getLogger(__name__)



def predicts_units(objective_name: str) -> bool:
    """Whether the objective registered as ``objective_name`` predicts unit labels stored on the cuts (False for
    an unknown name: building the model reports it)."""
    from speechssl.models.objectives import OBJECTIVES

    cls = OBJECTIVES.get(objective_name)
    return bool(cls is not None and cls.predicts_units)


@dataclass
class ModelConfig:
    preset: str = "tiny_hubert"                      # preset name or conf/model/*.yaml
    overrides: dict[str, Any] = field(default_factory=dict)  # EncoderConfig fields, e.g. {num_layers: 2}
    init_from: str | None = None                     # start from these encoder weights (load_pretrained path)


@dataclass
class ObjectiveConfig:
    # a speechssl.models.objectives.OBJECTIVES name (hubert | wav2vec2 | wavlm | bestrq | any registered module);
    # not a Literal, so that a new objective needs no change here
    name: str = "hubert"
    kwargs: dict[str, Any] = field(default_factory=dict)  # build_objective keyword arguments


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def normalize(self) -> None:
        """A bare ``objective.kwargs.num_classes: K`` with one label set is keyed by that set's name."""
        nc, units = self.objective.kwargs.get("num_classes"), self.data.units
        if (predicts_units(self.objective.name) and isinstance(nc, int) and len(units) == 1
                and units[0] != "kmeans"):
            self.objective.kwargs["num_classes"] = {units[0]: nc}

    def validate(self) -> None:
        if not self.data.train and not self.data.shar_dir:
            raise ConfigError("config key 'data.train' (manifests) or 'data.shar_dir' must be set")
        if predicts_units(self.objective.name):
            if not self.data.units:
                raise ConfigError(f"objective '{self.objective.name}' predicts units: set 'data.units' to the label "
                                  "set names stored on the cuts (speechssl label --name NAME)")
            nc = self.objective.kwargs.get("num_classes")
            if nc is None:
                raise ConfigError(f"objective '{self.objective.name}' needs 'objective.kwargs.num_classes' "
                                  "(K of the k-means that labelled the cuts)")
            names = list(nc) if isinstance(nc, dict) else (["kmeans"] if isinstance(nc, int) else None)
            if isinstance(nc, dict):
                missing = [n for n in names if n not in self.data.units]
                if missing:
                    raise ConfigError(f"config key 'objective.kwargs.num_classes' names label sets {missing} that are "
                                      f"not in 'data.units' {self.data.units}")


# --------------------------------------------------------------------------------------------- building
def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    """Encoder + objective (an ``Objective``: ``forward(batch) -> StepOutput``, see ``speechssl.train.contract``)."""
    from speechssl.models import build_encoder
    from speechssl.models.objectives import OBJECTIVES, build_objective

    try:
        encoder = build_encoder(cfg.model.preset, **cfg.model.overrides)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(f"config key 'model.preset'/'model.overrides': cannot build encoder "
                          f"{cfg.model.preset!r}: {e}") from e
    if cfg.model.init_from:
        from speechssl.models.io import load_pretrained

        src = load_pretrained(cfg.model.init_from)
        missing, unexpected = encoder.load_state_dict(src.state_dict(), strict=False)
        if missing or unexpected:
            raise ConfigError(f"config key 'model.init_from': {cfg.model.init_from} does not match the encoder "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    key = "objective.name" if cfg.objective.name not in OBJECTIVES else "objective.kwargs"
    try:
        return build_objective(cfg.objective.name, encoder, **cfg.objective.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{key}' (objective '{cfg.objective.name}'): {e}") from e


def _dataset(cfg: PretrainConfig, encoder, seed: int, train: bool):
    return build_dataset(cfg.data, num_frames=encoder.num_frames, downsample_rate=encoder.downsample_rate, seed=seed,
                         train=train)


def build_train_loader(cfg: PretrainConfig, encoder):
    """The resumable training loader; call after the process group exists (the sampler shards by rank)."""
    return build_loader(cfg.data, _dataset(cfg, encoder, cfg.trainer.seed, train=True), seed=cfg.trainer.seed,
                        num_workers=cfg.trainer.num_workers)


def _make_loss_evaluate(cfg: PretrainConfig, encoder):
    """Validation: the objective's logs averaged over up to ``data.max_valid_batches`` batches, weighted by
    sample size (the trainer runs it on the main process with the RNG forked, under no_grad/eval)."""
    loader = build_loader(cfg.data, _dataset(cfg, encoder, 0, train=False), seed=0, shuffle=False, split="valid",
                          rank=0, world_size=1)

    def evaluate(model) -> dict[str, float]:
        from speechssl.train.runtime import move_to_device

        device = next(model.parameters()).device
        sums: dict[str, float] = {}
        total = 0.0
        loader.set_epoch(0)
        for i, batch in enumerate(loader):
            if i >= cfg.data.max_valid_batches:
                break
            out = model(move_to_device(batch, device))
            w = out.weight() if out.sample_size is not None else 1.0
            logs = {**out.scalar_logs(), "loss": float(out.loss)}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * w
            total += w
        return {k: v / total for k, v in sums.items()} if total else {}

    return evaluate


def _diagnostics(cfg: PretrainConfig, encoder, metrics_path: Path) -> RunDiagnostics:
    """The run's collapse diagnostics: the fixed batch from the first cuts of ``data.valid`` (else of the training
    data), read whole and clean, and the unit label sets the objective predicts."""
    d = cfg.data
    whole = replace(d, crop_to_shortest=False, max_crop_seconds=None)

    def make_batch(cuts: list) -> dict:
        return build_dataset(whole, num_frames=encoder.num_frames, downsample_rate=encoder.downsample_rate, seed=0,
                             train=False)[cuts]

    return RunDiagnostics(cfg.diagnostics, max_steps=cfg.trainer.max_steps, metrics_path=metrics_path,
                          label_sets=list(d.units) if predicts_units(cfg.objective.name) else [],
                          source_cuts=lambda: split_cuts(d, "valid" if d.valid else "train"), make_batch=make_batch)


def _make_evaluate(cfg: PretrainConfig, encoder, out_dir: Path, step_of):
    """The trainer's evaluate callback: loss validation on ``data.valid`` (when set) plus, at the steps
    ``diagnostics.every`` selects, the collapse diagnostics (``step_of()`` gives the trainer's step). None when
    there is nothing to evaluate: no ``data.valid`` and neither diagnostics nor ``trainer.eval_every``."""
    loss_eval = _make_loss_evaluate(cfg, encoder) if cfg.data.valid else None
    # without data.valid and trainer.eval_every 0 there was no evaluation before: keep it so (no extra records)
    diag = (_diagnostics(cfg, encoder, Path(out_dir) / "metrics.jsonl")
            if cfg.diagnostics.enabled and (cfg.data.valid or cfg.trainer.eval_every) else None)
    if loss_eval is None and diag is None:
        return None

    def evaluate(model) -> dict[str, float]:
        out = loss_eval(model) if loss_eval is not None else {}
        step = step_of()
        if diag is not None and diag.due(step):
            out.update(diag(model, step))
        return out

    return evaluate


def _save_final(cfg: PretrainConfig):
    def save(model, out: Path) -> None:
        from speechssl.models.io import export_pretrained

        head = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        export_pretrained(model.encoder, out, format="speechssl",
                          meta={"objective": cfg.objective.name, "objective_kwargs": to_dict(cfg.objective.kwargs),
                                "steps": cfg.trainer.max_steps, "units": list(cfg.data.units)},
                          parts={"objective": head} if head else None)

    return save


INPUT_STATS_CUTS = 200  # cuts read for the corpus-level log-mel statistics (evenly spread over the first 4x)


@torch.no_grad()
def set_input_statistics(cfg: PretrainConfig, encoder) -> None:
    """Fill the fbank front end's corpus statistics (``input_norm: global``) from the training cuts: per-bin mean
    and standard deviation of the raw log-mel frames of up to ``INPUT_STATS_CUTS`` cuts. Deterministic (no
    sampling), so every rank computes the same values; skipped when the weights come from ``model.init_from``."""
    from itertools import islice

    from speechssl.data.audio import BadCutError, load_cut_audio
    from speechssl.models.components import log_mel_fbank

    front = encoder.feature_extractor
    if getattr(front, "input_norm", None) != "global" or cfg.model.init_from:
        return
    head = list(islice(split_cuts(cfg.data, "train"), 4 * INPUT_STATS_CUTS))  # manifests are often sorted by speaker
    cuts = head[:: -(-len(head) // INPUT_STATS_CUTS) or 1]
    total = torch.zeros(front.n_mels, dtype=torch.float64)
    sq = torch.zeros_like(total)
    frames = 0
    for cut in cuts:
        try:
            wav = torch.from_numpy(load_cut_audio(cut))[None]
        except BadCutError:
            continue  # the loader counts and reports bad cuts; statistics need only the good ones
        x = log_mel_fbank(wav, front.n_mels, filters=front.mel_filters)[0].double()
        total += x.sum(0)
        sq += (x * x).sum(0)
        frames += x.shape[0]
    if frames == 0:
        raise ConfigError("config key 'data.train': no readable audio among the first training cuts to compute the "
                          "fbank input statistics (model input_norm: global)")
    mean = total / frames
    front.set_input_stats(mean.float(), (sq / frames - mean * mean).clamp_min(0).sqrt().float())
    log.info("fbank input statistics from %d frames of %d cuts", frames, len(cuts))


def steps_for_budget(cfg: PretrainConfig, minutes: float, probe_steps: int = 6) -> int:
    """Optimiser updates that fit in ``minutes`` of wall-clock time on this machine.

    Times ``probe_steps`` updates (after two untimed ones: allocator and worker start-up) of a throwaway copy of
    the model on the run's own first batches, with the RNG state restored afterwards, and divides the budget by
    the median update time plus 5% for logging, evaluations and checkpoints. The run itself then has a fixed
    number of steps, so its schedule, resume and results do not depend on the clock."""
    import statistics
    import time

    if minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.trainer.seed)
        model = build_model(cfg)
        set_input_statistics(cfg, model.encoder)
        model.train()
        loader = build_train_loader(cfg, model.encoder)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
        batches = iter(loader)
        times = []
        for i in range(probe_steps + 2):
            start = time.perf_counter()
            for _ in range(cfg.trainer.grad_accum):
                try:
                    batch = next(batches)
                except StopIteration:  # fewer batches than the probe needs: go round again
                    batches = iter(loader)
                    batch = next(batches)
                model(batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - start)
        del model, loader, opt
    per_step = statistics.median(times) * 1.05
    steps = max(1, int(minutes * 60 / per_step))
    log.info("budget %.1f min: %.3f s per update on this machine -> trainer.max_steps=%d", minutes, per_step, steps)
    return steps


def run_pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Pretrain an encoder per ``cfg`` into ``out_dir``; returns the trainer's final logs."""
    torch.manual_seed(cfg.trainer.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg)
    encoder = model.encoder
    set_input_statistics(cfg, encoder)
    n_params = sum(p.numel() for p in encoder.parameters())
    log.info("encoder %s: %.1fM parameters; objective %s", cfg.model.preset, n_params / 1e6, cfg.objective.name)
    held: dict[str, Trainer] = {}  # the evaluate callback reads the trainer's step (diagnostics.every)
    trainer = held["trainer"] = Trainer(
        cfg.trainer, model, out_dir, optim=cfg.optim, schedule=cfg.schedule,
        make_train_loader=lambda: build_train_loader(cfg, encoder),
        evaluate=_make_evaluate(cfg, encoder, Path(out_dir), lambda: held["trainer"].step),
        best_metric="loss" if cfg.data.valid else None, best_mode="min",
        save_final=_save_final(cfg), run_config=cfg,
    )
    return trainer.fit(resume=resume)
