"""The six SUPERB tasks and ML-SUPERB's two: which supervision field they read, their head, loss and metric.

A task turns features [B, T, D] from the featurizer into a loss (training) and into a metric over a split
(evaluation). Label vocabularies (characters, phones, speakers, classes) are fitted on the training split only
and saved with the experiment.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from speechssl.constants import SAMPLE_RATE
from speechssl.data.audio import supervision_field
from speechssl.superb import metrics
from speechssl.superb.cache import Example
from speechssl.superb.decoding import build_decoder
from speechssl.superb.heads import AMSoftmax, CTCHead, LinearCTCHead, MeanPoolHead, SpecAugment, XVectorHead
from speechssl.superb.tokenizer import build_tokenizer, load_tokenizer

__all__ = ["HeadConfig", "SpecAugConfig", "DecodingConfig", "Task", "CTCTask", "MultilingualCTCTask",
           "ClassificationTask", "VerificationTask", "language_of", "build_task", "TASKS", "read_trials"]

# Batches handed to ``Task.evaluate``: (examples, features [B, T, D], frames [B])
EvalBatch = tuple[Sequence[Example], torch.Tensor, torch.Tensor]


@dataclass
class HeadConfig:
    """Head sizes; the defaults are SUPERB's, the mini configs shrink them."""

    proj_dim: int = 256           # first Linear of every head (ASR 1024, ASV 512)
    pool_activation: Literal["relu", "none"] = "relu"  # SID/ER/KS: nonlinearity before mean pooling
    hidden: int = 1024            # ASR BiLSTM width
    num_layers: int = 2           # ASR BiLSTM layers
    dropout: float = 0.2
    frame_ms: float = 0.0         # ASR: stack adjacent frames up to this frame shift before the BiLSTM (0 = none)
    tdnn_channels: list[int] = field(default_factory=lambda: [512, 512, 512, 512, 1500])
    tdnn_kernels: list[int] = field(default_factory=lambda: [5, 3, 3, 1, 1])
    tdnn_dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 1, 1])
    embed_dim: int = 512          # ASV x-vector size
    am_scale: float = 30.0
    am_margin: float = 0.4


@dataclass
class SpecAugConfig:
    enabled: bool = True          # ASR only
    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 2
    time_width: int = 40
    time_ratio: float = 0.05


@dataclass
class DecodingConfig:
    name: str = "greedy"          # greedy | beam (CTC prefix beam search) | any registered decoder
    beam_size: int = 10


def _labels_tensor(ids: Sequence[int], device) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.long, device=device)


