"""DPHuBERT-style structured pruning: HardConcrete gates, expected parameter count, Lagrangian sparsity term.

Prunable groups (each unit owns one HardConcrete gate):

* ``conv``: output channels of front-end conv blocks. Only channels that no LayerNorm mixes can be sliced
  exactly: in ``group_norm`` extractors (GroupNorm(C, C) is per channel) every block, except the last when the
  feature projection starts with a LayerNorm over channels; ``layer_norm`` extractors normalise over channels
  inside every block, so their CNN stays unpruned (pruning it would change the statistics).
* ``heads``: attention heads per layer; ``attn``: whole attention block per layer;
* ``ffn_units``: FFN intermediate units per layer; ``ffn``: whole FFN block per layer.

The expected number of parameters is a differentiable function of the gates' keep probabilities: CNN layers
multiply consecutive expected channel counts, attention/FFN blocks scale with the expected heads/units times
the block gate's keep probability. Called with hard 0/1 masks it gives the exact parameter count of the
materialised model. Sparsity ``s = 1 - expected / teacher`` is pushed to a target ``t`` (ramped linearly from 0)
by ``l1 (s - t) + l2 (s - t)^2``, whose multipliers l1, l2 are trained by gradient ASCENT (their gradient
is negated by a hook, so any optimiser with a positive learning rate maximises over them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, get_args

import torch
from torch import nn

from speechssl.compress.distill import (
    LayerDistiller, compress_data_config, copy_teacher, evenly_spaced_layers, export_student, load_teacher,
    make_train_loader_factory,
)
from speechssl.compress.hardconcrete import HardConcrete
from speechssl.compress.materialize import materialize
from speechssl.config import ConfigError
from speechssl.data.loader import DataConfig
from speechssl.train.contract import StepOutput
from speechssl.train.optim import OptimConfig, ScheduleConfig
from speechssl.train.trainer import TrainerConfig

logger = logging.getLogger(__name__)

PruneGroup = Literal["conv", "heads", "attn", "ffn_units", "ffn"]

__all__ = ["EncoderStructure", "PruningGates", "PruneDistiller", "param_count", "target_sparsity", "PruneConfig",
           "run_prune", "prune_param_groups", "prune_summary"]


@dataclass
class EncoderStructure:
    """What the parameter count of a (possibly already pruned) encoder depends on; read from an Encoder."""

    conv_channels: list[int]          # C_i per front-end conv block (waveform CNN or fbank subsampler)
    conv_first_in: int                # input channels of block 0 (1 for waveform, n_mels for fbank)
    conv_kernels: list[int]
    conv_bias: bool
    conv_norms: list[str]             # per block: "group" (per channel), "layer" (over channels) or "none"
    proj_layer_norm: bool             # LayerNorm over the last block's channels before the projection
    hidden_size: int                  # D (never pruned)
    head_dim: int                     # D / original num_heads
    heads: list[int]                  # H_l currently present (0 = no attention block)
    ffn_units: list[int]              # F_l currently present (0 = no FFN block)
    wavlm: bool                       # per-head gru_rel_pos_const and per-layer gru_rel_pos_linear
    total_params: int                 # numel of the encoder with these sizes

    @classmethod
    def from_encoder(cls, encoder: nn.Module) -> "EncoderStructure":
        cfg = encoder.config
        units = encoder.prunable_units()
        conv = list(units.get("conv", []))
        if cfg.frontend == "cnn":
            first_in, bias = 1, bool(cfg.conv_bias)
            norms = ["layer"] * len(conv) if cfg.extractor_mode == "layer_norm" else ["group"] + ["none"] * (len(conv) - 1)
        else:  # fbank conv subsampler: biased convs, no norms
            first_in, bias, norms = int(cfg.n_mels), True, ["none"] * len(conv)
        return cls(
            conv_channels=conv, conv_first_in=first_in, conv_kernels=[int(c[1]) for c in cfg.conv_layers],
            conv_bias=bias, conv_norms=norms, proj_layer_norm=bool(getattr(cfg, "feature_proj_layer_norm", True)),
            hidden_size=cfg.hidden_size, head_dim=cfg.hidden_size // cfg.num_heads, heads=list(units["heads"]),
            ffn_units=list(units["ffn_units"]), wavlm=bool(cfg.relative_position),
            total_params=sum(p.numel() for p in encoder.parameters()),
        )

    def prunable_conv_layers(self) -> list[int]:
        """Conv blocks whose output channels can be sliced exactly: the block's own norm must act per channel
        ("group"/"none"), and the last block only when no LayerNorm over channels follows it."""
        n = len(self.conv_channels)
        return [i for i in range(n)
                if self.conv_norms[i] != "layer" and not (i == n - 1 and self.proj_layer_norm)]


def _variable_params(st: EncoderStructure, conv: Sequence, heads: Sequence, attn: Sequence,
                     ffn_units: Sequence, ffn: Sequence):
    """Parameters that depend on the prunable sizes (tensor or float inputs give a tensor or float).

    conv[i]: channel count of conv block i; heads[l], ffn_units[l]: head / unit counts; attn[l], ffn[l]: block
    presence (0..1). A block with no heads (units) left is absent, so its out-projection bias goes too.
    """
    D, dh = st.hidden_size, st.head_dim
    total = 0.0
    if st.conv_channels:
        prev = float(st.conv_first_in)
        for c, k, norm in zip(conv, st.conv_kernels, st.conv_norms):
            total = total + k * prev * c + (c if st.conv_bias else 0.0) + (2 * c if norm != "none" else 0.0)
            prev = c
        # feature projection: (LayerNorm(C_last)) + Linear(C_last, D) weight
        total = total + (2 * prev if st.proj_layer_norm else 0.0) + prev * D
    for h, a in zip(heads, attn):
        present = _clamp01(h)
        # fused qkv: D -> 3*h*dh with bias; out: h*dh -> D, its bias present with the block
        block = h * dh * (3 * D + 3) + h * dh * D + D * present
        if st.wavlm:
            block = block + h + (8 * dh + 8) * present  # gru_rel_pos_const per head, gru_rel_pos_linear per block
        total = total + a * block
    for f, b in zip(ffn_units, ffn):
        present = _clamp01(f)
        total = total + b * (f * (D + 1) + f * D + D * present)
    return total


def _clamp01(x):
    return x.clamp(max=1.0) if torch.is_tensor(x) else min(float(x), 1.0)


def param_count(st: EncoderStructure, conv: Sequence, heads: Sequence, attn: Sequence, ffn_units: Sequence,
                ffn: Sequence):
    """Parameter count of the encoder with the given (expected) sizes: fixed part + size-dependent part."""
    full = _variable_params(st, st.conv_channels, st.heads, [1.0 if h else 0.0 for h in st.heads],
                            st.ffn_units, [1.0 if f else 0.0 for f in st.ffn_units])
    return st.total_params - full + _variable_params(st, conv, heads, attn, ffn_units, ffn)


def target_sparsity(step: int, target: float, warmup_steps: int) -> float:
    """Linear ramp of the sparsity target from 0 at step 0 to ``target`` at ``warmup_steps``."""
    if warmup_steps <= 0:
        return target
    return target * min(1.0, step / warmup_steps)


class PruningGates(nn.Module):
    """HardConcrete gates for an encoder's prunable groups; ``forward()`` returns an ``EncoderGates``.

    Args:
        encoder: the Encoder to prune (its current sizes define the groups).
        groups: which groups to prune, subset of {"conv", "heads", "attn", "ffn_units", "ffn"}.
        init_drop: initial drop probability for all groups but FFN units; ffn_units_init_drop for FFN units.
        temperature, stretch: HardConcrete parameters (2/3, (-0.1, 1.1)).
    Gate tensors: conv[i] [C_i], heads[l] [H_l], attn[l] [] , ffn_units[l] [F_l], ffn[l] []; groups that are
    not pruned get constant ones. A block whose heads (units) are all 0 gets block gate 0, so the gated model
    equals the materialised one, which drops that block.
    """

    GROUPS = get_args(PruneGroup)

    def __init__(self, encoder: nn.Module, groups: Sequence[str] = GROUPS, init_drop: float = 0.01,
                 ffn_units_init_drop: float = 0.5, temperature: float = 2.0 / 3.0,
                 stretch: tuple[float, float] = (-0.1, 1.1)):
        super().__init__()
        unknown = set(groups) - set(self.GROUPS)
        if unknown:
            raise ValueError(f"unknown pruning groups {sorted(unknown)}; valid: {list(self.GROUPS)}")
        self.structure = EncoderStructure.from_encoder(encoder)
        st = self.structure
        self.groups = tuple(groups)

        def hc(n, p, min_keep=0):
            return HardConcrete(n, init_drop=p, temperature=temperature, stretch=stretch, min_keep=min_keep)

        self.conv = nn.ModuleDict()
        if "conv" in groups:
            for i in st.prunable_conv_layers():
                self.conv[str(i)] = hc(st.conv_channels[i], init_drop, min_keep=1)
        self.heads, self.attn, self.ffn_units, self.ffn = (nn.ModuleDict() for _ in range(4))
        for l, h in enumerate(st.heads):
            if h and "heads" in groups:
                self.heads[str(l)] = hc(h, init_drop)
            if h and "attn" in groups:
                self.attn[str(l)] = hc(1, init_drop)
        for l, f in enumerate(st.ffn_units):
            if f and "ffn_units" in groups:
                self.ffn_units[str(l)] = hc(f, ffn_units_init_drop)
            if f and "ffn" in groups:
                self.ffn[str(l)] = hc(1, init_drop)
        if not any(len(d) for d in (self.conv, self.heads, self.attn, self.ffn_units, self.ffn)):
            raise ValueError("nothing to prune: no gates were created for groups " + ", ".join(groups))

    def log_alpha_parameters(self) -> list[nn.Parameter]:
        return [m.log_alpha for m in self.modules() if isinstance(m, HardConcrete)]

    def _ones(self, n: int) -> torch.Tensor:
        p = self.log_alpha_parameters()[0]
        return torch.ones(n, device=p.device, dtype=p.dtype)

    def _values(self, fn) -> dict[str, list[torch.Tensor]]:
        """Per-group lists of per-unit values: ``fn(gate)`` for gated entries, ones (keep) otherwise."""
        st = self.structure
        out = {
            "conv": [fn(self.conv[str(i)]) if str(i) in self.conv else self._ones(c)
                     for i, c in enumerate(st.conv_channels)],
            "heads": [fn(self.heads[str(l)]) if str(l) in self.heads else self._ones(h) for l, h in enumerate(st.heads)],
            "attn": [fn(self.attn[str(l)])[0] if str(l) in self.attn else self._ones(1)[0] * (1.0 if h else 0.0)
                     for l, h in enumerate(st.heads)],
            "ffn_units": [fn(self.ffn_units[str(l)]) if str(l) in self.ffn_units else self._ones(f)
                          for l, f in enumerate(st.ffn_units)],
            "ffn": [fn(self.ffn[str(l)])[0] if str(l) in self.ffn else self._ones(1)[0] * (1.0 if f else 0.0)
                    for l, f in enumerate(st.ffn_units)],
        }
        return out

    def forward(self):
        """Sample the gates once (training) or take the deterministic masks (eval) -> ``EncoderGates``."""
        from speechssl.models.encoder import EncoderGates

        v = self._values(lambda g: g())
        # an attention/FFN block with every unit at 0 is dropped by materialisation: mirror that here
        v["attn"] = [a * (h.detach() != 0).any().to(a.dtype) if h.numel() else a * 0
                     for a, h in zip(v["attn"], v["heads"])]
        v["ffn"] = [b * (f.detach() != 0).any().to(b.dtype) if f.numel() else b * 0
                    for b, f in zip(v["ffn"], v["ffn_units"])]
        conv = v["conv"] if len(self.conv) else None  # ungated CNN: skip the multiply entirely
        return EncoderGates(conv=conv, heads=v["heads"], attn=v["attn"], ffn_units=v["ffn_units"],
                            ffn=v["ffn"])

    def expected_num_params(self) -> torch.Tensor:
        """Expected parameter count (differentiable in every log_alpha)."""
        p = self._values(lambda g: g.prob_nonzero())
        return param_count(self.structure, [c.sum() for c in p["conv"]], [h.sum() for h in p["heads"]], p["attn"],
                           [f.sum() for f in p["ffn_units"]], p["ffn"])

    @staticmethod
    def count_from_gates(structure: EncoderStructure, gates) -> int:
        """Exact parameter count of the model materialised from hard gate values (``EncoderGates``)."""
        st = structure
        nz = lambda t: float((t != 0).sum())  # noqa: E731
        conv = [nz(c) for c in gates.conv] if gates.conv is not None else list(map(float, st.conv_channels))
        heads = [nz(h) for h in gates.heads]
        ffn_units = [nz(f) for f in gates.ffn_units]
        attn = [float(a != 0) * float(h > 0) for a, h in zip(gates.attn, heads)]
        ffn = [float(b != 0) * float(f > 0) for b, f in zip(gates.ffn, ffn_units)]
        return int(round(param_count(st, conv, heads, attn, ffn_units, ffn)))


class PruneDistiller(LayerDistiller):
    """DPHuBERT stage 1: layer-to-layer distillation of a gated student + Lagrangian sparsity term.

    ``forward(batch) -> StepOutput``; with the ``step`` capability the Trainer calls ``set_step(step)`` to ramp
    the target. Optimiser groups (weights, log_alpha, multipliers with their own learning rates):
    `prune_param_groups`.
    """

    trainer_capabilities = ("step", "shared_layerdrop")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layers: Sequence[int] = (0, 4, 8, 12),
                 teacher_layers: Sequence[int] | None = None, cos_weight: float = 1.0, cos_type: str = "neg",
                 target: float = 0.75, warmup_steps: int = 5000, groups: Sequence[str] = PruningGates.GROUPS,
                 init_drop: float = 0.01, ffn_units_init_drop: float = 0.5):
        super().__init__(student, teacher, student_layers, teacher_layers, cos_weight, cos_type)
        if not 0.0 <= target < 1.0:
            raise ValueError(f"prune target sparsity must lie in [0, 1), got {target}")
        self.gates = PruningGates(student, groups, init_drop=init_drop, ffn_units_init_drop=ffn_units_init_drop)
        self.target, self.warmup_steps = float(target), int(warmup_steps)
        self.teacher_params = float(self.gates.structure.total_params)
        self.lambdas = nn.Parameter(torch.zeros(2))  # l1, l2
        self.lambdas.register_hook(lambda g: -g)  # gradient ascent on the multipliers
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def student_forward(self, wav, lens):
        return self.student(wav, lens, gates=self.gates())

    def sparsity_term(self) -> tuple[torch.Tensor, dict]:
        expected = self.gates.expected_num_params()
        s = 1.0 - expected / self.teacher_params
        t = target_sparsity(self.step, self.target, self.warmup_steps)
        l1, l2 = self.lambdas[0], self.lambdas[1]
        reg = l1 * (s - t) + l2 * (s - t) ** 2
        return reg, {"expected_params": expected.item(), "sparsity": s.item(), "target_sparsity": t,
                     "lambda1": l1.item(), "lambda2": l2.item()}

    def forward(self, batch: dict) -> StepOutput:
        """batch: ``audio`` [B, S], ``audio_lens`` [B]; distillation loss + sparsity term."""
        loss, logs = self.distill(batch)
        reg, reg_logs = self.sparsity_term()
        loss = loss + reg
        logs.update(reg_logs)
        logs["loss"] = loss.item()
        return StepOutput(loss, logs)


# ---------------------------------------------------------------------------------------------------------------
# `speechssl prune`: config schema and the two-stage run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PruneSettings:
    target: float = 0.75           # final sparsity 1 - params / teacher params
    warmup_steps: int = 5000       # the target ramps linearly from 0 over these steps
    groups: list[PruneGroup] = field(default_factory=lambda: list(PruningGates.GROUPS))
    init_drop: float = 0.01        # initial drop probability of every gate but FFN units
    ffn_units_init_drop: float = 0.5
    gate_lr: float = 0.02          # learning rate of log_alpha
    lambda_lr: float = 0.02        # learning rate of the Lagrange multipliers (gradient ascent)

    def validate(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ConfigError(f"config key 'prune.target' must lie in [0, 1), got {self.target}")


@dataclass
class LayerLossConfig:
    student_layers: list[int] = field(default_factory=list)  # [] = 0 plus 3 evenly spaced layers (0 4 8 12)
    teacher_layers: list[int] = field(default_factory=list)  # [] = same as student_layers
    cos_weight: float = 1.0
    cos_type: Literal["neg", "logsig"] = "neg"  # neg: L1 - cos (DPHuBERT) | logsig: L1 - log sigmoid(cos)


@dataclass
class FinetuneConfig:
    max_steps: int = 25000         # stage 2: distillation of the materialised model, no sparsity term (0 = skip)
    lr: float = 2e-4


@dataclass
class PruneConfig:
    teacher: str = ""              # model dir (ours or HF), fairseq .pt, or preset:NAME (random weights)
    loss: LayerLossConfig = field(default_factory=LayerLossConfig)
    prune: PruneSettings = field(default_factory=PruneSettings)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=compress_data_config)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="constant", warmup_steps=0))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=50000))

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("config key 'teacher' is empty: pass --set teacher=PATH (a model directory or .pt)")
        if not self.data.train and not self.data.shar_dir:
            raise ConfigError("config key 'data.train' (manifests) or 'data.shar_dir' (Shar shards) must be set")


def _layer_pairs(cfg: PruneConfig, num_layers: int) -> tuple[list[int], list[int]]:
    s = list(cfg.loss.student_layers) or [0] + evenly_spaced_layers(num_layers, 3)
    t = list(cfg.loss.teacher_layers) or list(s)
    if len(s) != len(t):
        raise ConfigError(f"config keys 'loss.student_layers' {s} and 'loss.teacher_layers' {t} differ in length")
    bad = [i for i in s + t if not 0 <= i <= num_layers]
    if bad:
        raise ConfigError(f"config key 'loss.student_layers'/'loss.teacher_layers': {bad} out of range for "
                          f"{num_layers} layers")
    return s, t


def prune_param_groups(model: "PruneDistiller", optim: OptimConfig, settings: PruneSettings) -> list[dict]:
    """Trainer param groups: weights (weight-decay split as usual), log_alpha, multipliers; lrs as lr_scale."""
    from speechssl.train.optim import default_param_groups

    groups = []
    for g in default_param_groups(model, optim):
        keep = [(p, n) for p, n in zip(g["params"], g["names"]) if not n.startswith("gates.") and n != "lambdas"]
        if keep:
            groups.append({**g, "params": [p for p, _ in keep], "names": [n for _, n in keep]})
    groups.append({"params": model.gates.log_alpha_parameters(), "weight_decay": 0.0,
                   "lr_scale": settings.gate_lr / optim.lr, "names": ["gates.*.log_alpha"]})
    groups.append({"params": [model.lambdas], "weight_decay": 0.0, "lr_scale": settings.lambda_lr / optim.lr,
                   "names": ["lambdas"]})
    return groups


def prune_summary(teacher: nn.Module, pruned: nn.Module) -> dict:
    """Sizes before/after: params, sparsity, per-layer heads and FFN units, CNN channels."""
    n_t = sum(p.numel() for p in teacher.parameters())
    n_p = sum(p.numel() for p in pruned.parameters())
    u = pruned.prunable_units()
    return {"teacher_params": n_t, "params": n_p, "sparsity": 1.0 - n_p / n_t, "heads": u["heads"],
            "ffn_units": u["ffn_units"], "conv_channels": u["conv"], "layer_heads": pruned.config.layer_heads}


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _stage1(cfg: PruneConfig, teacher: nn.Module, pairs: tuple[list[int], list[int]], loader, out_dir: Path,
            resume: bool) -> tuple[dict, "PruneDistiller"]:
    """Distil and prune the gated copy of the teacher in ``out_dir``; (trainer logs, the trained model)."""
    from speechssl.train.trainer import Trainer

    torch.manual_seed(cfg.trainer.seed)
    p = cfg.prune
    model = PruneDistiller(copy_teacher(teacher), teacher, student_layers=pairs[0], teacher_layers=pairs[1],
                           cos_weight=cfg.loss.cos_weight, cos_type=cfg.loss.cos_type, target=p.target,
                           warmup_steps=p.warmup_steps, groups=p.groups, init_drop=p.init_drop,
                           ffn_units_init_drop=p.ffn_units_init_drop)
    logger.info("prune stage 1: %d gate groups, teacher %.2fM params, target sparsity %.2f",
                sum(1 for _ in model.gates.log_alpha_parameters()), model.teacher_params / 1e6, p.target)
    trainer = Trainer(cfg.trainer, model, out_dir, optim=cfg.optim, schedule=cfg.schedule, make_train_loader=loader,
                      param_groups=lambda m: prune_param_groups(m, cfg.optim, p), run_config=cfg)
    return trainer.fit(resume=resume), model


def _export_pruned(model: "PruneDistiller", teacher: nn.Module, pruned_dir: Path, meta: dict) -> None:
    """Materialise the student at the gates' deterministic (eval) values into ``pruned_dir``, with the
    distillation maps as a part and ``prune_summary.json``."""
    from speechssl.models.io import export_pretrained
    from speechssl.utils.io import atomic_write_json

    model = model.cpu().eval()
    pruned = materialize(model.student, model.gates())
    summary = prune_summary(teacher, pruned)
    logger.info("materialised: %.2fM params (sparsity %.3f), heads %s, FFN %s", summary["params"] / 1e6,
                summary["sparsity"], summary["heads"], summary["ffn_units"])
    maps = {k: v.detach().cpu() for k, v in model.maps.state_dict().items()}
    export_pretrained(pruned, pruned_dir, format="speechssl", meta={**meta, "stage": 1}, parts={"distill_maps": maps})
    atomic_write_json(pruned_dir / "prune_summary.json", summary)


def _stage2(cfg: PruneConfig, teacher: nn.Module, pruned_dir: Path, pairs: tuple[list[int], list[int]], loader,
            out_dir: Path, resume: bool, meta: dict) -> dict:
    """Distil the dense pruned model (no sparsity term, stage 1's maps as the start) into ``out_dir``."""
    import dataclasses as dc

    from speechssl.models.io import load_checkpoint_parts, load_pretrained
    from speechssl.train.trainer import Trainer

    student = load_pretrained(pruned_dir).train()
    for p in student.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.trainer.seed)
    model = LayerDistiller(student, teacher, pairs[0], pairs[1], cfg.loss.cos_weight, cfg.loss.cos_type)
    maps = load_checkpoint_parts(pruned_dir).get("distill_maps")
    if maps:
        model.maps.load_state_dict(maps)
    trainer = Trainer(dc.replace(cfg.trainer, max_steps=cfg.finetune.max_steps), model, out_dir,
                      optim=dc.replace(cfg.optim, lr=cfg.finetune.lr), schedule=cfg.schedule, make_train_loader=loader,
                      save_final=lambda m, d: export_student(m.student, d, meta), run_config=cfg)
    return trainer.fit(resume=resume)


