"""OS-KDFT: one-step knowledge distillation and fine-tuning of an SSL encoder for speaker verification.

From the paper (Heo, Lim, Kim, Shin and Yu, "One-Step Knowledge Distillation and Fine-Tuning in Using Large
Pre-Trained Self-Supervised Learning Models for Speaker Verification", Interspeech 2023, arXiv:2305.17394):
distilling an SSL model without regard to the target task keeps information a speaker verifier does not need, so
the student is optimised for speaker verification *during* distillation, in one training run instead of KD then
FT. The student's KD and FT branches are kept apart so that the distillation target and the speaker loss do not
pull the same weights. Reported: a Wav2Vec 2.0 + ECAPA-TDNN system shrunk by about 76.2 % with 79 % less SSL
inference time at 0.98 % EER (VoxCeleb1), validated on VoxCeleb1/2 with W2V2 and HuBERT teachers.

This implementation:

* **Student** (``OskdftStudent``): the teacher's front end and first ``kd_layers`` transformer layers (the lower
  part, the KD branch) followed by copies of the next ``ft_layers`` teacher layers (the upper part, the FT branch)
  and a speaker head (x-vector TDNN, ``speaker_heads.XVectorHead``) trained with AAM-softmax.
* **KD branch**: a linear map (identity initialised) from the lower part's last hidden state regresses teacher
  hidden state ``kd_target`` (L1 + cosine over valid frames, ``distill.distill_loss``). Its loss reaches only the
  lower part and the map.
* **FT branch**: the upper part reads the lower output through a gradient scale ``ft_lower_grad`` (0 = stop
  gradient, the default: the speaker loss trains only the upper part and the head, so the two branches are
  separated; 1 = plain joint training), then the head and AAM-softmax on speaker labels.
* **Schedule** (set by the trainer's step): the FT loss weight rises linearly from 0 to 1 over
  ``ft_warmup_steps`` while the KD weight stays 1, so the head first learns on features the distillation has
  started to shape. The paper's exact learning-rate schedules per branch are not reproduced here.

Inference uses the student alone (``kd_layers + ft_layers`` layers and the head): the KD map and the teacher
are training-only. ``export_oskdft`` writes it as a speechssl model directory plus ``speaker_head.safetensors``;
``speechssl.superb.embeddings`` loads such a directory as an embedding extractor.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from speechssl.compress.distill import (FrozenTeacher, _check_frames, build_distilhubert_student, distill_loss,
                                        load_teacher)
from speechssl.compress.speaker_heads import AAMSoftmax, XVectorHead
from speechssl.config import ConfigError
from speechssl.data.loader import DataConfig, build_dataset, build_loader, open_cuts
from speechssl.train.contract import StepOutput
from speechssl.train.optim import OptimConfig, ScheduleConfig
from speechssl.train.trainer import TrainerConfig

logger = logging.getLogger(__name__)

__all__ = ["OskdftStudent", "OSKDFT", "OskdftConfig", "speaker_ids", "build_oskdft", "export_oskdft",
           "load_oskdft_extractor", "run_oskdft", "HEAD_FILE"]

HEAD_FILE = "speaker_head.safetensors"
"""The speaker head's weights inside an exported OS-KDFT model directory (beside the encoder's)."""


def _scale_grad(x: Tensor, scale: float) -> Tensor:
    """x in the forward pass; its gradient multiplied by ``scale`` in the backward pass (0 = stop gradient)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x * scale + x.detach() * (1.0 - scale)


