"""Discrete units for HuBERT-style pretraining: features from cuts -> k-means -> frame labels on cuts.

- :class:`FeatureReader` turns cuts into frame features: 39-dim MFCC (13 + deltas + delta-deltas, 100 Hz, HuBERT
  iteration 1) or the hidden states of layer N of any model ``speechssl.load_pretrained`` reads (50 Hz for
  a CNN front end, 25 Hz for a 40 ms fbank front end).
- :func:`fit_kmeans` streams features of a sampled fraction of the cuts (as the references do: ~10%), fits
  :class:`speechssl.cluster.KMeans` and saves it (``kmeans.safetensors`` + ``kmeans.json``, whose ``meta``
  records how to recompute the features).
- :func:`label_cuts` recomputes the same features for every cut, predicts units and stores them on the cut with
  ``speechssl.data.labels.store_units`` (lossless ``NumpyFilesWriter`` arrays), writing a new manifest.

Cuts are read through ``speechssl.data.loader.open_cuts`` (lazily) and their audio through the same
``SpeechDataset`` as training batches (bad audio raises :class:`~speechssl.data.audio.BadCutError`). Features
are held in RAM for the fit, or in a float32 file on disk (``store="disk"``) when they would not fit.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from speechssl.cluster import KMeans
from speechssl.constants import SAMPLE_RATE
from speechssl.data.dataset import SpeechDataset
from speechssl.data.loader import open_cuts
from speechssl.utils.progress import progress_bar

log = logging.getLogger(__name__)

MFCC_FRAME_SHIFT = 0.01
# hand-crafted unit features: 39-dim MFCC (+ deltas), raw or normalised per utterance (mean and variance per
# coefficient over the utterance: targets about what is said rather than about the speaker or the channel)
HANDCRAFTED = ("mfcc", "mfcc_cmvn")

__all__ = ["FeatureSpec", "FeatureReader", "fit_kmeans", "label_cuts"]


@dataclass
class FeatureSpec:
    """How units' features are computed; saved in ``kmeans.json`` so that ``label`` recomputes the same ones."""

    feature: str  # "mfcc", "mfcc_cmvn" or a model path
    layer: int | None = None
    frame_shift: float = MFCC_FRAME_SHIFT  # seconds per feature frame (= label period)
    dim: int = 39


class FeatureReader:
    """Frame features of cuts: ``reader(cuts) -> list of float32 arrays [T_i, D]``.

    Args:
        feature: "mfcc", "mfcc_cmvn" (normalised per utterance), or a model (directory / checkpoint path, or an
            Encoder) whose ``hidden_states[layer]``
            are the features (index 0 = transformer input, i = output of layer i, as transformers defines them).
        layer: required for a model.
        device: where the model runs.
        batch_size: cuts per forward for MFCC; models run one cut at a time (group-norm CNNs are not
            padding-invariant, so padded batches would change the features and hence the units).
    """

    def __init__(self, feature, layer: int | None = None, device: str = "cpu", batch_size: int = 16):
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.audio = SpeechDataset()  # padded waveform batches, bad audio raises BadCutError
        if isinstance(feature, str) and feature in HANDCRAFTED:
            if layer is not None:
                raise ValueError(f"argument 'layer' applies to model features, not {feature!r}: leave it unset")
            self.model = None
            self.spec = FeatureSpec(feature, None, MFCC_FRAME_SHIFT, 39)
            return
        if isinstance(feature, torch.nn.Module):
            model, name = feature, "<encoder>"
        else:
            path = Path(feature)
            if not path.exists():
                raise FileNotFoundError(f"argument 'feature' must be one of {'|'.join(HANDCRAFTED)} or an existing "
                                        f"model path; {path} does not exist")
            from speechssl import load_pretrained

            model, name = load_pretrained(str(path)), str(path.resolve())
        if layer is None:
            raise ValueError(f"model features need argument 'layer' (0..{model.num_layers})")
        if not 0 <= int(layer) <= model.num_layers:
            raise ValueError(f"argument 'layer' ({layer}) is out of range: the model has layers 0..{model.num_layers}")
        self.model = model.to(self.device).eval()
        self.layer = int(layer)
        self.spec = FeatureSpec(name, int(layer), model.downsample_rate / SAMPLE_RATE, int(model.hidden_size))

    @classmethod
    def from_spec(cls, spec: dict, device: str = "cpu") -> "FeatureReader":
        return cls(spec["feature"], spec.get("layer"), device=device)

    @torch.inference_mode()
    def __call__(self, cuts) -> list[np.ndarray]:
        batch = self.audio[list(cuts)]
        audio, lens = batch["audio"], batch["audio_lens"]
        if self.model is None:
            from speechssl.data.features import compute_mfcc

            feats, n = compute_mfcc(audio, lens)
            out = [feats[i, : int(n[i])].numpy().astype(np.float32) for i in range(len(lens))]
            if self.spec.feature == "mfcc_cmvn":
                out = [(f - f.mean(0)) / (f.std(0) + 1e-5) for f in out]
            return out
        out = []
        for i in range(len(lens)):  # one utterance per forward: see the class docstring
            x = audio[i: i + 1, : int(lens[i])].to(self.device)
            res = self.model(x, lens[i: i + 1].to(self.device))
            h = res.hidden_states[self.layer][0, : int(res.lengths[0])]
            out.append(h.float().cpu().numpy())
        return out

    def batches(self, cuts) -> Iterator[tuple[list, list[np.ndarray]]]:
        """Yield (cuts, features) in groups of ``batch_size`` (MFCC) or one cut (models)."""
        size = self.batch_size if self.model is None else 1
        group = []
        for c in cuts:
            group.append(c)
            if len(group) == size:
                yield group, self(group)
                group = []
        if group:
            yield group, self(group)