def run_prune(cfg: PruneConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """DPHuBERT: stage 1 (distil + prune) -> materialise -> stage 2 (distil) -> ``out_dir/final``.

    Layout: ``out_dir/stage1/`` (trainer dir of stage 1), ``out_dir/pruned/`` (materialised model right after
    stage 1, with the distillation maps as a part and ``prune_summary.json``), ``out_dir`` itself is the
    stage-2 trainer dir (config.yaml, metrics.jsonl, checkpoints/, final/). With ``resume`` a finished stage is
    not run again.
    """
    from speechssl.models.io import load_pretrained

    out_dir = Path(out_dir)
    teacher = load_teacher(cfg.teacher, cfg.trainer.seed)
    pairs = _layer_pairs(cfg, teacher.num_layers)
    loader = make_train_loader_factory(cfg.data, cfg.trainer, teacher)
    pruned_dir = out_dir / "pruned"
    meta = {"method": "dphubert", "teacher": cfg.teacher, "target_sparsity": cfg.prune.target}
    stage1: dict = {}
    if not (resume and (pruned_dir / "config.json").is_file()):
        stage1, model = _stage1(cfg, teacher, pairs, loader, out_dir / "stage1", resume)
        if _is_main_process():  # the gates are deterministic at eval: every rank would write the same model
            _export_pruned(model, teacher, pruned_dir, meta)
        _barrier()
    summary = prune_summary(teacher, load_pretrained(pruned_dir))
    sizes = {f"pruned_{k}": v for k, v in summary.items() if k in ("params", "sparsity")}
    meta = {**meta, "sparsity": summary["sparsity"]}
    if cfg.finetune.max_steps <= 0:
        if _is_main_process():
            export_student(load_pretrained(pruned_dir), out_dir / "final", meta)
        _barrier()
        return {**stage1, **sizes}
    return {**_stage2(cfg, teacher, pruned_dir, pairs, loader, out_dir, resume, meta), **sizes}