class Task:
    """Base class. Subclasses set ``name``, ``field`` (supervision field), ``metric``, ``higher_better``."""

    name: str
    field: str
    metric: str
    higher_better: bool
    balanced: bool = False        # class-balanced training batches (KS)

    def fit(self, train: Sequence[Example], work_dir: str | os.PathLike) -> None:
        """Fit the label vocabulary on the training examples and save it under ``work_dir``."""

    def build_head(self, in_dim: int, downsample_rate: int | None = None) -> nn.Module:
        """A fresh head for features of ``in_dim`` dims at ``downsample_rate`` samples per frame."""
        raise NotImplementedError

    def loss(self, head: nn.Module, x: torch.Tensor, frames: torch.Tensor,
             examples: Sequence[Example]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, head: nn.Module, examples: Sequence[Example], x: torch.Tensor, frames: torch.Tensor) -> list:
        """Per-utterance outputs of one evaluation batch (small picklable records: ranks gather them)."""
        raise NotImplementedError

    def score(self, records: Sequence, **context) -> dict:
        """The split's metrics from the records of all its batches."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, head: nn.Module, batches: Iterable[EvalBatch], **context) -> dict:
        """Score a whole split on one process: :meth:`score` over :meth:`predict` of every batch."""
        return self.score([r for ex, x, frames in batches for r in self.predict(head, ex, x, frames)], **context)

    def better(self, a: float, b: float | None) -> bool:
        """Is dev score ``a`` better than ``b``?"""
        return b is None or (a > b if self.higher_better else a < b)


# ------------------------------------------------------------------------------------------------- CTC tasks


class CTCTask(Task):
    """ASR (characters or BPE, BiLSTM head, SpecAugment) and PR (phones, two linear layers)."""

    def __init__(self, name: str, head_cfg: HeadConfig, tokenizer: str = "char", vocab_size: int = 300,
                 specaug: SpecAugConfig | None = None, decoding: DecodingConfig | None = None):
        self.name, self.head_cfg, self.tokenizer_kind, self.vocab_size = name, head_cfg, tokenizer, vocab_size
        if name == "asr":
            self.field, self.metric = "text", "wer"
        elif name == "mlasr":
            self.field, self.metric = "text", "cer"
        else:
            self.field, self.metric = "phones", "per"
        self.higher_better = False
        self.specaug_cfg = specaug or SpecAugConfig(enabled=name in ("asr", "mlasr"))
        self.decoding = decoding or DecodingConfig()
        self.tokenizer = None

    def fit(self, train, work_dir):
        texts = [str(e.label) for e in train]
        self.tokenizer = build_tokenizer(self.tokenizer_kind, texts, work_dir=work_dir, vocab_size=self.vocab_size)
        self.tokenizer.save(Path(work_dir) / "tokenizer.json")

    def load(self, work_dir):
        self.tokenizer = load_tokenizer(Path(work_dir) / "tokenizer.json")

    def build_head(self, in_dim, downsample_rate=None):
        c, V = self.head_cfg, self.tokenizer.vocab_size
        if self.name in ("asr", "mlasr"):
            stack = 1
            if c.frame_ms > 0 and downsample_rate:  # the same output frame shift whatever the upstream's
                stack = max(1, int(round(c.frame_ms * SAMPLE_RATE / 1000 / downsample_rate)))
            body = CTCHead(in_dim, V, proj_dim=c.proj_dim, hidden=c.hidden, num_layers=c.num_layers,
                           dropout=c.dropout, stack=stack)
        else:
            body = LinearCTCHead(in_dim, V, proj_dim=c.proj_dim)
        s = self.specaug_cfg
        aug = SpecAugment(s.freq_masks, s.freq_width, s.time_masks, s.time_width, s.time_ratio) if s.enabled else None
        return _AugmentedHead(body, aug)

    def loss(self, head, x, frames, examples):
        log_probs = head(x, frames)
        frames = head.output_lengths(frames)
        targets = [self.tokenizer.encode(str(e.label)) for e in examples]
        tl = _labels_tensor([len(t) for t in targets], x.device)
        flat = _labels_tensor([i for t in targets for i in t], x.device)
        loss = F.ctc_loss(log_probs.transpose(0, 1).float(), flat, frames, tl, blank=0, reduction="mean",
                          zero_infinity=True)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict(self, head, examples, x, frames):
        extra = {"beam_size": self.decoding.beam_size} if self.decoding.name == "beam" else {}
        decoder = build_decoder(self.decoding.name, blank=0, **extra)
        log_probs = head(x, frames).float()
        return [(" ".join(str(e.label).split()), self.tokenizer.decode(ids))
                for ids, e in zip(decoder(log_probs, head.output_lengths(frames)), examples)]

    def score(self, records, **context):
        refs, hyps = [r for r, _ in records], [h for _, h in records]
        if self.name == "asr":
            return {"wer": metrics.wer(refs, hyps), "cer": metrics.cer(refs, hyps), "num_utts": len(refs),
                    "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}
        return {"per": metrics.per(refs, hyps), "num_utts": len(refs),
                "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}


def language_of(example: Example) -> str:
    """The ``language`` supervision field of an example's cut (ML-SUPERB's manifests carry it)."""
    lang = supervision_field(example.cut, "language") if example.cut is not None else None
    if lang is None or lang == "":
        raise ValueError(f"cut {example.id} has no supervision field 'language', which task mlasr scores by: "
                         "prepare the data with `speechssl prepare mlsuperb` or `prepare mini-multilingual`")
    return str(lang)


class MultilingualCTCTask(CTCTask):
    """ML-SUPERB multilingual ASR: one character vocabulary over every language, the ASR head (BiLSTM + CTC) on
    the frozen upstream's weighted layers; CER per language and their mean (the primary metric, so that every
    language weighs the same however many test utterances it has), plus the CER over all characters."""

    def __init__(self, head_cfg: HeadConfig, specaug: SpecAugConfig | None = None,
                 decoding: DecodingConfig | None = None):
        super().__init__("mlasr", head_cfg, tokenizer="char", specaug=specaug, decoding=decoding)

    @torch.no_grad()
    def predict(self, head, examples, x, frames):
        pairs = super().predict(head, examples, x, frames)
        return [(language_of(e), ref, hyp) for e, (ref, hyp) in zip(examples, pairs)]

    def score(self, records, **context):
        by_lang: dict[str, list[tuple[str, str]]] = {}
        for lang, ref, hyp in records:
            by_lang.setdefault(lang, []).append((ref, hyp))
        per_lang = {lang: metrics.cer([r for r, _ in rh], [h for _, h in rh]) for lang, rh in sorted(by_lang.items())}
        return {"cer": float(np.mean(list(per_lang.values()))), "cer_per_language": per_lang,
                "cer_all": metrics.cer([r for _, r, _ in records], [h for _, _, h in records]),
                "num_utts": len(records), "num_languages": len(per_lang),
                "examples": [{"language": g, "ref": r, "hyp": h} for g, r, h in list(records)[:3]]}


class _AugmentedHead(nn.Module):
    def __init__(self, body: nn.Module, aug: nn.Module | None):
        super().__init__()
        self.body, self.aug = body, aug

    def forward(self, x, frames):
        if self.aug is not None:
            x = self.aug(x, frames)
        return self.body(x, frames)

    def output_lengths(self, frames):
        return self.body.output_lengths(frames)


# ------------------------------------------------------------------------------------- utterance classification


class ClassificationTask(Task):
    """SID (speaker), ER (emotion), KS (keyword) and ML-SUPERB's LID (language): mean pooling + linear,
    accuracy."""

    FIELDS = {"sid": "speaker", "er": "emotion", "ks": "keyword", "lid": "language"}

    def __init__(self, name: str, head_cfg: HeadConfig, balanced: bool = False):
        self.name, self.head_cfg, self.balanced = name, head_cfg, balanced
        self.field, self.metric, self.higher_better = self.FIELDS[name], "acc", True
        self.classes: list[str] = []

    def fit(self, train, work_dir):
        self.classes = sorted({str(e.label) for e in train})
        if len(self.classes) < 2:
            raise ValueError(f"{self.name}: the training split has {len(self.classes)} class(es) in field "
                             f"'{self.field}'; need at least 2")
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        (Path(work_dir) / "classes.json").write_text(json.dumps(self.classes))

    def load(self, work_dir):
        self.classes = json.loads((Path(work_dir) / "classes.json").read_text())

    def label_ids(self, examples, device) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.classes)}
        out = []
        for e in examples:
            if str(e.label) not in index:
                raise ValueError(f"{self.name}: cut {e.id} has {self.field}={e.label!r}, which the training split "
                                 f"never shows (known: {self.classes[:10]}...)")
            out.append(index[str(e.label)])
        return _labels_tensor(out, device)

    def build_head(self, in_dim, downsample_rate=None):
        return MeanPoolHead(in_dim, len(self.classes), proj_dim=self.head_cfg.proj_dim,
                            activation=self.head_cfg.pool_activation)

    def loss(self, head, x, frames, examples):
        logits = head(x, frames)
        y = self.label_ids(examples, x.device)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": float(loss.detach()), "acc": float((logits.detach().argmax(-1) == y).float().mean())}

    @torch.no_grad()
    def predict(self, head, examples, x, frames):
        return list(zip(head(x, frames).argmax(-1).tolist(), self.label_ids(examples, x.device).tolist()))

    def score(self, records, **context):
        preds, labels = [p for p, _ in records], [y for _, y in records]
        return {"acc": metrics.accuracy(preds, labels), "num_utts": len(labels)}


# ------------------------------------------------------------------------------------------------ verification


def read_trials(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """Trial list lines ``1|0 ENROLL_ID TEST_ID`` (VoxCeleb style) -> [(label, enroll, test)]."""
    trials = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[0] not in ("0", "1"):
                raise ValueError(f"{path}:{n}: expected '1|0 ENROLL_ID TEST_ID', got {line.strip()!r}")
            trials.append((int(parts[0]), parts[1], parts[2]))
    if not trials:
        raise ValueError(f"{path}: no trials")
    return trials


def make_trials(examples: Sequence[Example], max_trials: int = 2000, seed: int = 0) -> list[tuple[int, str, str]]:
    """Balanced target / non-target trials among held-out utterances (the ASV dev set; never the test trials)."""
    rng = np.random.default_rng(seed)
    by_spk: dict[str, list[str]] = {}
    for e in examples:
        by_spk.setdefault(str(e.label), []).append(e.id)
    ids = [e.id for e in examples]
    spk = {e.id: str(e.label) for e in examples}
    targets = [(1, a, b) for utts in by_spk.values() for i, a in enumerate(utts) for b in utts[i + 1:]]
    if not targets or len(by_spk) < 2:
        raise ValueError("ASV dev trials need at least two speakers with two held-out utterances each")
    rng.shuffle(targets)
    targets = targets[: max_trials // 2]
    nontargets = []
    for _ in range(len(targets) * 20):
        if len(nontargets) >= len(targets):
            break
        a, b = rng.choice(len(ids), 2, replace=False)
        if spk[ids[a]] != spk[ids[b]]:
            nontargets.append((0, ids[a], ids[b]))
    return targets + nontargets


class VerificationTask(Task):
    """ASV: x-vector TDNN + statistics pooling trained with AM-softmax over training speakers; cosine scoring of
    trials; EER (primary) and minDCF."""

    name, field, metric, higher_better = "asv", "speaker", "eer", False

    def __init__(self, head_cfg: HeadConfig, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0):
        self.head_cfg, self.p_target, self.c_miss, self.c_fa = head_cfg, p_target, c_miss, c_fa
        self.classes: list[str] = []

    fit = ClassificationTask.fit
    load = ClassificationTask.load
    label_ids = ClassificationTask.label_ids

    def build_head(self, in_dim, downsample_rate=None):
        c = self.head_cfg
        return _XVectorAM(XVectorHead(in_dim, c.proj_dim, c.tdnn_channels, c.tdnn_kernels, c.tdnn_dilations,
                                      c.embed_dim),
                          AMSoftmax(c.embed_dim, len(self.classes), c.am_scale, c.am_margin))

    def loss(self, head, x, frames, examples):
        y = self.label_ids(examples, x.device)
        loss, cos = head.am(head.xvector(x, frames), y)
        return loss, {"loss": float(loss.detach()), "acc": float((cos.detach().argmax(-1) == y).float().mean())}

    @torch.no_grad()
    def predict(self, head, examples, x, frames):
        emb = F.normalize(head.xvector(x, frames).float(), dim=-1).cpu()
        return [(e.id, v) for e, v in zip(examples, emb)]

    def score(self, records, trials: Sequence[tuple[int, str, str]] = (), **context):
        emb: dict[str, torch.Tensor] = dict(records)
        missing = {u for _, a, b in trials for u in (a, b) if u not in emb}
        if missing:
            raise ValueError(f"asv: {len(missing)} trial utterances are not in the evaluated split, e.g. "
                             f"{sorted(missing)[:3]} (check data.trials against the test split)")
        scores = [float(emb[a] @ emb[b]) for _, a, b in trials]
        labels = [lab for lab, _, _ in trials]
        return {"eer": metrics.eer(scores, labels),
                "min_dcf": metrics.min_dcf(scores, labels, self.p_target, self.c_miss, self.c_fa),
                "num_trials": len(trials)}


class _XVectorAM(nn.Module):
    def __init__(self, xvector: XVectorHead, am: AMSoftmax):
        super().__init__()
        self.xvector, self.am = xvector, am


TASKS = ("asr", "pr", "sid", "asv", "er", "ks", "lid", "mlasr")


def build_task(name: str, head: HeadConfig, *, tokenizer: str = "char", vocab_size: int = 300,
               specaug: SpecAugConfig | None = None, decoding: DecodingConfig | None = None,
               balanced: bool | None = None, p_target: float = 0.01, c_miss: float = 1.0,
               c_fa: float = 1.0) -> Task:
    if name in ("asr", "pr"):
        return CTCTask(name, head, tokenizer="phone" if name == "pr" else tokenizer, vocab_size=vocab_size,
                       specaug=specaug if name == "asr" else SpecAugConfig(enabled=False), decoding=decoding)
    if name == "mlasr":
        return MultilingualCTCTask(head, specaug=specaug, decoding=decoding)
    if name in ("sid", "er", "ks", "lid"):
        return ClassificationTask(name, head, balanced=(name == "ks") if balanced is None else balanced)
    if name == "asv":
        return VerificationTask(head, p_target=p_target, c_miss=c_miss, c_fa=c_fa)
    raise ValueError(f"unknown task '{name}' (config key task); choose from {list(TASKS)}")