class _FrameStore:
    """Append-only frame matrix in RAM, or in a float32 file on disk read back as a memmap."""

    def __init__(self, dim: int, path: Path | None):
        self.dim, self.path, self.rows = dim, path, 0
        self._parts: list[np.ndarray] = []
        self._f = open(path, "wb") if path is not None else None

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"feature frames must be [T, {self.dim}], got {x.shape}")
        if self._f is not None:
            self._f.write(x.tobytes())
        else:
            self._parts.append(x)
        self.rows += x.shape[0]

    def array(self) -> np.ndarray:
        if self._f is None:
            return np.concatenate(self._parts) if self._parts else np.zeros((0, self.dim), np.float32)
        self._f.close()
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))


def _sample_cuts(cuts, fraction: float, seed: int) -> list:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"argument 'fraction' must be in (0, 1], got {fraction}")
    all_cuts = list(cuts)
    if not all_cuts:
        raise ValueError("argument 'cuts': the cut manifest is empty")
    n = max(1, int(round(fraction * len(all_cuts))))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(all_cuts), size=n, replace=False))
    return [all_cuts[i] for i in idx]


def fit_kmeans(cuts, out_dir, *, feature="mfcc", layer: int | None = None, n_clusters: int = 100,
               fraction: float = 0.1, seed: int = 0, batch_size: int = 10000, max_iter: int = 100,
               mode: Literal["lloyd", "minibatch"] = "lloyd", n_init: int = 1, device: str = "cpu",
               store: Literal["memory", "disk"] = "memory",
               max_frames: int | None = None, progress: bool = True) -> KMeans:
    """Fit k-means on features of a ``fraction`` of ``cuts`` and save it to ``out_dir``.

    ``store="disk"`` keeps the frames in ``out_dir/features.f32`` (deleted afterwards) instead of RAM;
    ``max_frames`` caps the frames used (a random subset). Returns the fitted KMeans.
    """
    if store not in ("memory", "disk"):
        raise ValueError(f"argument 'store' must be 'memory' or 'disk', got {store!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = FeatureReader(feature, layer, device=device)
    chosen = _sample_cuts(open_cuts(cuts, "cuts"), fraction, seed)
    fpath = out / "features.f32" if store == "disk" else None
    frames = _FrameStore(reader.spec.dim, fpath)
    try:
        what = reader.spec.feature if reader.model is None else f"layer {layer}"
        bar = progress_bar(total=len(chosen), desc=f"features ({what})", unit="cut", disable=not progress)
        for group, feats in reader.batches(chosen):
            for f in feats:
                frames.add(f)
            bar.update(len(group))
        bar.close()
        X = frames.array()
        if max_frames is not None and X.shape[0] > max_frames:
            keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], size=int(max_frames), replace=False))
            X = np.asarray(X[keep])
        if X.shape[0] < n_clusters:
            raise ValueError(f"only {X.shape[0]} feature frames from {len(chosen)} cuts for n_clusters="
                             f"{n_clusters}: raise argument 'fraction' or lower 'n_clusters'")
        log.info("k-means: K=%d on %d frames x %d dims from %d cuts", n_clusters, X.shape[0], X.shape[1], len(chosen))
        km = KMeans(n_clusters, mode=mode, max_iter=max_iter, batch_size=batch_size, n_init=n_init, seed=seed,
                    device=device).fit(X)
        log.info("k-means: inertia %.6g (%.4g per frame) after %d iterations", km.inertia_,
                 km.inertia_ / X.shape[0], km.n_iter_)
        usage = np.bincount(km.labels_, minlength=n_clusters)
        meta = {"features": asdict(reader.spec), "num_frames": int(X.shape[0]), "num_cuts": len(chosen),
                "fraction": fraction, "cuts": str(cuts) if isinstance(cuts, (str, os.PathLike)) else None,
                "used_clusters": int((usage > 0).sum()), "inertia_per_frame": km.inertia_ / X.shape[0]}
        if reader.model is not None and Path(reader.spec.feature).exists():
            # also relative to KM_DIR, so that `label` still finds the model after the experiment dir moves
            meta["feature_relative"] = os.path.relpath(reader.spec.feature, Path(out).resolve())
        km.save(out, meta=meta)
        del X
    finally:
        if fpath is not None and fpath.exists():
            fpath.unlink()
    return km


