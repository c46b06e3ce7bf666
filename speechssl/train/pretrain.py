"""``speechssl pretrain``: config schema and the glue from manifests + encoder + objective to the Trainer.

``run_pretrain(cfg, out_dir, resume)`` builds

- the encoder from ``model.preset`` (a preset name such as ``tiny_hubert`` or a ``conf/model/*.yaml`` path)
  with ``model.overrides``, optionally initialised from ``model.init_from`` (any ``load_pretrained`` path);
- the objective with ``speechssl.models.objectives.build_objective(objective.name, encoder, **objective.kwargs)``;
- the training data: Lhotse manifests (``data.train``, jsonl.gz, several are chained) or Shar shards
  (``data.shar_dir``, streamed per rank and worker, resumable exactly), a duration-bucketing sampler (``data.max_duration`` padded seconds per batch per rank)
  and ``SpeechDataset`` (crops on the encoder frame grid, units aligned to encoder frames), wrapped in the
  resumable loader; ``data.valid`` manifests feed a periodic validation pass;
- the ``Trainer``, which writes ``EXP/config.yaml``, ``EXP/metrics.jsonl``, ``EXP/checkpoints/`` and
  ``EXP/final/`` (the encoder via ``export_pretrained(format="speechssl")``, the objective head as part
  ``objective``; ``speechssl.load_pretrained(EXP/final)`` loads it).

Example::

    cfg = load_config(PretrainConfig, "conf/pretrain/mini_hubert_iter1.yaml", ["trainer.max_steps=50"])
    logs = run_pretrain(cfg, "exp/hubert_iter1")
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speechssl.config import ConfigError, to_dict
from speechssl.data.augment import AugmentConfig
from speechssl.train.optim import OptimConfig, ScheduleConfig
from speechssl.train.trainer import Trainer, TrainerConfig

__all__ = ["PretrainConfig", "DataConfig", "ModelConfig", "ObjectiveConfig", "run_pretrain", "build_model",
           "build_train_loader", "UNIT_OBJECTIVES"]
log = logging.getLogger(__name__)

UNIT_OBJECTIVES = ("hubert", "wavlm")  # objectives that predict k-means units stored on the cuts


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)   # CutSet manifests (jsonl.gz); chained in order
    valid: list[str] = field(default_factory=list)   # optional validation manifests
    shar_dir: str | None = None                      # Lhotse Shar shards instead of ``train`` manifests
    max_duration: float = 200.0                      # padded seconds of audio per batch and rank
    num_buckets: int = 10
    min_duration: float = 0.0                        # drop shorter cuts (fairseq min_sample_size 2 s)
    max_cut_duration: float | None = None            # drop longer cuts
    crop_to_shortest: bool = True                    # crop each batch to its shortest cut (fairseq)
    max_crop_seconds: float | None = 15.625          # crop longer cuts (fairseq max_sample_size 250k samples)
    units: list[str] = field(default_factory=list)   # unit label sets on the cuts (speechssl label --name)
    features: str = "waveform"                       # waveform | fbank | mfcc: extra features in the batch
    skip_bad: bool = True                            # skip unreadable cuts (counted) instead of failing
    max_valid_batches: int = 20
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # label-preserving augmentation (off)

    def validate(self) -> None:
        if self.max_duration <= 0:
            raise ConfigError(f"config key 'data.max_duration' must be > 0, got {self.max_duration}")
        if self.features not in ("waveform", "fbank", "mfcc"):
            raise ConfigError(f"config key 'data.features' must be waveform|fbank|mfcc, got {self.features!r}")


@dataclass
class ModelConfig:
    preset: str = "tiny_hubert"                      # preset name or conf/model/*.yaml
    overrides: dict[str, Any] = field(default_factory=dict)  # EncoderConfig fields, e.g. {num_layers: 2}
    init_from: str | None = None                     # start from these encoder weights (load_pretrained path)


@dataclass
class ObjectiveConfig:
    name: str = "hubert"                             # hubert | wav2vec2 | wavlm | bestrq
    kwargs: dict[str, Any] = field(default_factory=dict)  # build_objective keyword arguments


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        if not self.data.train and not self.data.shar_dir:
            raise ConfigError("config key 'data.train' (manifests) or 'data.shar_dir' must be set")
        if self.objective.name in UNIT_OBJECTIVES:
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
            elif isinstance(nc, int) and len(self.data.units) == 1 and self.data.units[0] != "kmeans":
                # a bare K with one label set: key it by that set's name
                self.objective.kwargs["num_classes"] = {self.data.units[0]: nc}


# --------------------------------------------------------------------------------------------- building
def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    """Encoder + objective (an ``Objective`` whose ``forward(batch) -> (loss, logs)``)."""
    from speechssl.models import build_encoder
    from speechssl.models.objectives import build_objective

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
    try:
        return build_objective(cfg.objective.name, encoder, **cfg.objective.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'objective.kwargs' (objective '{cfg.objective.name}'): {e}") from e


def _open_cuts(paths: list[str], what: str):
    from lhotse import CutSet

    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"config key 'data.{what}': manifest not found: {p}")
    return CutSet.from_files([str(p) for p in paths]) if len(paths) > 1 else CutSet.from_file(paths[0])


def _filter(cuts, cfg: DataConfig):
    lo, hi = cfg.min_duration, cfg.max_cut_duration
    if lo <= 0 and hi is None:
        return cuts
    return cuts.filter(lambda c: c.duration >= lo and (hi is None or c.duration <= hi))


def _dataset(cfg: PretrainConfig, encoder, seed: int, train: bool):
    from speechssl.data.dataset import SpeechDataset

    d = cfg.data
    augment = None
    if train:
        from speechssl.data.augment import build_augmenter

        try:
            augment = build_augmenter(d.augment)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config key 'data.augment': {e}") from e
    return SpeechDataset(
        None, mode=d.features, units=d.units, num_frames=encoder.num_frames,
        frame_rate=16000 / encoder.downsample_rate, crop_to_shortest=d.crop_to_shortest,
        max_crop_samples=int(d.max_crop_seconds * 16000) if d.max_crop_seconds else None,
        crop_multiple=encoder.downsample_rate, skip_bad=d.skip_bad, augment=augment, seed=seed,
    )


def build_train_loader(cfg: PretrainConfig, encoder):
    """The resumable training loader; call after the process group exists (the sampler shards by rank)."""
    from speechssl.data.sampler import ResumableLoader, make_sampler

    d = cfg.data
    if d.shar_dir:
        from speechssl.data.shar import make_resumable_shar_loader

        if not Path(d.shar_dir).is_dir():
            raise ConfigError(f"config key 'data.shar_dir': not a directory: {d.shar_dir}")
        try:
            return make_resumable_shar_loader(
                d.shar_dir, _dataset(cfg, encoder, cfg.trainer.seed, train=True), max_duration=d.max_duration,
                num_workers=cfg.trainer.num_workers, seed=cfg.trainer.seed, num_buckets=d.num_buckets,
                min_duration=d.min_duration, max_cut_duration=d.max_cut_duration)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config key 'data.shar_dir': {e}") from e
    cuts = _open_cuts(d.train, "train")
    cuts = _filter(cuts, d)
    sampler = make_sampler(cuts, max_duration=d.max_duration, num_buckets=d.num_buckets, shuffle=True,
                           seed=cfg.trainer.seed, drop_last=False)
    return ResumableLoader(sampler, _dataset(cfg, encoder, cfg.trainer.seed, train=True),
                           num_workers=cfg.trainer.num_workers)


def _make_evaluate(cfg: PretrainConfig, encoder):
    """Validation: the objective's logs averaged over up to ``data.max_valid_batches`` batches, weighted by
    sample size (the trainer runs it on the main process with the RNG forked, under no_grad/eval)."""
    if not cfg.data.valid:
        return None
    from speechssl.data.sampler import ResumableLoader, make_sampler

    cuts = _filter(_open_cuts(cfg.data.valid, "valid"), cfg.data)
    sampler = make_sampler(cuts, max_duration=cfg.data.max_duration, num_buckets=cfg.data.num_buckets,
                           shuffle=False, seed=0, world_size=1, rank=0)
    loader = ResumableLoader(sampler, _dataset(cfg, encoder, 0, train=False), num_workers=0)

    def evaluate(model) -> dict[str, float]:
        from speechssl.train.trainer import move_to_device

        device = next(model.parameters()).device
        sums: dict[str, float] = {}
        total = 0.0
        loader.set_epoch(0)
        for i, batch in enumerate(loader):
            if i >= cfg.data.max_valid_batches:
                break
            batch = move_to_device(batch, device)
            loss, logs = model(batch)
            w = float(model.sample_size(batch)) if hasattr(model, "sample_size") else 1.0
            logs = dict(logs)
            logs["loss"] = float(loss)
            for k, v in logs.items():
                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
                    sums[k] = sums.get(k, 0.0) + float(v) * w
            total += w
        return {k: v / total for k, v in sums.items()} if total else {}

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


def run_pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Pretrain an encoder per ``cfg`` into ``out_dir``; returns the trainer's final logs."""
    torch.manual_seed(cfg.trainer.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg)
    encoder = model.encoder
    n_params = sum(p.numel() for p in encoder.parameters())
    log.info("encoder %s: %.1fM parameters; objective %s", cfg.model.preset, n_params / 1e6, cfg.objective.name)
    trainer = Trainer(
        cfg.trainer, model, out_dir, optim=cfg.optim, schedule=cfg.schedule,
        make_train_loader=lambda: build_train_loader(cfg, encoder),
        evaluate=_make_evaluate(cfg, encoder), best_metric="loss" if cfg.data.valid else None, best_mode="min",
        save_final=_save_final(cfg), run_config=cfg,
    )
    return trainer.fit(resume=resume)
