"""Diagnostics that catch a dead pretraining run early: representation collapse and a loss stuck at the prior.

Small-scale SSL runs fail quietly: the upper layers' outputs become constant over time (or low-rank) and the
masked loss settles at the entropy of the unit prior, i.e. the model predicts the label frequencies whatever the
input. These functions measure that on a fixed batch (plain torch/numpy, no speechssl.superb import):

- ``temporal_std(h, lengths)``: mean over utterances and dims of the standard deviation over valid frames
  (~0 when a layer outputs one vector per utterance);
- ``effective_rank(h, lengths)``: RankMe effective rank of the valid frames stacked to [N, D]
  (~D for random features, small for collapsed ones);
- ``layer_diagnostics(encoder, batch)``: both, for every hidden state of an encoder;
- ``unit_statistics(units)``: entropy / accuracy / perplexity of the unit prior (the loss and accuracy a model
  that ignores its input reaches);
- ``pnmi(units, phones)`` and ``purity(units, phones)``: phone-normalised mutual information and the cluster /
  phone purities of the HuBERT paper (Hsu et al. 2021, section IV-C), from aligned frame labels;
- ``CollapseMonitor``: fed each evaluation's record, returns warning strings;
- ``label_statistics(cuts, names)``: the unit prior (and PNMI on cuts with phone alignments) of stored labels;
- ``DiagnosticsConfig`` and ``RunDiagnostics``: all of the above for a pretraining run, on a fixed batch at the
  trainer's evaluations (``speechssl.train.pretrain`` builds it).

Example::

    rec = layer_diagnostics(encoder, {"audio": wav, "audio_lens": lens})   # {"layer0_tstd": ..., ...}
    rec.update(unit_statistics(units_of_the_batch))                         # {"prior_entropy": ..., ...}
    for w in CollapseMonitor().update(rec):
        logging.warning(w)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from speechssl.config import ConfigError

__all__ = ["temporal_std", "effective_rank", "layer_diagnostics", "unit_statistics", "pnmi", "purity",
           "CollapseMonitor", "label_statistics", "DiagnosticsConfig", "RunDiagnostics"]
log = logging.getLogger(__name__)

_EPS = 1e-12


def _valid_mask(h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Bool [B, T]: frames below each utterance's length (all frames when ``lengths`` is None)."""
    B, T = h.shape[0], h.shape[1]
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=h.device)
    lengths = torch.as_tensor(lengths, device=h.device).long().clamp(0, T)
    return torch.arange(T, device=h.device)[None] < lengths[:, None]


def temporal_std(h: torch.Tensor, lengths: torch.Tensor | None = None) -> float:
    """Mean over utterances and dims of the std over valid frames.

    h: [B, T, D] hidden states; lengths: [B] valid frames (None: all). Utterances with fewer than 2 valid frames
    are left out (a std over one frame says nothing); NaN when none is left.
    """
    if h.dim() != 3:
        raise ValueError(f"temporal_std: h must be [B, T, D], got shape {tuple(h.shape)}")
    x = h.detach().double()
    m = _valid_mask(x, lengths)
    n = m.sum(1)                                                     # [B]
    keep = n >= 2
    if not bool(keep.any()):
        return float("nan")
    w = m[..., None].to(x.dtype)                                     # [B, T, 1]
    cnt = n.clamp_min(1).to(x.dtype)[:, None]                        # [B, 1]
    mean = (x * w).sum(1) / cnt                                      # [B, D]
    var = (((x - mean[:, None]) * w) ** 2).sum(1) / cnt              # [B, D] population variance
    std = var.clamp_min(0).sqrt().mean(-1)                           # [B]
    return float(std[keep].mean())


