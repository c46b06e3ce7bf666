"""Knowledge distillation of speech encoders: DistilHuBERT and layer-to-layer (DPHuBERT) distillation.

(``loss.method: recycle`` runs Recycle-and-Distill from :mod:`speechssl.compress.recycle` through the same
config, loader and Trainer glue.)

* DistilHuBERT (`build_distilhubert_student` + `HeadDistiller`): the student is the teacher's CNN front end,
  feature projection, positional convolution and first N transformer layers (weights copied); one MLP
  prediction head per chosen teacher layer reads the student's last layer.
* Layer-to-layer (`LayerDistiller`): student layer i regresses teacher layer j through an identity-initialised
  linear map, as DPHuBERT does (the pruning objective in `prune.py` builds on it).

Both losses are L1 + a cosine term, averaged over VALID frames only: padded frames never enter the loss. Both
distillers are Trainer models (``speechssl.train.contract``): ``forward(batch) -> StepOutput`` (no sample size:
every micro-batch weighs the same) and the ``shared_layerdrop`` capability for the student's layer-drop.
The teacher is frozen, in eval mode, run under ``torch.no_grad``, and is kept out of the module tree so it
is neither optimised nor written into checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from speechssl.config import ConfigError
from speechssl.data.loader import DataConfig, build_dataset, build_loader
from speechssl.train.contract import StepOutput
from speechssl.train.optim import OptimConfig, ScheduleConfig
from speechssl.train.trainer import TrainerConfig

from .kd import FrozenTeacher, _check_frames, _StudentLayerDrop, distill_loss, identity_maps, valid_frame_mask

logger = logging.getLogger(__name__)

__all__ = [
    "distill_loss", "FrozenTeacher", "build_distilhubert_student", "copy_encoder_weights", "copy_teacher",
    "PredictionHeads", "HeadDistiller", "LayerDistiller", "valid_frame_mask", "compress_data_config",
    "DistillConfig", "load_teacher", "build_distill_model", "run_distill", "export_student",
]


def copy_encoder_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every ``dst`` parameter/buffer from the same name in ``src``; all of dst's keys must be found."""
    src_sd = src.state_dict()
    dst_sd = dst.state_dict()
    missing = [k for k in dst_sd if k not in src_sd]
    wrong = [k for k in dst_sd if k in src_sd and src_sd[k].shape != dst_sd[k].shape]
    if missing or wrong:
        raise ValueError(f"cannot initialise the student from the teacher: missing {missing[:5]}, "
                         f"shape mismatch {wrong[:5]}")
    dst.load_state_dict({k: src_sd[k].detach().clone() for k in dst_sd}, strict=True)


def build_distilhubert_student(teacher: nn.Module, num_layers: int = 2, feature_grad_mult: float = 0.1,
                               **overrides) -> nn.Module:
    """DistilHuBERT student: the teacher's front end, projection, positional conv and first ``num_layers`` layers.

    Args:
        teacher: an ``Encoder`` (any model type; WavLM's relative position bias is copied with layer 0).
        num_layers: transformer layers the student keeps (2 in DistilHuBERT).
        feature_grad_mult: gradient scale into the CNN (0.1 in DistilHuBERT).
        overrides: further EncoderConfig fields (e.g. dropout=0.1).
    Returns:
        a new Encoder in train mode whose weights are copies of the teacher's.
    """
    from speechssl.models.encoder import build_encoder

    cfg = teacher.config
    if not 1 <= num_layers <= cfg.num_layers:
        raise ValueError(f"student num_layers must lie in [1, {cfg.num_layers}] (the teacher's depth), got {num_layers}")
    # layer-drop off: a skipped layer would break the layer-to-target correspondence
    changes = dict(num_layers=num_layers, feature_grad_mult=feature_grad_mult, layerdrop=0.0)
    if cfg.layer_heads is not None:
        changes["layer_heads"] = [list(h) for h in cfg.layer_heads[:num_layers]]
    if cfg.layer_ffn_dims is not None:
        changes["layer_ffn_dims"] = list(cfg.layer_ffn_dims[:num_layers])
    changes.update(overrides)
    student = build_encoder(dataclasses.replace(cfg, **changes))
    copy_encoder_weights(teacher, student)
    return student.train()