class OskdftStudent(nn.Module):
    """Lower encoder (KD branch) + upper transformer layers (FT branch) + x-vector head.

    ``forward(wav [B, S], lens [B], ft_lower_grad=1.0) -> (lower EncoderOutput, embeddings [B, embed_dim])``.
    """

    def __init__(self, teacher: nn.Module, kd_layers: int, ft_layers: int, embed_dim: int = 192,
                 head_channels: int = 256):
        super().__init__()
        cfg = teacher.config
        if kd_layers < 1 or ft_layers < 0 or kd_layers + ft_layers > cfg.num_layers:
            raise ConfigError(f"config keys 'student.kd_layers' ({kd_layers}) and 'student.ft_layers' ({ft_layers}) "
                              f"must be >= 1 and >= 0 and sum to at most the teacher's {cfg.num_layers} layers")
        self.lower = build_distilhubert_student(teacher, kd_layers, feature_grad_mult=cfg.feature_grad_mult)
        self.upper = nn.ModuleList(copy.deepcopy(teacher.layers[kd_layers + i]) for i in range(ft_layers))
        # pre-LN stacks end in a LayerNorm; the lower part's own final norm belongs to its (KD) output
        self.upper_norm = copy.deepcopy(teacher.layer_norm) if cfg.layer_norm_first else nn.Identity()
        self.head = XVectorHead(cfg.hidden_size, embed_dim, head_channels)
        for p in self.parameters():
            p.requires_grad_(True)
        self.kd_layers, self.ft_layers = kd_layers, ft_layers

    def forward(self, wav: Tensor, lens: Tensor | None, ft_lower_grad: float = 1.0):
        out = self.lower(wav, lens)
        h = _scale_grad(out.hidden_states[-1], ft_lower_grad)  # [B, T', D]
        pad = out.padding_mask
        key_mask = ~pad if bool(pad.any()) else None
        bias = self.lower.rel_pos(h.shape[1]) if self.lower.rel_pos is not None else None
        for layer in self.upper:
            h, _ = layer(h, key_mask, bias)
        return out, self.head(self.upper_norm(h), pad)


