"""The one way from manifests (or Shar shards) to batches, for every job that reads speech.

Pretraining, distillation, pruning, k-means feature extraction and SUPERB read their audio through these steps:

1. ``DataConfig``: the ``data:`` config section of pretraining and compression (one class; a job with other
   defaults passes its own ``default_factory``, see ``DataConfig``);
2. ``open_cuts(paths, key)``: a lazy CutSet over Lhotse manifests (nothing is read until it is iterated);
   ``filter_durations`` drops cuts outside ``[data.min_duration, data.max_cut_duration]``; ``split_cuts`` does
   both for a config's split (its Shar shards when training from ``data.shar_dir``);
3. ``build_dataset(cfg, num_frames=encoder.num_frames, downsample_rate=encoder.downsample_rate, ...)``: the
   ``SpeechDataset`` (padded waveforms, optional fbank/MFCC, unit labels aligned to the encoder's frames, crops
   on the frame grid, augmentation for training only, bad cuts skipped and counted);
4. ``build_loader(cfg, dataset, seed=...)``: duration-bucketed batches of ``data.max_duration`` padded seconds
   per rank, sharded over DDP ranks, with exact mid-epoch resume (``state_dict`` counts the batches consumed):
   ``speechssl.data.sampler.ResumableLoader`` over manifests or ``speechssl.data.shar.ResumableSharLoader``.

Labeled and unlabeled data in one run (UniSpeech): ``data.labeled`` manifests are mixed into the training cuts,
each cut drawn from them with probability ``data.labeled_ratio`` (one Lhotse ``CutSet.mux``,
``speechssl.data.sampler.mix_labeled``). Their batches carry ``labeled`` [B] bool and CTC targets from
``data.labeled_field`` (``ctc_targets`` [B, L] PAD_ID-padded ids, 0 = blank, ``ctc_lens`` [B]) over the vocabulary
of the labeled manifests (``ctc_vocabulary``: its size + 1 is the objective's ``vocab_size``); labeled cuts are
never cropped, so their transcripts stay whole.

Example::

    cfg = DataConfig(train=["data/mini/cuts_pretrain.jsonl.gz"], units=["kmeans"])
    ds = build_dataset(cfg, num_frames=encoder.num_frames, downsample_rate=encoder.downsample_rate, seed=0,
                       train=True)
    loader = build_loader(cfg, ds, seed=0, num_workers=2)
    for batch in loader: ...            # batch["audio"] [B, T], batch["units"]["kmeans"] [B, T']
    state = loader.state_dict()         # later: a new loader's load_state_dict(state) continues exactly
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from speechssl.config import ConfigError
from speechssl.constants import SAMPLE_RATE
from speechssl.data.augment import AugmentConfig
from speechssl.data.dataset import CtcField, Features, SpeechDataset, ctc_vocabulary
from speechssl.data.sampler import DurationFilter, mix_labeled

__all__ = ["DataConfig", "open_cuts", "filter_durations", "DurationFilter", "split_cuts", "labeled_cuts",
           "build_dataset", "build_loader"]


@dataclass
class DataConfig:
    """The ``data:`` section: where the cuts are, which ones are used, and how batches are cut.

    The defaults are pretraining's (fairseq HuBERT). Compression keeps whole utterances: its config declares
    ``data: DataConfig = field(default_factory=...)`` returning ``DataConfig(crop_to_shortest=False,
    max_crop_seconds=None, max_duration=60.0, skip_bad=False, ...)``.
    """

    train: list[str] = field(default_factory=list)   # CutSet manifests (jsonl.gz); chained in order
    valid: list[str] = field(default_factory=list)   # optional validation manifests
    shar_dir: str | None = None                      # Lhotse Shar shards instead of ``train`` manifests
    max_duration: float = 200.0                      # padded seconds of audio per batch and rank
    num_buckets: int = 10                            # duration buckets (fewer when there are fewer cuts)
    min_duration: float = 0.0                        # drop shorter cuts (fairseq min_sample_size 2 s)
    max_cut_duration: float | None = None            # drop longer cuts
    crop_to_shortest: bool = True                    # crop each batch to its shortest cut (fairseq); else pad
    max_crop_seconds: float | None = 15.625          # crop longer cuts (fairseq: 250k samples); null/0 = no crop
    units: list[str] = field(default_factory=list)   # unit label sets on the cuts (speechssl label --name)
    features: Features = "waveform"                  # extra features in the batch: none, fbank or mfcc
    skip_bad: bool = True                            # skip unreadable cuts (counted) instead of failing
    max_valid_batches: int = 20                      # validation batches per evaluation
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # label-preserving augmentation (off)
    labeled: list[str] = field(default_factory=list)  # transcribed manifests mixed into training (UniSpeech)
    labeled_ratio: float = 0.5                       # share of training cuts drawn from data.labeled
    labeled_field: CtcField = "phones"               # CTC targets of labeled cuts: phones (symbols) | text (chars)

    def validate(self) -> None:
        if self.max_duration <= 0:
            raise ConfigError(f"config key 'data.max_duration' must be > 0, got {self.max_duration}")
        for key in ("num_buckets", "max_valid_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'data.{key}' must be >= 1, got {getattr(self, key)}")
        if self.min_duration < 0:
            raise ConfigError(f"config key 'data.min_duration' must be >= 0, got {self.min_duration}")
        if self.max_cut_duration is not None and self.max_cut_duration <= self.min_duration:
            raise ConfigError(f"config key 'data.max_cut_duration' ({self.max_cut_duration}) must be above "
                              f"'data.min_duration' ({self.min_duration}), or null for no upper limit")
        if self.labeled and not 0.0 < self.labeled_ratio < 1.0:
            raise ConfigError(f"config key 'data.labeled_ratio' must be in (0, 1), got {self.labeled_ratio}")
        if self.labeled and not self.train:
            raise ConfigError("config key 'data.labeled' mixes into 'data.train' manifests: set data.train (Shar "
                              "shards from data.shar_dir are not mixed)")
        if self.max_crop_seconds is not None and self.max_crop_seconds < 0:
            raise ConfigError(f"config key 'data.max_crop_seconds' must be >= 0 (0 or null = no crop), "
                              f"got {self.max_crop_seconds}")

    @property
    def max_crop_samples(self) -> int | None:
        """``max_crop_seconds`` in samples, None for no crop."""
        return int(self.max_crop_seconds * SAMPLE_RATE) if self.max_crop_seconds else None


# ---------------------------------------------------------------------------------------------------- cuts
def _subject(key: str) -> str:
    """How an error names ``key``: a dotted config key ('data.train') or a function argument ('cuts')."""
    return f"config key '{key}'" if "." in key else f"argument '{key}'"


def open_cuts(paths, key: str = "data.train"):
    """A lazy CutSet over one manifest or several chained in order (nothing is read until it is iterated).

    ``paths``: a manifest path, a list of them, a CutSet (returned as it is) or a list of cuts. ``key`` names
    the config key or argument the paths came from in errors (``data.train``, ``data.valid``, ``cuts``); a
    missing file or an empty list is a ConfigError naming it.
    """
    from lhotse import CutSet

    if isinstance(paths, CutSet):
        return paths
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if paths and not isinstance(paths[0], (str, os.PathLike)):
        return CutSet.from_cuts(paths)
    if not paths:
        raise ConfigError(f"{_subject(key)} lists no manifest: give at least one CutSet manifest (jsonl.gz)")
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"{_subject(key)}: manifest not found: {p}")
    return CutSet.from_files([str(p) for p in paths]) if len(paths) > 1 else CutSet.from_file(paths[0])


def filter_durations(cuts, min_duration: float = 0.0, max_duration: float | None = None):
    """``cuts`` without those shorter than ``min_duration`` or longer than ``max_duration`` seconds (the config's
    ``data.min_duration`` and ``data.max_cut_duration``), lazily: a lazy CutSet stays lazy."""
    keep = DurationFilter(min_duration, max_duration)
    return cuts.filter(keep) if keep.active else cuts


def split_cuts(cfg: DataConfig, split: Literal["train", "valid"] = "train"):
    """The cuts of a split in manifest (or shard) order, duration-filtered, lazily: ``data.valid``, or for
    ``train`` the ``data.train`` manifests, else the ``data.shar_dir`` shards (cut metadata and audio)."""
    if split == "valid" or cfg.train:
        cuts = open_cuts(cfg.valid if split == "valid" else cfg.train, f"data.{split}")
        return filter_durations(cuts, cfg.min_duration, cfg.max_cut_duration)
    if not cfg.shar_dir:
        raise ConfigError("config key 'data.train' (manifests) or 'data.shar_dir' (Shar shards) must be set")
    from speechssl.data.shar import open_shar_cuts

    try:
        cuts = open_shar_cuts(_shar_dir(cfg), split_for_dataloading=False, shuffle_shards=False)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'data.shar_dir': {e}") from e
    return filter_durations(cuts, cfg.min_duration, cfg.max_cut_duration)


def labeled_cuts(cfg: DataConfig):
    """The ``data.labeled`` cuts, duration-filtered like the training cuts, lazily."""
    return filter_durations(open_cuts(cfg.labeled, "data.labeled"), cfg.min_duration, cfg.max_cut_duration)


def _shar_dir(cfg: DataConfig) -> str:
    if not Path(cfg.shar_dir).is_dir():
        raise ConfigError(f"config key 'data.shar_dir': not a directory: {cfg.shar_dir}")
    return cfg.shar_dir


# ------------------------------------------------------------------------------------------------- batches
def build_dataset(cfg: DataConfig, *, num_frames: Callable[[torch.Tensor], torch.Tensor] | None,
                  downsample_rate: int, seed: int, train: bool, fields: Sequence[str] = ()) -> SpeechDataset:
    """The ``SpeechDataset`` of ``cfg``: ``data.features``, ``data.units`` aligned to the encoder's frames
    (``num_frames`` = ``encoder.num_frames``, ``downsample_rate`` = ``encoder.downsample_rate``), crops
    (``data.crop_to_shortest``, ``data.max_crop_seconds``) on the frame grid, ``data.skip_bad``, and
    ``data.augment`` when ``train`` (validation and diagnostics see clean audio). ``fields``: supervision
    fields every cut must have."""
    augment = None
    if train:
        from speechssl.data.augment import build_augmenter

        try:
            augment = build_augmenter(cfg.augment)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config key 'data.augment': {e}") from e
    ctc = {}
    if train and cfg.labeled:  # only training batches mix labeled cuts in
        ctc = {"ctc_field": cfg.labeled_field, "ctc_vocab": ctc_vocabulary(labeled_cuts(cfg), cfg.labeled_field)}
    return SpeechDataset(mode=cfg.features, units=cfg.units, num_frames=num_frames, downsample_rate=downsample_rate,
                         crop_to_shortest=cfg.crop_to_shortest, max_crop_samples=cfg.max_crop_samples,
                         fields=fields, skip_bad=cfg.skip_bad, augment=augment, seed=seed, **ctc)


def build_loader(cfg: DataConfig, dataset, *, seed: int, num_workers: int = 0, shuffle: bool = True,
                 split: Literal["train", "valid"] = "train", rank: int | None = None, world_size: int | None = None):
    """The resumable loader over a split: batches of ``data.max_duration`` padded seconds from
    ``data.num_buckets`` duration buckets, read by ``dataset``.

    ``train`` reads ``data.train`` manifests (with ``data.labeled`` mixed in), else ``data.shar_dir`` shards;
    ``valid`` reads ``data.valid``.
    ``rank``/``world_size`` default to torch.distributed's (call after the process group exists): each rank
    gets its own share of the epoch. The loader is a ``ResumableLoader`` (manifests) or ``ResumableSharLoader``
    (Shar): ``for batch in loader`` is one epoch, ``state_dict``/``load_state_dict`` resume exactly, and bad
    cuts the dataset skipped are counted in ``loader.skipped`` and logged when a pass ends.
    """
    from speechssl.data.sampler import ResumableLoader, make_sampler

    if split == "train" and not cfg.train and cfg.shar_dir:
        from speechssl.data.shar import make_resumable_shar_loader

        shar_dir = _shar_dir(cfg)
        try:
            return make_resumable_shar_loader(
                shar_dir, dataset, max_duration=cfg.max_duration, num_workers=num_workers, seed=seed, rank=rank,
                world_size=world_size, shuffle=shuffle, num_buckets=cfg.num_buckets,
                min_duration=cfg.min_duration, max_cut_duration=cfg.max_cut_duration)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config key 'data.shar_dir': {e}") from e
    cuts = split_cuts(cfg, split)
    if split == "train" and cfg.labeled:
        cuts = mix_labeled(cuts, labeled_cuts(cfg), cfg.labeled_ratio, seed)
    sampler = make_sampler(cuts, max_duration=cfg.max_duration, num_buckets=cfg.num_buckets,
                           shuffle=shuffle, seed=seed, world_size=world_size, rank=rank)
    return ResumableLoader(sampler, dataset, num_workers=num_workers)
