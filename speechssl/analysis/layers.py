"""What each layer knows: per layer of one or more upstreams, a frame-level phone probe, an utterance-level
speaker probe and the phone quality of k-means units of the layer.

For every model and layer (hidden state ``i``; 0 is the input of the first transformer layer):

- ``phone_acc``: accuracy on the held-out cuts' labelled frames of a linear probe (:mod:`.probes`) fitted on
  (at most ``max_frames`` of) the training cuts' labelled frames;
- ``speaker_acc``: accuracy on held-out utterances of a linear probe on mean-pooled states, fitted on the
  training utterances of the same speakers (not for FBANK / MFCC: their per-utterance mean normalisation makes
  every mean-pooled vector zero);
- ``pnmi``, ``phone_purity``, ``cluster_purity`` (:mod:`.units`): k-means with ``n_clusters`` centres fitted
  on (at most ``max_frames`` of) the training cuts' frames, applied to the held-out cuts' frames and compared
  with their phones.

A measure without labels (no phone alignment, fewer than two speakers) is None. The upstreams are model paths,
``random:PRESET_OR_MODEL`` (the same architecture with fresh weights drawn from the seed: what pretraining
adds) or ``fbank`` / ``mfcc`` (a single state: a reference line). With several ``seeds`` each seed redraws the
k-means init, the frame subsets and the weights of the random-init controls; the table gives the mean and
standard deviation over seeds.

The report (``analyze`` -> dict, written as JSON by the command) holds ``models`` (name, spec, number of states,
frame rate, chance levels), ``rows`` (one per model, seed and layer), ``table`` (one per model and layer: mean
and std over seeds) and ``best`` (measure -> model -> the layer with the highest mean; ties go to the lower
layer).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from speechssl.analysis.probes import chance_accuracy, probe_accuracy
from speechssl.analysis.states import Utterance, collect_states, split_by_speaker
from speechssl.analysis.units import layer_units, unit_quality

__all__ = ["MEASURES", "AnalyzeSettings", "analyze", "analyze_layer", "best_layer", "load_cuts"]
log = logging.getLogger(__name__)

MEASURES = ("phone_acc", "speaker_acc", "pnmi", "phone_purity", "cluster_purity")
REPORT_VERSION = 1


@dataclass
class AnalyzeSettings:
    """How the analysis samples, fits and scores (see the module docstring)."""

    n_clusters: int = 100            # k-means centres per layer
    eval_fraction: float = 0.25      # share of each speaker's cuts held out (without eval cuts of their own)
    max_utts: int = 0                # analyse a seeded random subset of this many cuts (0: all)
    max_frames: int = 50000          # training frames the phone probe and k-means are fitted on
    l2: float = 1.0                  # probe penalty (scikit-learn C = 1 / l2)
    probe_iters: int = 50            # L-BFGS iterations per probe
    kmeans_iters: int = 50           # Lloyd passes per k-means
    seeds: list[int] = field(default_factory=lambda: [0])
    layers: list[int] | None = None  # hidden-state indices of the encoders (None: all); features have one
    device: str = "cpu"
    batch_seconds: float = 60.0      # padded audio per upstream batch
    progress: bool = True


def load_cuts(path: str, eval_path: str | None, settings: AnalyzeSettings) -> tuple[list, list]:
    """(training cuts, held-out cuts): ``eval_path``'s cuts when given, else a per-speaker split of ``path``'s
    (``split_by_speaker``); with ``max_utts`` each side is a seeded random subset (first seed)."""
    from speechssl.data.loader import open_cuts

    cuts = list(open_cuts([path], "cuts"))
    if not cuts:
        raise ValueError(f"argument 'cuts': {path} holds no cuts")
    seed = settings.seeds[0]
    if eval_path:
        train, held = cuts, list(open_cuts([eval_path], "eval_cuts"))
        train, held = _subset(train, settings.max_utts, seed), _subset(held, settings.max_utts, seed + 1)
    else:
        train, held = split_by_speaker(_subset(cuts, settings.max_utts, seed), settings.eval_fraction, seed)
    if not train or not held:
        raise ValueError(f"argument 'cuts': {path} gives {len(train)} training and {len(held)} held-out cuts; the probes "
                         "need both (give eval_cuts, or cuts of speakers with at least two utterances)")
    return train, held


def _subset(cuts: list, n: int, seed: int) -> list:
    if not n or len(cuts) <= n:
        return cuts
    keep = np.random.default_rng(seed).choice(len(cuts), n, replace=False)
    return [cuts[i] for i in sorted(keep)]


def _rows_subset(n: int, max_n: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= max_n else np.sort(rng.choice(n, max_n, replace=False))


def _frames(utts: Sequence[Utterance], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacked frames [N, D] float32 of hidden state ``layer`` and their phone ids [N]."""
    x = torch.cat([u.states[layer] for u in utts]).numpy()
    return x, np.concatenate([u.phones for u in utts])


