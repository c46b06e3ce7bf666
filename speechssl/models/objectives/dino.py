"""Speaker self-distillation with no labels (DINO, as used for speaker verification: Cluster-Aware DINO, wespeaker).

Utterance-level self-distillation: segments of one utterance share its speaker, so an embedding that lets the
student predict, from any segment, what the teacher outputs for another segment of the same utterance is a
speaker embedding. No negative pairs and no labels.

- **Multi-crop.** From each utterance, 2 long segments (``long_seconds``, 3 s for VoxCeleb; wespeaker uses 3 s
  long and 2 s short chunks) and ``short_crops`` short ones (4 at ``short_seconds``), at random positions (an
  utterance shorter than a crop is taken whole). The teacher sees the long segments only, the student all.
- **Networks.** Student and teacher have the same shape: the encoder, statistics pooling (mean and standard
  deviation over the valid frames of the last hidden state), a linear layer to the speaker embedding
  (``embed_dim``), and the DINO head: a 3-layer MLP (batch norm and GELU, ``hidden_dim``) to a
  ``bottleneck_dim`` vector, L2-normalised, then a weight-normalised linear layer without bias to ``out_dim``
  prototypes (the weight norm fixed to 1, DINO's ``norm_last_layer``: a cosine against L2-normalised rows).
- **Loss.** For every (teacher segment i, student segment j) pair with i != j: cross-entropy between the
  teacher's ``softmax((t_i - center) / tau_t)`` and the student's ``log_softmax(s_j / tau_s)``, averaged over
  pairs and utterances. Student temperature 0.1; teacher temperature (sharpening) 0.04 rising linearly to 0.07
  over ``teacher_temp_warmup_steps`` (wespeaker: 20% of training). Centering: ``center <- m * center + (1 - m) *
  mean of the teacher outputs of the batch`` (all ranks), m = 0.9, updated after the loss in training only.
- **Teacher.** No gradient; an exponential moving average of the student, ``teacher <- mu * teacher + (1 - mu) *
  student`` after every optimiser update, with ``mu`` rising from ``teacher_momentum`` (0.996) to 1 on a cosine
  over ``momentum_steps`` (0: constant). The trainer's ``set_step(step)`` (called before every update) applies
  the EMA of the update just completed; ``ema_updates`` records the last update applied, so a resumed run
  continues exactly. The teacher runs in eval mode (no dropout, no layer-drop).

The speaker embedding extractor is encoder + pooling + the embedding layer (``embed``); the teacher's
(``teacher_encoder`` / ``teacher_embed``) is the one DINO evaluates. ``speechssl.superb.embeddings`` scores either
on verification trials by cosine similarity.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.constants import SAMPLE_RATE
from speechssl.train.contract import StepOutput

from .base import Objective, fp32

__all__ = ["DinoObjective", "SpeakerEmbedder", "DinoHead", "stats_pool", "multi_crop"]


def stats_pool(x: Tensor, padding_mask: Tensor) -> Tensor:
    """Mean and standard deviation over valid frames: x [B, T, D], padding_mask [B, T] (True = pad) -> [B, 2D]."""
    valid = (~padding_mask).to(x.dtype)[..., None]
    n = valid.sum(1).clamp_min(1)
    mean = (x * valid).sum(1) / n
    var = ((x - mean[:, None]) ** 2 * valid).sum(1) / n
    return torch.cat([mean, var.clamp_min(1e-6).sqrt()], dim=-1)


class SpeakerEmbedder(nn.Module):
    """Pooling + projection on top of an encoder output: the speaker embedding [B, embed_dim]."""

    def __init__(self, hidden_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * hidden_size, embed_dim)

    def forward(self, encoder: nn.Module, audio: Tensor, lens: Tensor) -> Tensor:
        out = encoder(audio, lens)
        x = out.last_hidden_state if out.last_hidden_state is not None else out.hidden_states[-1]
        return self.proj(stats_pool(x, out.padding_mask))


class DinoHead(nn.Module):
    """3-layer MLP to a bottleneck, L2-normalised, then cosine logits against ``out_dim`` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        # batch norm after each hidden layer (wespeaker's use_bn): pooled embeddings of different utterances
        # share a large common part; normalising over the batch keeps the teacher from starting constant, which
        # centering would turn into a uniform (collapsed) target
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, emb: Tensor) -> Tensor:
        with fp32(emb.device.type):
            z = F.normalize(self.mlp(emb).float(), dim=-1)
            return z @ F.normalize(self.prototypes.float(), dim=-1).t()