class OSKDFT(nn.Module):
    """The OS-KDFT objective for the Trainer: ``forward(batch) -> StepOutput``.

    batch: ``audio`` [B, S], ``audio_lens`` [B], ``speaker`` (B speaker names, mapped through ``speakers``).
    loss = kd_weight * KD loss + w_ft(step) * AAM-softmax loss, w_ft = min(1, (step + 1) / ft_warmup_steps);
    ``kd_weight`` 0 with ``ft_lower_grad`` 1 is plain fine-tuning (the teacher-plus-head baseline).
    """

    trainer_capabilities = ("step",)

    def __init__(self, student: OskdftStudent, teacher: nn.Module, speakers: dict[str, int], kd_target: int,
                 *, margin: float = 0.2, scale: float = 30.0, ft_lower_grad: float = 0.0, ft_warmup_steps: int = 0,
                 cos_weight: float = 1.0, kd_weight: float = 1.0):
        super().__init__()
        self.teacher = FrozenTeacher(teacher)
        if not 0 <= kd_target <= self.teacher.num_layers:
            raise ConfigError(f"config key 'loss.kd_target' ({kd_target}) must lie in [0, {self.teacher.num_layers}]")
        self.student, self.speakers, self.kd_target = student, dict(speakers), kd_target
        d_s, d_t = student.lower.hidden_size, self.teacher.hidden_size
        self.kd_map = nn.Linear(d_s, d_t)
        with torch.no_grad():  # identity start: a student copied from the teacher starts near the target
            self.kd_map.weight.zero_()
            self.kd_map.weight[: min(d_s, d_t), : min(d_s, d_t)] = torch.eye(min(d_s, d_t))
            self.kd_map.bias.zero_()
        self.aam = AAMSoftmax(student.head.embed.out_features, len(speakers), margin, scale)
        self.ft_lower_grad, self.ft_warmup_steps, self.cos_weight = ft_lower_grad, ft_warmup_steps, cos_weight
        self.kd_weight = kd_weight
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def ft_weight(self) -> float:
        return 1.0 if self.ft_warmup_steps <= 0 else min(1.0, (self.step + 1) / self.ft_warmup_steps)

    def labels(self, names: list) -> Tensor:
        unknown = sorted({n for n in names if n not in self.speakers})
        if unknown:
            raise ValueError(f"speakers {unknown[:3]} are not in the training speaker list: every cut of "
                             "'data.train' needs a supervision 'speaker' seen when the model was built")
        return torch.tensor([self.speakers[n] for n in names], dtype=torch.long)

    def losses(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(KD loss, FT loss, speaker accuracy) of one batch."""
        wav, lens = batch["audio"], batch.get("audio_lens")
        t_out = self.teacher(wav, lens)
        s_out, emb = self.student(wav, lens, self.ft_lower_grad)
        valid = _check_frames(s_out, t_out)
        kd, _, _ = distill_loss(self.kd_map(s_out.hidden_states[-1]), t_out.hidden_states[self.kd_target], valid,
                                cos_weight=self.cos_weight, cos_type="logsig")
        ft, acc = self.aam(emb, self.labels(batch["speaker"]).to(wav.device))
        return kd, ft, acc

    def forward(self, batch: dict) -> StepOutput:
        kd, ft, acc = self.losses(batch)
        w = self.ft_weight()
        loss = self.kd_weight * kd + w * ft
        return StepOutput(loss, {"loss": loss.item(), "kd_loss": kd.item(), "ft_loss": ft.item(), "spk_acc": acc,
                                 "ft_weight": w})


# ---------------------------------------------------------------------------------------------------------------
# `speechssl oskdft`: config schema, run glue, export and loading
# ---------------------------------------------------------------------------------------------------------------
def _data_config() -> DataConfig:
    """Whole speaker-labelled utterances, padded (no crop to the shortest), 60 s per batch."""
    return DataConfig(train=["data/mini/cuts_asv_train.jsonl.gz"], max_duration=60.0, crop_to_shortest=False,
                      max_crop_seconds=3.0, skip_bad=False)


@dataclass
class OskdftStudentConfig:
    kd_layers: int = 2       # lower transformer layers copied from the teacher and distilled (KD branch)
    ft_layers: int = 1       # upper layers copied after them and trained on speakers (FT branch)
    embed_dim: int = 192     # speaker embedding size
    head_channels: int = 256  # x-vector TDNN width


@dataclass
class OskdftLossConfig:
    kd_target: int = -1       # teacher hidden-state index the KD branch regresses (-1 = the teacher's last layer)
    kd_weight: float = 1.0    # weight of the KD loss (0 + ft_lower_grad 1 = plain fine-tuning, the baseline)
    cos_weight: float = 1.0   # weight of the -log sigmoid(cos) term of the KD loss
    margin: float = 0.2       # AAM-softmax margin (radians)
    scale: float = 30.0       # AAM-softmax scale
    ft_lower_grad: float = 0.0  # gradient of the FT loss into the KD branch (0 = separated branches)
    ft_warmup_steps: int = 0  # the FT loss weight rises 0 -> 1 over these updates


@dataclass
class OskdftConfig:
    teacher: str = ""
    student: OskdftStudentConfig = field(default_factory=OskdftStudentConfig)
    loss: OskdftLossConfig = field(default_factory=OskdftLossConfig)
    data: DataConfig = field(default_factory=_data_config)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="linear", warmup_ratio=0.07))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("config key 'teacher' is empty: pass --set teacher=PATH (a model directory or .pt)")
        if not self.data.train:
            raise ConfigError("config key 'data.train' must name speaker-labelled manifests")


def speaker_ids(manifests) -> dict[str, int]:
    """{speaker name: class id} over the cuts of ``manifests`` (sorted names); a cut without one is an error."""
    names = set()
    for cut in open_cuts(manifests, "data.train"):
        sup = cut.supervisions[0] if cut.supervisions else None
        if sup is None or not sup.speaker:
            raise ConfigError(f"cut {cut.id} of 'data.train' has no supervision 'speaker': OS-KDFT needs speaker labels")
        names.add(sup.speaker)
    return {n: i for i, n in enumerate(sorted(names))}


def build_oskdft(cfg: OskdftConfig, teacher: nn.Module, speakers: dict[str, int]) -> OSKDFT:
    s, lo = cfg.student, cfg.loss
    student = OskdftStudent(teacher, s.kd_layers, s.ft_layers, s.embed_dim, s.head_channels)
    target = teacher.num_layers if lo.kd_target == -1 else lo.kd_target
    return OSKDFT(student, teacher, speakers, target, margin=lo.margin, scale=lo.scale,
                  ft_lower_grad=lo.ft_lower_grad, ft_warmup_steps=lo.ft_warmup_steps, cos_weight=lo.cos_weight,
                  kd_weight=lo.kd_weight)


def _merged_encoder(student: OskdftStudent) -> nn.Module:
    """One Encoder of ``kd_layers + ft_layers`` layers holding the lower part's and the upper layers' weights."""
    from speechssl.models.encoder import build_encoder

    cfg = student.lower.config
    n = student.kd_layers + student.ft_layers
    enc = build_encoder(dataclasses.replace(cfg, num_layers=n))
    sd = {k: v for k, v in student.lower.state_dict().items() if not k.startswith("layer_norm.")}
    for i, layer in enumerate(student.upper):
        sd.update({f"layers.{student.kd_layers + i}.{k}": v for k, v in layer.state_dict().items()})
    if cfg.layer_norm_first:
        sd.update({f"layer_norm.{k}": v for k, v in student.upper_norm.state_dict().items()})
    else:
        sd.update({k: v for k, v in student.lower.state_dict().items() if k.startswith("layer_norm.")})
    enc.load_state_dict(sd, strict=True)
    return enc.eval()


def export_oskdft(student: OskdftStudent, out_dir: str | Path, meta: dict) -> Path:
    """The inference model: encoder (speechssl model directory) + ``speaker_head.safetensors`` + its shape."""
    from safetensors.torch import save_file

    from speechssl.models.io import export_pretrained

    out = Path(export_pretrained(_merged_encoder(student).float(), Path(out_dir), format="speechssl",
                                 meta={"method": "oskdft", **meta}))
    head = {k: v.detach().float().contiguous() for k, v in student.head.state_dict().items()}
    save_file(head, str(out / HEAD_FILE))
    shape = {"embed_dim": student.head.embed.out_features, "channels": student.head.embed.in_features // 2}
    (out / "speaker_head.json").write_text(json.dumps(shape) + "\n")
    return out


def load_oskdft_extractor(model_dir: str | Path):
    """``(extract(audio [B, S], lens [B]) -> [B, E], parameter count)`` of an ``export_oskdft`` directory."""
    from safetensors.torch import load_file

    from speechssl.models.io import load_pretrained

    d = Path(model_dir)
    encoder = load_pretrained(d).eval()
    shape = json.loads((d / "speaker_head.json").read_text())
    head = XVectorHead(encoder.hidden_size, shape["embed_dim"], shape["channels"])
    head.load_state_dict(load_file(str(d / HEAD_FILE)))
    head.eval()

    def extract(audio: Tensor, lens: Tensor) -> Tensor:
        out = encoder(audio, lens)
        return head(out.last_hidden_state, out.padding_mask)

    return extract, sum(p.numel() for m in (encoder, head) for p in m.parameters())


def run_oskdft(cfg: OskdftConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Train OS-KDFT into ``out_dir`` (metrics.jsonl, checkpoints/, final/ = the exported inference model)."""
    from speechssl.train.trainer import Trainer

    teacher = load_teacher(cfg.teacher, cfg.trainer.seed)
    speakers = speaker_ids(cfg.data.train)
    torch.manual_seed(cfg.trainer.seed)
    model = build_oskdft(cfg, teacher, speakers)
    enc = model.student.lower
    logger.info("oskdft: %d speakers, student %d+%d layers", len(speakers), model.student.kd_layers,
                model.student.ft_layers)

    def factory():
        ds = build_dataset(cfg.data, num_frames=enc.num_frames, downsample_rate=enc.downsample_rate,
                           seed=cfg.trainer.seed, train=True, fields=["speaker"])
        return build_loader(cfg.data, ds, seed=cfg.trainer.seed, num_workers=cfg.trainer.num_workers)

    meta = {"teacher": cfg.teacher, "kd_layers": model.student.kd_layers, "ft_layers": model.student.ft_layers}
    trainer = Trainer(cfg.trainer, model, Path(out_dir), optim=cfg.optim, schedule=cfg.schedule,
                      make_train_loader=factory, save_final=lambda m, d: export_oskdft(m.student, d, meta),
                      run_config=cfg)
    return trainer.fit(resume=resume)