def _nan_to_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _pooled(utts: Sequence[Utterance], layer: int) -> torch.Tensor:
    """Each utterance's mean over its frames of hidden state ``layer``: [N, D]."""
    return torch.stack([u.states[layer].mean(0) for u in utts])


def _speaker_probe(train: Sequence[Utterance], held: Sequence[Utterance], layer: int,
                   s: AnalyzeSettings) -> float | None:
    ids: dict[str, int] = {}
    for u in train:
        if u.speaker is not None:
            ids.setdefault(u.speaker, len(ids))
    tr = [u for u in train if u.speaker is not None]
    ev = [u for u in held if u.speaker in ids]
    if len(ids) < 2 or not ev:
        return None
    return probe_accuracy(_pooled(tr, layer), [ids[u.speaker] for u in tr], _pooled(ev, layer),
                          [ids[u.speaker] for u in ev], l2=s.l2, max_iter=s.probe_iters)


def analyze_layer(train: Sequence[Utterance], held: Sequence[Utterance], layer: int, settings: AnalyzeSettings,
                  seed: int = 0, speaker: bool = True) -> dict[str, float | None]:
    """The measures (``MEASURES``) of hidden state ``layer``: probes and k-means fitted on ``train``, scored on
    ``held``; ``speaker=False`` leaves the speaker probe out (None)."""
    s, rng = settings, np.random.default_rng(seed)
    x_tr, y_tr = _frames(train, layer)
    x_ev, y_ev = _frames(held, layer)
    out: dict[str, float | None] = dict.fromkeys(MEASURES)
    lab_tr, lab_ev = np.flatnonzero(y_tr >= 0), np.flatnonzero(y_ev >= 0)
    if lab_tr.size and lab_ev.size:
        pick = lab_tr[_rows_subset(lab_tr.size, s.max_frames, rng)]
        out["phone_acc"] = probe_accuracy(x_tr[pick], y_tr[pick], x_ev[lab_ev], y_ev[lab_ev], l2=s.l2,
                                          max_iter=s.probe_iters)
    out["speaker_acc"] = _speaker_probe(train, held, layer, s) if speaker else None
    if lab_ev.size:
        fit = x_tr[_rows_subset(len(x_tr), s.max_frames, rng)]
        units = layer_units(fit, x_ev[lab_ev], s.n_clusters, seed=seed, max_iter=s.kmeans_iters,
                            device=s.device)
        out.update(unit_quality(units, y_ev[lab_ev]))
    return {k: _nan_to_none(v) for k, v in out.items()}


def _chance(train: Sequence[Utterance], held: Sequence[Utterance]) -> dict[str, float | None]:
    """Accuracy of always answering the most frequent training phone / speaker, on the held-out side."""
    y_tr, y_ev = np.concatenate([u.phones for u in train]), np.concatenate([u.phones for u in held])
    phone = chance_accuracy(y_tr[y_tr >= 0], y_ev[y_ev >= 0]) if (y_tr >= 0).any() else None
    spk = {s: i for i, s in enumerate(sorted({u.speaker for u in train if u.speaker is not None}))}
    ev = [spk[u.speaker] for u in held if u.speaker in spk]
    speaker = chance_accuracy([spk[u.speaker] for u in train if u.speaker in spk], ev) if ev else None
    return {"phone_acc": _nan_to_none(phone), "speaker_acc": _nan_to_none(speaker)}


def _layers_of(num_states: int, wanted: list[int] | None, name: str) -> list[int]:
    if num_states == 1 or wanted is None:
        return list(range(num_states))
    bad = [i for i in wanted if not 0 <= i < num_states]
    if bad:
        raise ValueError(f"settings.layers {bad}: {name} has hidden states 0..{num_states - 1} (0 = the input of the "
                         "first transformer layer)")
    return list(wanted)