def label_cuts(cuts, km_dir, out_path, *, name: str = "kmeans", storage_dir=None, device: str = "cpu",
               progress: bool = True) -> int:
    """Label every cut with the units of the k-means in ``km_dir`` and write the manifest ``out_path``.

    Units are recomputed from the features recorded in ``kmeans.json`` and stored as lossless arrays under
    ``storage_dir`` (default: ``<out_path stem>_<name>/`` next to it) at the features' frame shift.
    Returns the number of cuts labelled. The manifest is written to a temporary file and renamed at the end.
    """
    from lhotse import CutSet, NumpyFilesWriter

    from speechssl.data.labels import store_units

    km = KMeans.load(km_dir, device=device)
    spec = (getattr(km, "meta", {}) or {}).get("features")
    if not spec:
        raise ValueError(f"{km_dir}/kmeans.json has no meta.features: was it written by `speechssl kmeans`?")
    rel = (getattr(km, "meta", {}) or {}).get("feature_relative")
    if spec["feature"] not in HANDCRAFTED and not Path(spec["feature"]).exists() and rel:
        moved = Path(km_dir) / rel
        if not moved.exists():
            raise FileNotFoundError(f"{km_dir}/kmeans.json: its feature model is neither at {spec['feature']} "
                                    f"nor at {moved} (relative to {km_dir})")
        spec = {**spec, "feature": str(moved)}
    reader = FeatureReader.from_spec(spec, device=device)
    if reader.spec.dim != km.cluster_centers_.shape[1]:
        raise ValueError(f"{km_dir}: centres have {km.cluster_centers_.shape[1]} dims, features {reader.spec.dim}")
    out_path = Path(out_path)
    if not str(out_path).endswith((".jsonl.gz", ".jsonl")):
        raise ValueError(f"argument 'out_path' must be a .jsonl.gz (or .jsonl) cut manifest, got {out_path}")
    stem = out_path.name.split(".jsonl")[0]
    storage = Path(storage_dir) if storage_dir is not None else out_path.parent / f"{stem}_{name}"
    storage.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl.gz" if str(out_path).endswith(".gz") else ".jsonl"
    tmp = out_path.parent / f".{stem}.tmp{os.getpid()}{suffix}"
    src = open_cuts(cuts, "cuts")
    n = 0
    try:
        with NumpyFilesWriter(str(storage)) as writer, CutSet.open_writer(tmp) as cw:
            bar = progress_bar(desc=f"label {name}", unit="cut", disable=not progress)
            for group, feats in reader.batches(src):
                lens = [f.shape[0] for f in feats]
                units = km.predict(np.concatenate(feats)) if sum(lens) else np.zeros(0, np.int64)
                offs = np.cumsum([0] + lens)
                for i, cut in enumerate(group):
                    if lens[i] == 0:
                        raise ValueError(f"cut '{cut.id}' gives no feature frames (too short for the features)")
                    cw.write(store_units(cut, units[offs[i] : offs[i + 1]], writer, name=name,
                                         frame_shift=reader.spec.frame_shift))
                n += len(group)
                bar.update(len(group))
            bar.close()
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("labelled %d cuts with '%s' (K=%d, %.0f Hz) -> %s", n, name, km.n_clusters,
             1.0 / reader.spec.frame_shift, out_path)
    return n