def _stack_valid(h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """[B, T, D] -> [N, D] valid frames; a 2-D input is taken as already stacked."""
    if h.dim() == 2:
        return h
    if h.dim() != 3:
        raise ValueError(f"expected [B, T, D] or [N, D], got shape {tuple(h.shape)}")
    return h[_valid_mask(h, lengths)]


def effective_rank(h: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = 1e-7) -> float:
    """RankMe effective rank (Garrido et al. 2023) of the valid frames.

    h: [B, T, D] with lengths [B], or already stacked frames [N, D]. With singular values sigma_i of the [N, D]
    matrix, p_i = sigma_i / sum(sigma) + eps and the result is exp(-sum p_i log p_i): between 1 (all frames on a
    line) and min(N, D) (a flat spectrum). Not centred, as in RankMe: a constant offset counts as one direction.
    """
    x = _stack_valid(h.detach(), lengths).double()
    if x.shape[0] == 0:
        return float("nan")
    s = torch.linalg.svdvals(x)
    total = float(s.sum())
    if total <= 0 or not math.isfinite(total):
        return 0.0 if total == 0 else float("nan")
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def layer_diagnostics(encoder: torch.nn.Module, batch: dict) -> dict[str, float]:
    """Temporal std and effective rank of every hidden state of ``encoder`` on ``batch``.

    batch: ``audio`` [B, T] float at 16 kHz, ``audio_lens`` [B] valid samples. Runs in eval mode under no_grad
    (the previous mode is restored). Returns ``{"layer{i}_tstd": ..., "layer{i}_erank": ...}`` for i = 0 (the input
    of the first transformer layer) to num_layers, over the valid frames (``EncoderOutput.lengths``).
    """
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(batch["audio"], batch.get("audio_lens"))
    finally:
        encoder.train(was_training)
    lengths = out.lengths
    rec: dict[str, float] = {}
    for i, h in enumerate(out.hidden_states):
        h = h.float()  # bf16/fp16 under autocast: statistics in full precision
        rec[f"layer{i}_tstd"] = temporal_std(h, lengths)
        rec[f"layer{i}_erank"] = effective_rank(h, lengths)
    return rec


# ------------------------------------------------------------------------------------------------ labels
def _as_ids(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    return a.astype(np.int64)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def unit_statistics(units: Any) -> dict[str, float]:
    """Statistics of the unit prior of a 1-D array of unit ids (negative ids are padding and left out).

    Returns ``prior_entropy`` (nats: the cross-entropy of a model that always predicts the label frequencies),
    ``prior_acc`` (frequency of the most common unit: the accuracy of always guessing it), ``used_units``
    (distinct ids) and ``perplexity`` (exp of the entropy: the number of equally likely units it amounts to).
    """
    u = _as_ids(units, "units")
    u = u[u >= 0]
    if u.size == 0:
        nan = float("nan")
        return {"prior_entropy": nan, "prior_acc": nan, "used_units": 0.0, "perplexity": nan}
    _, counts = np.unique(u, return_counts=True)
    p = counts / counts.sum()
    h = _entropy(p)
    return {"prior_entropy": h, "prior_acc": float(p.max()), "used_units": float(len(counts)),
            "perplexity": float(math.exp(h))}


def _joint(units: Any, phones: Any) -> np.ndarray:
    """Joint distribution P(phone, unit) [n_phones, n_units] of two aligned id arrays (pairs with a negative id
    on either side are padding and left out)."""
    u, p = _as_ids(units, "units"), _as_ids(phones, "phones")
    if u.shape != p.shape:
        raise ValueError(f"units and phones must be aligned frame by frame, got {u.shape} and {p.shape}")
    keep = (u >= 0) & (p >= 0)
    u, p = u[keep], p[keep]
    if u.size == 0:
        return np.zeros((0, 0))
    _, ui = np.unique(u, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    nu = int(ui.max()) + 1
    counts = np.bincount(pi * nu + ui, minlength=(int(pi.max()) + 1) * nu).reshape(-1, nu)
    return counts / counts.sum()


def pnmi(units: Any, phones: Any) -> float:
    """Phone-normalised mutual information I(phone; unit) / H(phone) of aligned frame labels, in [0, 1].

    1 when the phone can be read off the unit, 0 when they are independent; NaN when there are no frames or a
    single phone (H(phone) = 0).
    """
    pj = _joint(units, phones)
    if pj.size == 0:
        return float("nan")
    pp, pu = pj.sum(1), pj.sum(0)
    h_phone = _entropy(pp)
    if h_phone <= _EPS:
        return float("nan")
    nz = pj > 0
    mi = float((pj[nz] * np.log(pj[nz] / np.outer(pp, pu)[nz])).sum())
    return max(0.0, mi) / h_phone


def purity(units: Any, phones: Any) -> tuple[float, float]:
    """(phone purity, cluster purity) of aligned frame labels, as the HuBERT paper defines them.

    Phone purity E_u[max_p P(p|u)]: the accuracy of labelling each unit with its most frequent phone.
    Cluster purity E_p[max_u P(u|p)]: how much of each phone its most frequent unit covers. NaN without frames.
    """
    pj = _joint(units, phones)
    if pj.size == 0:
        return float("nan"), float("nan")
    return float(pj.max(0).sum()), float(pj.max(1).sum())


# ------------------------------------------------------------------------------------------------ monitor
class CollapseMonitor:
    """Turns a sequence of evaluation records into collapse warnings.

    ``update(record)`` reads ``layer{i}_tstd`` / ``layer{i}_erank`` (from ``layer_diagnostics``) and, when both
    are present, a masked loss (``loss_key``) and the unit prior entropy (``prior_key``); it returns the warnings
    of this evaluation (strings, empty when healthy). Layer 0 (the transformer input) is the reference: a
    collapse that starts in the CNN shows up as ``tstd_min``.

    Args:
        tstd_ratio: warn when a layer's temporal std is below this fraction of layer 0's.
        tstd_min: warn when any layer's temporal std (layer 0's included) is below this absolute value.
        erank_ratio: warn when a layer's effective rank is below this fraction of layer 0's.
        loss_tolerance: the masked loss counts as "at the prior" unless it is more than this fraction below the
            prior entropy (0.01 = 1 %). A loss above the prior counts too: a dead model's predicted
            distribution is near the prior, not equal to it, so its cross-entropy sits a few % above.
        patience: warn once the loss has been at the prior for this many consecutive evaluations. Early in
            training the loss also starts above the prior: keep ``patience x`` the evaluation interval past the
            point where a healthy run beats the prior (the end of warm-up, typically).
        loss_key, prior_key: record keys of the masked loss and of the prior entropy (nats).
    """

    def __init__(self, tstd_ratio: float = 0.01, tstd_min: float = 1e-5, erank_ratio: float = 0.1,
                 loss_tolerance: float = 0.01, patience: int = 3, loss_key: str = "diag_loss_masked",
                 prior_key: str = "units_prior_entropy"):
        if patience < 1:
            raise ValueError(f"CollapseMonitor: patience must be >= 1, got {patience}")
        self.tstd_ratio, self.tstd_min, self.erank_ratio = tstd_ratio, tstd_min, erank_ratio
        self.loss_tolerance, self.patience = loss_tolerance, patience
        self.loss_key, self.prior_key = loss_key, prior_key
        self.at_prior = 0  # consecutive evaluations with the loss at the prior

    @staticmethod
    def _layers(record: dict, suffix: str) -> dict[int, float]:
        out = {}
        for k, v in record.items():
            if k.startswith("layer") and k.endswith(suffix) and k[5:-len(suffix)].isdigit():
                out[int(k[5:-len(suffix)])] = float(v)
        return dict(sorted(out.items()))

    def _layer_warnings(self, record: dict) -> list[str]:
        warnings = []
        tstd, erank = self._layers(record, "_tstd"), self._layers(record, "_erank")
        t0, r0 = tstd.get(0), erank.get(0)
        for i, t in tstd.items():
            if not math.isfinite(t):
                continue
            if i > 0 and t0 is not None and t0 > self.tstd_min and t < self.tstd_ratio * t0:
                warnings.append(f"layer {i} collapsed: temporal std {t:.2g} < {self.tstd_ratio:g} x layer 0's "
                                f"({t0:.2g})")
            elif t < self.tstd_min:
                warnings.append(f"layer {i} collapsed: temporal std {t:.2g} < {self.tstd_min:g} (its output is "
                                "constant over time)")
        for i, r in erank.items():
            if i > 0 and r0 is not None and math.isfinite(r) and r < self.erank_ratio * r0:
                warnings.append(f"effective rank of layer {i} fell to {r:.3g} (layer 0: {r0:.3g})")
        return warnings

    def _loss_warning(self, record: dict) -> list[str]:
        loss, prior = record.get(self.loss_key), record.get(self.prior_key)
        if loss is None or prior is None or not (math.isfinite(loss) and math.isfinite(prior)) or prior <= 0:
            return []
        tol = self.loss_tolerance
        self.at_prior = self.at_prior + 1 if loss > (1 - tol) * prior else 0
        if self.at_prior < self.patience:
            return []
        where = f"within {tol:.0%} of" if loss <= (1 + tol) * prior else "above"
        return [f"masked loss {loss:.3g} has stayed {where} the unit prior entropy {prior:.3g} for {self.at_prior} "
                "evaluations: the model predicts the label prior only"]

    def update(self, record: dict) -> list[str]:
        """Warnings for one evaluation's ``record`` (a dict of floats)."""
        return self._layer_warnings(record) + self._loss_warning(record)


# ------------------------------------------------------------------------------------------- a run's diagnostics
@dataclass
class DiagnosticsConfig:
    """Collapse diagnostics at the trainer's evaluations (``speechssl.train.diagnostics``)."""

    enabled: bool = True
    num_cuts: int = 8              # the fixed batch: first cuts of data.valid (else data.train / data.shar_dir)
    max_seconds: float = 4.0       # each of them cropped to its first seconds
    every: int = 0                 # 0 = at every trainer evaluation; N = at evaluations on multiples of N (+ the last)
    label_cuts: int = 200          # first cuts whose unit labels give the unit prior and PNMI (hubert, wavlm)
    tstd_ratio: float = 0.01       # warn: a layer's temporal std < tstd_ratio x layer 0's
    tstd_min: float = 1.0e-5       # warn: any layer's temporal std below this
    erank_ratio: float = 0.1       # warn: a layer's effective rank < erank_ratio x layer 0's
    loss_tolerance: float = 0.01   # warn: masked loss not more than this fraction below the unit prior entropy ...
    patience: int = 3              # ... for this many evaluations in a row

    def validate(self) -> None:
        for k in ("num_cuts", "label_cuts", "patience"):
            if getattr(self, k) < 1:
                raise ConfigError(f"config key 'diagnostics.{k}' must be >= 1, got {getattr(self, k)}")
        if self.every < 0:
            raise ConfigError(f"config key 'diagnostics.every' must be >= 0 (0 = at every evaluation), "
                              f"got {self.every}")
        if self.max_seconds <= 0:
            raise ConfigError(f"config key 'diagnostics.max_seconds' must be > 0, got {self.max_seconds}")


class RunDiagnostics:
    """The collapse diagnostics of one pretraining run, called at the trainer's evaluations (main process):
    ``(model, step) -> record``. A fixed batch is built on first use from the first ``num_cuts`` cuts of
    ``source_cuts()`` (each cropped to ``max_seconds``, read by ``make_batch(cuts) -> batch``), the unit label
    statistics of ``label_sets`` over the first ``label_cuts`` cuts are computed once, and a ``CollapseMonitor``
    follows the records; its warnings are logged and written to ``metrics_path`` on a line of their own."""

    def __init__(self, cfg: DiagnosticsConfig, *, max_steps: int, label_sets: list[str],
                 source_cuts: Callable[[], Iterable], make_batch: Callable[[list], dict], metrics_path: Path):
        self.cfg, self.max_steps, self.label_sets = cfg, max_steps, list(label_sets)
        self.source_cuts, self.make_batch, self.metrics_path = source_cuts, make_batch, Path(metrics_path)
        self.monitor = CollapseMonitor(tstd_ratio=cfg.tstd_ratio, tstd_min=cfg.tstd_min, erank_ratio=cfg.erank_ratio,
                                       loss_tolerance=cfg.loss_tolerance, patience=cfg.patience)
        self.batch: dict | None = None
        self.label_stats: dict[str, float] = {}

    def due(self, step: int) -> bool:
        every = self.cfg.every
        return every == 0 or step % every == 0 or step >= self.max_steps

    def _build(self) -> None:
        dg = self.cfg
        cuts = list(islice(iter(self.source_cuts()), max(dg.num_cuts, dg.label_cuts)))
        if not cuts:
            raise ConfigError("config key 'diagnostics.enabled': the data has no cuts to run diagnostics on; "
                              "check data.valid / data.train or set diagnostics.enabled=false")
        # cropped to the first seconds (the dataset keeps the encoder frame grid, so labels stay aligned)
        fixed = [c.truncate(duration=dg.max_seconds) if c.duration > dg.max_seconds else c for c in cuts[: dg.num_cuts]]
        self.batch = self.make_batch(fixed)
        if not self.batch["cut_ids"]:
            raise ConfigError(f"config key 'diagnostics.num_cuts': none of the first {len(fixed)} cuts could be "
                              "read; fix the data or set diagnostics.enabled=false")
        if self.label_sets:
            self.label_stats = label_statistics(cuts[: dg.label_cuts], self.label_sets)
        log.info("diagnostics: fixed batch of %d cuts (<= %.1f s each)%s", len(self.batch["cut_ids"]),
                 dg.max_seconds, f", unit labels of {min(len(cuts), dg.label_cuts)} cuts" if self.label_stats else "")

    @staticmethod
    def _objective_logs(model, batch) -> dict[str, float]:
        """The objective's logs on the fixed batch, prefixed ``diag_``, with the same masks at every evaluation
        (seed 0), so that changes come from the model, not from the masks. The RNGs (global, or a mask generator
        of the objective's own) are restored afterwards: the diagnostics do not shift the training masks."""
        gen = getattr(model, "_gen", None)
        state = gen.get_state() if isinstance(gen, torch.Generator) else None
        device = batch["audio"].device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.default_generator.manual_seed(0)
                if device.type == "cuda":
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(0)  # this device only: the one fork_rng restores
                if state is not None:
                    gen.manual_seed(0)
                logs = model(batch).scalar_logs()
        finally:
            if state is not None:
                gen.set_state(state)
        return {f"diag_{k}": v for k, v in logs.items()}

    def __call__(self, model, step: int) -> dict[str, float]:
        from speechssl.train.runtime import move_to_device
        from speechssl.utils.io import append_jsonl

        if self.batch is None:
            self._build()
        batch = move_to_device(self.batch, next(model.parameters()).device)
        rec = layer_diagnostics(model.encoder, batch)
        rec.update(self._objective_logs(model, batch))
        rec.update(self.label_stats)
        warnings = self.monitor.update(rec)
        for w in warnings:
            log.warning("step %d: %s", step, w)
        if warnings:  # the trainer's record holds floats only: the text goes on a line of its own
            append_jsonl(self.metrics_path, {"step": step, "split": "diagnostics", "warnings": warnings})
        rec["collapse_warnings"] = float(len(warnings))
        return rec


def label_statistics(cuts, names: list[str]) -> dict[str, float]:
    """Unit prior per label set (``units_{name}_prior_entropy`` ...; ``units_prior_entropy`` / ``_acc`` average
    the sets, as the objective's masked loss and accuracy do) and, on cuts with a phone alignment, PNMI and
    purities of the labels against the phones at the label rate."""
    from speechssl.data.labels import alignment_frame_labels, has_alignment, label_rate, load_units

    out: dict[str, float] = {}
    for name in names:
        units, phones, phone_ids = [], [], {}
        for cut in cuts:
            try:
                u = load_units(cut, name)
            except (KeyError, OSError, ValueError):
                continue  # a cut the training skips as well
            units.append(u)
            if has_alignment(cut, "phone"):
                sym = alignment_frame_labels(cut, len(u), frame_rate=label_rate(cut, name))
                phones.append(np.array([phone_ids.setdefault(x, len(phone_ids)) if x is not None else -1
                                        for x in sym], dtype=np.int64))
            else:
                phones.append(np.full(len(u), -1, dtype=np.int64))
        if not units:
            continue
        u, p = np.concatenate(units), np.concatenate(phones)
        for k, v in unit_statistics(u).items():
            out[f"units_{name}_{k}"] = v
        if (p >= 0).any():
            out[f"units_{name}_pnmi"] = pnmi(u, p)
            out[f"units_{name}_phone_purity"], out[f"units_{name}_cluster_purity"] = purity(u, p)
    for k in ("prior_entropy", "prior_acc"):
        vals = [out[f"units_{n}_{k}"] for n in names if f"units_{n}_{k}" in out]
        if vals:
            out[f"units_{k}"] = sum(vals) / len(vals)
    return out