def _model_rows(spec: str, name: str, train_cuts: list, held_cuts: list, s: AnalyzeSettings,
                entry: dict) -> list[dict]:
    """Rows of one upstream spec over every seed; fills ``entry`` (the report's model description)."""
    from speechssl.superb.upstream import build_upstream, is_random_spec

    rows, utts = [], None
    for seed in s.seeds:
        if utts is None or is_random_spec(spec):  # only a random-init control changes with the seed
            upstream = build_upstream(spec, seed=seed, map_location=s.device)
            vocab: dict[str, int] = {}
            utts = (collect_states(upstream, train_cuts, vocab, device=s.device, batch_seconds=s.batch_seconds,
                                   progress=s.progress),
                    collect_states(upstream, held_cuts, vocab, device=s.device, batch_seconds=s.batch_seconds,
                                   progress=s.progress))
            # features normalised per utterance (FBANK / MFCC CMVN) have a zero mean: no speaker line for them
            speaker = not getattr(upstream, "cmvn", False)
            entry.update(num_states=upstream.num_states, frame_rate=16000 / upstream.downsample_rate,
                         reference=upstream.num_states == 1, chance=_chance(*utts), phones=len(vocab),
                         speaker_probe=speaker)
            del upstream
        for layer in _layers_of(entry["num_states"], s.layers, name):
            rec = analyze_layer(utts[0], utts[1], layer, s, seed=seed, speaker=entry["speaker_probe"])
            log.info("%s seed %d layer %d: %s", name, seed, layer,
                     ", ".join(f"{k} {v:.3f}" for k, v in rec.items() if v is not None))
            rows.append({"model": name, "seed": seed, "layer": layer, **rec})
    return rows


def _table(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every measure, one entry per model and layer (in the rows' order)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["layer"]), []).append(r)
    out = []
    for (model, layer), rs in groups.items():
        entry: dict = {"model": model, "layer": layer, "seeds": len(rs)}
        for m in MEASURES:
            vals = [r[m] for r in rs if r[m] is not None]
            entry[m] = float(np.mean(vals)) if vals else None
            entry[f"{m}_std"] = float(np.std(vals)) if len(vals) > 1 else (0.0 if vals else None)
        out.append(entry)
    return out


def _names(specs: Sequence[str]) -> list[str]:
    """Short, distinct model names (``speechssl.superb.report.upstream_label``; a repeated one gets ``_2``...)."""
    from speechssl.superb.report import upstream_label

    names: list[str] = []
    for spec in specs:
        base = upstream_label(spec)
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def best_layer(report: dict, measure: str = "pnmi", model: str | None = None) -> int:
    """The layer with the highest mean ``measure`` of ``model`` (default: the only model with several states);
    ties go to the lower layer. ValueError when the measure was not computed or the model is ambiguous."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure '{measure}'; choose from {', '.join(MEASURES)}")
    if model is None:
        encoders = [m["name"] for m in report["models"] if not m["reference"]]
        if len(encoders) != 1:
            raise ValueError(f"best layer: name one model of {encoders} (several have layers)")
        model = encoders[0]
    found = [(e[measure], -e["layer"]) for e in report["table"] if e["model"] == model and e[measure] is not None]
    if not found:
        raise ValueError(f"best layer: no '{measure}' for model '{model}' (no phone alignments or speakers on the "
                         "cuts, or no such model in the report)")
    return -max(found)[1]


def analyze(specs: Sequence[str], cuts: str, eval_cuts: str | None = None,
            settings: AnalyzeSettings | None = None) -> dict:
    """The layer analysis report of the upstreams ``specs`` on the cut manifest ``cuts`` (module docstring)."""
    s = settings or AnalyzeSettings()
    if not s.seeds:
        raise ValueError("settings.seeds is empty: give at least one seed")
    if s.n_clusters < 2:
        raise ValueError(f"settings.n_clusters must be >= 2, got {s.n_clusters}")
    train, held = load_cuts(cuts, eval_cuts, s)
    log.info("layer analysis on %d training and %d held-out cuts", len(train), len(held))
    models, rows = [], []
    for spec, name in zip(specs, _names(specs)):
        entry = {"name": name, "spec": str(spec)}
        rows += _model_rows(str(spec), name, train, held, s, entry)
        models.append(entry)
    report = {"version": REPORT_VERSION, "cuts": str(cuts), "eval_cuts": eval_cuts,
              "cuts_used": {"train": len(train), "held_out": len(held)}, "settings": asdict(s),
              "models": models, "rows": rows, "table": _table(rows)}
    report["best"] = {m: _best_of_all(report, m) for m in MEASURES}
    return report


def _best_of_all(report: dict, measure: str) -> dict[str, int]:
    out = {}
    for m in report["models"]:
        if not m["reference"]:
            try:
                out[m["name"]] = best_layer(report, measure, m["name"])
            except ValueError:
                continue  # the measure was not computed for this model
    return out