def multi_crop(audio: Tensor, lens: Tensor, seconds: float, n: int,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` random segments of ``seconds`` per utterance: audio [B, S], lens [B] -> ([n*B, L], [n*B]), crop k
    of utterance b at row k*B + b; an utterance shorter than L is taken whole (zero-padded)."""
    B, S = audio.shape
    L = min(int(seconds * SAMPLE_RATE), S)
    lens = lens.clamp_max(S)
    seg = lens.clamp_max(L).repeat(n)  # [n*B]
    room = (lens.repeat(n) - seg + 1).double()
    u = torch.rand(n * B, generator=generator, dtype=torch.float64).to(audio.device)
    start = (u * room).long().clamp_max((room - 1).long())
    idx = (start[:, None] + torch.arange(L, device=audio.device)[None]).clamp_max(S - 1)
    crops = audio.repeat(n, 1).gather(1, idx) * (torch.arange(L, device=audio.device)[None] < seg[:, None])
    return crops, seg


class DinoObjective(Objective):
    """DINO for speaker embeddings (see the module docstring for the method and its defaults).

    Args:
        encoder: the speechssl Encoder (the student's); the teacher is a copy.
        embed_dim: speaker embedding size (192 in wespeaker's ECAPA; 256 here).
        out_dim, hidden_dim, bottleneck_dim: DINO head (65536, 2048, 256).
        long_crops, short_crops, long_seconds, short_seconds: multi-crop (2 x 3 s, 4 x 2 s).
        student_temp, teacher_temp, warmup_teacher_temp, teacher_temp_warmup_steps: temperatures (0.1; 0.04 ->
            0.07 over the warm-up updates).
        center_momentum: centering momentum (0.9).
        teacher_momentum, momentum_steps: EMA momentum, raised to 1 on a cosine over ``momentum_steps`` (0 = fixed).
        seed: own crop generator (default: the global RNG, checkpointed by the trainer).
    """

    name = "dino"

    def __init__(self, encoder: nn.Module, *, embed_dim: int = 256, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, long_crops: int = 2, short_crops: int = 4, long_seconds: float = 3.0,
                 short_seconds: float = 2.0, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_temp_warmup_steps: int = 0,
                 center_momentum: float = 0.9, teacher_momentum: float = 0.996, momentum_steps: int = 0,
                 seed: int | None = None):
        super().__init__(encoder, mask_prob=0.0, mask_length=1, seed=seed)
        if isinstance(getattr(encoder, "mask_emb", None), nn.Parameter):
            # DINO never masks: a parameter without gradient would stop DDP (unused parameters)
            encoder.mask_emb.requires_grad_(False)
        if long_crops < 2 or short_crops < 0 or long_seconds <= 0 or short_seconds <= 0:
            raise ValueError(f"need long_crops >= 2 (teacher views), short_crops >= 0 and positive crop lengths, got "
                             f"{long_crops}, {short_crops}, {long_seconds}, {short_seconds}")
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ValueError("student_temp, teacher_temp and warmup_teacher_temp must be > 0")
        for key, m in (("center_momentum", center_momentum), ("teacher_momentum", teacher_momentum)):
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {m}")
        self.long_crops, self.short_crops = int(long_crops), int(short_crops)
        self.long_seconds, self.short_seconds = float(long_seconds), float(short_seconds)
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.teacher_temp_warmup_steps = int(teacher_temp_warmup_steps)
        self.center_momentum, self.teacher_momentum = float(center_momentum), float(teacher_momentum)
        self.momentum_steps = int(momentum_steps)
        self.embed = SpeakerEmbedder(encoder.hidden_size, embed_dim)
        self.head = DinoHead(embed_dim, out_dim, hidden_dim, bottleneck_dim)
        self.teacher_encoder = copy.deepcopy(encoder)
        self.teacher_embed = copy.deepcopy(self.embed)
        self.teacher_head = copy.deepcopy(self.head)
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    # -- teacher ----------------------------------------------------------------------------------------------
    def student_modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.encoder, self.embed, self.head

    def teacher_modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.teacher_encoder, self.teacher_embed, self.teacher_head

    def teacher_parameters(self):
        for m in self.teacher_modules():
            yield from m.parameters()

    def train(self, mode: bool = True):
        """The teacher encoder always runs without dropout and layer-drop; the teacher head's batch norm uses
        batch statistics in training, as the student's."""
        super().train(mode)
        self.teacher_encoder.eval()
        return self

    def momentum(self, update: int) -> float:
        """EMA momentum for update number ``update`` (1-based): cosine from ``teacher_momentum`` to 1."""
        if self.momentum_steps <= 0:
            return self.teacher_momentum
        frac = min(update, self.momentum_steps) / self.momentum_steps
        return 1.0 - (1.0 - self.teacher_momentum) * (math.cos(math.pi * frac) + 1) / 2

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        for s_mod, t_mod in zip(self.student_modules(), self.teacher_modules()):
            for ps, pt in zip(s_mod.parameters(), t_mod.parameters()):
                pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """The teacher's buffers (input statistics, filters) are the student's: they are set, not learned (e.g.
        the fbank statistics filled after the model was built)."""
        for s_mod, t_mod in zip(self.student_modules(), self.teacher_modules()):
            for bs, bt in zip(s_mod.buffers(), t_mod.buffers()):
                bt.copy_(bs)

    def set_step(self, step: int) -> None:
        """Called before every update with the updates done: applies the EMA of the last update unless done."""
        super().set_step(step)
        if step > int(self.ema_updates):  # the trainer calls this once per update: the gap is one update
            self.ema_update(self.momentum(step))
            self.ema_updates.fill_(step)

    def teacher_temperature(self) -> float:
        if self.step >= self.teacher_temp_warmup_steps:
            return self.teacher_temp
        frac = self.step / self.teacher_temp_warmup_steps
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * frac

    # -- loss -------------------------------------------------------------------------------------------------
    def dino_loss(self, student: Tensor, teacher: Tensor, n_student: int, n_teacher: int) -> Tensor:
        """Mean over (teacher i, student j != i) pairs and utterances of CE(teacher_i, student_j): student
        [n_student*B, K] and teacher [n_teacher*B, K] logits, crop-major (rows k*B .. k*B+B-1 = crop k)."""
        with fp32(student.device.type):
            t = ((teacher.float() - self.center) / self.teacher_temperature()).softmax(-1).chunk(n_teacher)
            s = (student.float() / self.student_temp).log_softmax(-1).chunk(n_student)
            terms = [-(t[i] * s[j]).sum(-1).mean() for i in range(n_teacher) for j in range(n_student) if i != j]
            return torch.stack(terms).mean()

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """center <- m * center + (1 - m) * batch mean of the teacher logits (summed over ranks when distributed)."""
        total = teacher.float().sum(0)
        count = torch.tensor(float(teacher.shape[0]), device=teacher.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1.0 - self.center_momentum)

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S], ``audio_lens`` [B]. Loss per utterance (``sample_size`` = B)."""
        audio, lens = self.audio_of(batch)
        B = audio.shape[0]
        long_a, long_l = multi_crop(audio, lens, self.long_seconds, self.long_crops, self._gen)
        self.sync_buffers()
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_embed(self.teacher_encoder, long_a, long_l))
        student = self.head(self.embed(self.encoder, long_a, long_l))
        n_student = self.long_crops
        if self.short_crops:
            short_a, short_l = multi_crop(audio, lens, self.short_seconds, self.short_crops, self._gen)
            student = torch.cat([student, self.head(self.embed(self.encoder, short_a, short_l))])
            n_student += self.short_crops
        loss = self.dino_loss(student, teacher, n_student, self.long_crops)
        with torch.no_grad():
            t_prob = ((teacher.float() - self.center) / self.teacher_temperature()).softmax(-1)
            entropy = float(-(t_prob * t_prob.clamp_min(1e-12).log()).sum(-1).mean())
            agree = float((student[:B].argmax(-1) == teacher[B:2 * B].argmax(-1)).float().mean())
        if self.training:
            self.update_center(teacher)
        logs = {"loss": float(loss.detach()), "teacher_entropy": entropy, "agreement": agree,
                "teacher_temp": self.teacher_temperature(), "momentum": self.momentum(int(self.ema_updates) + 1)}
        return StepOutput(loss, logs, sample_size=B)