class PredictionHeads(nn.Module):
    """One MLP per target teacher layer, each reading the student's last hidden state.

    ``forward(x [B, T', D_s]) -> list of [B, T', D_t]`` in the order of ``targets``.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
            for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [h(x) for h in self.heads]


class HeadDistiller(_StudentLayerDrop, nn.Module):
    """DistilHuBERT objective: ``forward(batch) -> StepOutput`` for the Trainer.

    Args:
        student: the student Encoder (trainable).
        teacher: the teacher Encoder (frozen here).
        target_layers: teacher layers to predict (indices into hidden_states; 4/8/12 for HuBERT Base).
        cos_weight, cos_type: see `distill_loss`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, target_layers: Sequence[int] = (4, 8, 12),
                 cos_weight: float = 1.0, cos_type: str = "logsig", head_hidden_dim: int | None = None):
        super().__init__()
        self.teacher = FrozenTeacher(teacher)
        bad = [j for j in target_layers if not 0 <= j <= self.teacher.num_layers]
        if bad or not target_layers:
            raise ValueError(f"target_layers {list(target_layers)} must be non-empty and lie in "
                             f"[0, {self.teacher.num_layers}] (the teacher has {self.teacher.num_layers} layers)")
        self.student = student
        self.target_layers = list(target_layers)
        self.heads = PredictionHeads(student.hidden_size, self.teacher.hidden_size, len(self.target_layers),
                                     head_hidden_dim)
        self.cos_weight, self.cos_type = cos_weight, cos_type

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S], ``audio_lens`` [B]; sum over target layers of L1 + cosine on valid frames."""
        wav, lens = batch["audio"], batch.get("audio_lens")
        t_out = self.teacher(wav, lens)
        s_out = self.student(wav, lens)
        valid = _check_frames(s_out, t_out)
        # pre-LN students: the final LayerNorm belongs to the student's output (last_hidden_state)
        last = s_out.last_hidden_state if s_out.last_hidden_state is not None else s_out.hidden_states[-1]
        preds = self.heads(last)
        total = wav.new_zeros(())
        logs: dict[str, float] = {}
        for j, pred in zip(self.target_layers, preds):
            loss, l1, cos = distill_loss(pred, t_out.hidden_states[j], valid, cos_weight=self.cos_weight,
                                         cos_type=self.cos_type)
            total = total + loss
            logs[f"l1_{j}"], logs[f"cos_{j}"] = l1.item(), cos.item()
        logs["loss"] = total.item()
        return StepOutput(total, logs)


class LayerDistiller(_StudentLayerDrop, nn.Module):
    """Layer-to-layer distillation (DPHuBERT): student hidden state i -> teacher hidden state j.

    Each pair has a linear map initialised to the identity (on the shared dims), so a student that starts
    as a copy of the teacher starts at zero loss. ``gates`` (an `EncoderGates` or a callable returning one)
    are passed to the student's forward when given, which the pruning objective uses.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: Sequence[int] = (0, 4, 8, 12),
                 teacher_layers: Sequence[int] | None = None, cos_weight: float = 1.0, cos_type: str = "neg"):
        super().__init__()
        self.teacher = FrozenTeacher(teacher)
        teacher_layers = list(teacher_layers) if teacher_layers is not None else list(student_layers)
        if len(teacher_layers) != len(student_layers) or not student_layers:
            raise ValueError(f"student_layers {list(student_layers)} and teacher_layers {teacher_layers} "
                             "must be non-empty and of equal length")
        bad_s = [i for i in student_layers if not 0 <= i <= student.num_layers]
        bad_t = [j for j in teacher_layers if not 0 <= j <= self.teacher.num_layers]
        if bad_s or bad_t:
            raise ValueError(f"layer indices out of range: student {bad_s} (max {student.num_layers}), "
                             f"teacher {bad_t} (max {self.teacher.num_layers})")
        self.student = student
        self.student_layers, self.teacher_layers = list(student_layers), teacher_layers
        self.maps = identity_maps(student.hidden_size, self.teacher.hidden_size, len(student_layers))
        self.cos_weight, self.cos_type = cos_weight, cos_type

    def student_forward(self, wav: torch.Tensor, lens: torch.Tensor | None):
        return self.student(wav, lens)

    def distill(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(summed L1 + cosine over the layer pairs on valid frames, logs) for ``audio`` [B, S], ``audio_lens`` [B]."""
        wav, lens = batch["audio"], batch.get("audio_lens")
        t_out = self.teacher(wav, lens)
        s_out = self.student_forward(wav, lens)
        valid = _check_frames(s_out, t_out)
        total = wav.new_zeros(())
        logs: dict[str, float] = {}
        for i, j, m in zip(self.student_layers, self.teacher_layers, self.maps):
            loss, l1, cos = distill_loss(m(s_out.hidden_states[i]), t_out.hidden_states[j], valid,
                                         cos_weight=self.cos_weight, cos_type=self.cos_type)
            total = total + loss
            logs[f"l1_{j}"], logs[f"cos_{j}"] = l1.item(), cos.item()
        logs["distill_loss"] = total.item()
        return total, logs

    def forward(self, batch: dict) -> StepOutput:
        loss, logs = self.distill(batch)
        logs["loss"] = loss.item()
        return StepOutput(loss, logs)


def copy_teacher(teacher: nn.Module) -> nn.Module:
    """A trainable deep copy of the teacher (the DPHuBERT student's starting point), layer-drop off."""
    student = copy.deepcopy(teacher)
    student.config.layerdrop = 0.0  # the copy owns its config; layers must line up with the teacher's
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


# ---------------------------------------------------------------------------------------------------------------
# `speechssl distill`: config schema and run glue
# ---------------------------------------------------------------------------------------------------------------
def compress_data_config() -> DataConfig:
    """The ``data:`` defaults of distillation and pruning: whole utterances zero-padded in batches of 60 s (no crop
    to the batch's shortest, no length crop), and an unreadable cut stops the run."""
    return DataConfig(train=["data/mini/cuts_pretrain.jsonl.gz"], max_duration=60.0, crop_to_shortest=False,
                      max_crop_seconds=None, skip_bad=False)


@dataclass
class StudentConfig:
    num_layers: int = 2            # transformer layers copied from the teacher (first N)
    feature_grad_mult: float = 0.1  # gradient scale into the CNN front end
    init: str = ""                 # start from this model instead of the teacher's first layers (optional)
    # recycle method: per layer, the earlier layer whose attention map it reuses, or -1 ([] = ARMHuBERT's
    # alternation: odd layers reuse the map of the layer before them)
    attn_reuse: list[int] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # further EncoderConfig fields, e.g. {dropout: 0.1}


@dataclass
class DistillLossConfig:
    # heads: DistilHuBERT prediction heads | layers: layer-to-layer linear maps | recycle: Recycle-and-Distill
    # (attention-map-reusing student of the teacher's depth, masking distillation; see compress/recycle.py)
    method: Literal["heads", "layers", "recycle"] = "heads"
    target_layers: list[int] = field(default_factory=lambda: [4, 8, 12])  # teacher hidden-state indices
    student_layers: list[int] = field(default_factory=list)  # layers method: student index per target
    cos_weight: float = 1.0
    cos_type: Literal["logsig", "neg"] = "logsig"  # logsig: -log sigmoid(cos) | neg: -cos
    head_hidden_dim: int = 0       # prediction-head MLP width (0 = student hidden size)
    mask_prob: float = 0.8         # recycle: span-mask probability of the student's input
    mask_length: int = 10          # recycle: span length (frames)
    hint_weight: float = 0.1       # recycle: weight of every target layer but the last (which weighs 1)

    def validate(self) -> None:
        if self.method == "layers" and self.student_layers and len(self.student_layers) != len(self.target_layers):
            raise ConfigError("config keys 'loss.student_layers' and 'loss.target_layers' must have equal length")


def _default_optim() -> OptimConfig:
    return OptimConfig(lr=2e-4, weight_decay=0.0)


def _default_schedule() -> ScheduleConfig:
    return ScheduleConfig(name="linear", warmup_ratio=0.07)


@dataclass
class DistillConfig:
    teacher: str = ""              # model dir (ours or HF), fairseq .pt, or preset:NAME (random weights)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    data: DataConfig = field(default_factory=compress_data_config)
    optim: OptimConfig = field(default_factory=_default_optim)
    schedule: ScheduleConfig = field(default_factory=_default_schedule)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("config key 'teacher' is empty: pass --set teacher=PATH (a model directory or .pt)")
        if not self.data.train and not self.data.shar_dir:
            raise ConfigError("config key 'data.train' (manifests) or 'data.shar_dir' (Shar shards) must be set")


def load_teacher(spec: str, seed: int = 0) -> nn.Module:
    """A frozen teacher from a model path (any `load_pretrained` format) or ``preset:NAME`` (random weights)."""
    if spec.startswith("preset:"):
        from speechssl.models.encoder import build_encoder

        torch.manual_seed(seed)
        return build_encoder(spec[len("preset:"):]).eval()
    if not Path(spec).exists():
        raise ConfigError(f"config key 'teacher': {spec} does not exist (expected a model directory, an HF "
                          "directory or a fairseq .pt)")
    from speechssl.models.io import load_pretrained

    return load_pretrained(spec)


def make_train_loader_factory(data: DataConfig, trainer: TrainerConfig, encoder: nn.Module):
    """``() -> resumable loader`` over the ``data:`` section: waveform batches, crops on ``encoder``'s frame grid
    (the student's or the teacher's: they share the front end)."""

    def factory():
        dataset = build_dataset(data, num_frames=encoder.num_frames, downsample_rate=encoder.downsample_rate,
                                seed=trainer.seed, train=True)
        return build_loader(data, dataset, seed=trainer.seed, num_workers=trainer.num_workers)

    return factory


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """``count`` hidden-state indices spread over 1..num_layers, ending at the last layer (e.g. 12, 3 -> 4 8 12)."""
    return sorted({max(1, round(num_layers * (k + 1) / count)) for k in range(count)})


def _build_student(cfg: DistillConfig, teacher: nn.Module) -> nn.Module:
    """``student.init`` loaded trainable, else the method's student built from the teacher."""
    from speechssl.models.io import load_pretrained

    if cfg.student.init:
        student = load_pretrained(cfg.student.init).train()
        for p in student.parameters():
            p.requires_grad_(True)
        return student
    if cfg.loss.method == "recycle":
        from .recycle import build_recycle_student

        return build_recycle_student(teacher, cfg.student.attn_reuse or None, cfg.student.feature_grad_mult,
                                     **cfg.student.overrides)
    return build_distilhubert_student(teacher, cfg.student.num_layers, cfg.student.feature_grad_mult,
                                      **cfg.student.overrides)


def build_distill_model(cfg: DistillConfig, teacher: nn.Module) -> nn.Module:
    """Student + objective for ``cfg`` (HeadDistiller, LayerDistiller or recycle's MaskingDistiller)."""
    student = _build_student(cfg, teacher)
    bad = [j for j in cfg.loss.target_layers if not 0 <= j <= teacher.num_layers]
    if bad:
        raise ConfigError(f"config key 'loss.target_layers': {bad} out of range for a {teacher.num_layers}-layer "
                          f"teacher (valid 0..{teacher.num_layers})")
    if cfg.loss.method == "recycle":
        from .recycle import MaskingDistiller

        return MaskingDistiller(student, teacher, cfg.loss.target_layers, mask_prob=cfg.loss.mask_prob,
                                mask_length=cfg.loss.mask_length, hint_weight=cfg.loss.hint_weight)
    if cfg.loss.method == "heads":
        return HeadDistiller(student, teacher, cfg.loss.target_layers, cfg.loss.cos_weight, cfg.loss.cos_type,
                             cfg.loss.head_hidden_dim or None)
    s_layers = cfg.loss.student_layers or evenly_spaced_layers(student.num_layers, len(cfg.loss.target_layers))
    if len(s_layers) != len(cfg.loss.target_layers):
        raise ConfigError(f"config key 'loss.student_layers': need {len(cfg.loss.target_layers)} indices for "
                          f"targets {cfg.loss.target_layers} (the student has {student.num_layers} layers)")
    return LayerDistiller(student, teacher, s_layers, cfg.loss.target_layers, cfg.loss.cos_weight, cfg.loss.cos_type)


def export_student(student: nn.Module, out_dir: Path, meta: dict) -> Path:
    """Write the student as a speechssl model directory (self-describing config, strict load)."""
    from speechssl.models.io import export_pretrained

    return export_pretrained(copy.deepcopy(student).float().eval(), out_dir, format="speechssl", meta=meta)


def run_distill(cfg: DistillConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Train a student by distillation into ``out_dir`` (metrics.jsonl, checkpoints/, final/)."""
    from speechssl.train.trainer import Trainer

    out_dir = Path(out_dir)
    teacher = load_teacher(cfg.teacher, cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)  # heads / maps init
    model = build_distill_model(cfg, teacher)
    n_params = sum(p.numel() for p in model.student.parameters())
    logger.info("distill: teacher %d layers, student %d layers, %.2fM student params", teacher.num_layers,
                model.student.num_layers, n_params / 1e6)
    method = {"heads": "distilhubert", "layers": "layer_distill", "recycle": "recycle_and_distill"}[cfg.loss.method]
    meta = {"method": method, "teacher": cfg.teacher,
            "target_layers": list(cfg.loss.target_layers)}
    trainer = Trainer(cfg.trainer, model, out_dir, optim=cfg.optim, schedule=cfg.schedule,
                      make_train_loader=make_train_loader_factory(cfg.data, cfg.trainer, model.student),
                      save_final=lambda m, d: export_student(m.student, d, meta), run_config=cfg)
    return trainer.fit(resume=resume)
