"""Discrete units for HuBERT-style pretraining: features from cuts -> k-means -> frame labels on cuts.

- :class:`FeatureReader` turns cuts into frame features: 39-dim MFCC (13 + deltas + delta-deltas, 100 Hz, HuBERT
  iteration 1) or the hidden states of layer N of any model ``speechssl.load_pretrained`` reads (50 Hz for
  a CNN front end, 25 Hz for a 40 ms fbank front end).
- :func:`fit_kmeans` streams features of a sampled fraction of the cuts (as the references do: ~10%), fits
  :class:`speechssl.cluster.KMeans` and saves it (``kmeans.safetensors`` + ``kmeans.json``, whose ``meta``
  records how to recompute the features).
- :func:`label_cuts` recomputes the same features for every cut, predicts units (:class:`KMeansUnits`) and
  stores them on the cut with ``speechssl.data.labels.store_units`` (lossless ``NumpyFilesWriter`` arrays),
  writing a new manifest: it is ``speechssl.extract.extract_corpus`` with that source.

Features come from the path of ``speechssl extract``: cuts read lazily through ``speechssl.data.loader``, whole
utterances batched by duration (``speechssl.extract.extraction_loader``; bad audio raises
:class:`~speechssl.data.audio.BadCutError`) and model layers through ``speechssl.extract.LayerEncoder``, which
gives each utterance of a padded batch the states it gets on its own. Features are held in RAM for the fit, or
in a float32 file on disk (``store="disk"``) when they would not fit.
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from speechssl.cluster import KMeans
from speechssl.constants import SAMPLE_RATE
from speechssl.data.dataset import SpeechDataset
from speechssl.data.loader import open_cuts
from speechssl.extract.hidden import LayerEncoder, layer_field
from speechssl.extract.run import ExtractOptions, extract_corpus, extraction_loader
from speechssl.extract.units import UnitSource
from speechssl.utils.progress import progress_bar

log = logging.getLogger(__name__)

MFCC_FRAME_SHIFT = 0.01
# hand-crafted unit features: 39-dim MFCC (+ deltas), raw or normalised per utterance (mean and variance per
# coefficient over the utterance: targets about what is said rather than about the speaker or the channel)
HANDCRAFTED = ("mfcc", "mfcc_cmvn")

__all__ = ["FeatureSpec", "FeatureReader", "KMeansUnits", "fit_kmeans", "label_cuts"]


@dataclass
class FeatureSpec:
    """How units' features are computed; saved in ``kmeans.json`` so that ``label`` recomputes the same ones."""

    feature: str  # "mfcc", "mfcc_cmvn" or a model path
    layer: int | None = None
    frame_shift: float = MFCC_FRAME_SHIFT  # seconds per feature frame (= label period)
    dim: int = 39


class FeatureReader:
    """Frame features of batches or cuts: ``reader.features(batch)`` / ``reader(cuts)`` -> float32 arrays [T_i, D].

    Args:
        feature: "mfcc", "mfcc_cmvn" (normalised per utterance), or a model (directory / checkpoint path, or an
            Encoder) whose ``hidden_states[layer]`` are the features (index 0 = transformer input, i = output of
            layer i, as transformers defines them).
        layer: required for a model.
        device: where the model runs.
        batch_size: cuts per forward for ``batches``.

    Models run on padded batches through :class:`speechssl.extract.hidden.LayerEncoder`, the path of
    ``speechssl extract``, which gives each utterance the states it gets on its own (group-norm front ends
    included).
    """

    def __init__(self, feature, layer: int | None = None, device: str = "cpu", batch_size: int = 16):
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.audio = SpeechDataset()  # padded waveform batches, bad audio raises BadCutError
        if isinstance(feature, str) and feature in HANDCRAFTED:
            if layer is not None:
                raise ValueError(f"argument 'layer' applies to model features, not {feature!r}: leave it unset")
            self.encoder = None
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
        self.encoder = LayerEncoder(model, [layer], self.device, name=name, key="layer")
        self.layer = int(layer)
        self.spec = FeatureSpec(name, int(layer), model.downsample_rate / SAMPLE_RATE, int(model.hidden_size))

    @property
    def model(self):
        """The encoder (None for MFCC features)."""
        return self.encoder.model if self.encoder is not None else None

    @classmethod
    def from_spec(cls, spec: dict, device: str = "cpu") -> "FeatureReader":
        return cls(spec["feature"], spec.get("layer"), device=device)

    def features(self, batch: dict) -> list[np.ndarray]:
        """Features of a ``SpeechDataset`` batch (``audio`` [B, T], ``audio_lens`` [B]), one array per utterance."""
        audio, lens = batch["audio"], batch["audio_lens"]
        if self.encoder is not None:
            return self.encoder.per_utterance(audio, lens)[self.layer]
        from speechssl.data.features import compute_mfcc

        with torch.inference_mode():
            feats, n = compute_mfcc(audio, lens)
        out = [feats[i, : int(n[i])].numpy().astype(np.float32) for i in range(len(lens))]
        if self.spec.feature == "mfcc_cmvn":
            out = [(f - f.mean(0)) / (f.std(0) + 1e-5) for f in out]
        return out

    def __call__(self, cuts) -> list[np.ndarray]:
        return self.features(self.audio[list(cuts)])

    def batches(self, cuts) -> Iterator[tuple[list, list[np.ndarray]]]:
        """Yield (cuts, features) in groups of ``batch_size`` cuts."""
        group = []
        for c in cuts:
            group.append(c)
            if len(group) == self.batch_size:
                yield group, self(group)
                group = []
        if group:
            yield group, self(group)


class KMeansUnits(UnitSource):
    """Extraction source of k-means units: the features ``km_dir/kmeans.json`` records, nearest centre per frame.

    ``name`` is the output field (default ``units_layer_<L>`` for a model layer, ``units_<feature>`` for MFCC).
    """

    def __init__(self, km_dir, name: str | None = None, device: str = "cpu"):
        self.km, spec = _load_kmeans(km_dir, device)
        self.reader = FeatureReader.from_spec(spec, device=device)
        if self.reader.spec.dim != self.km.cluster_centers_.shape[1]:
            raise ValueError(f"{km_dir}: centres have {self.km.cluster_centers_.shape[1]} dims, features "
                             f"{self.reader.spec.dim}")
        layer = self.reader.spec.layer
        name = name or "units_" + (layer_field(layer) if layer is not None else self.reader.spec.feature)
        centres = np.ascontiguousarray(np.asarray(self.km.cluster_centers_, dtype=np.float32))
        info = {"kmeans": str(Path(km_dir).resolve()), "n_clusters": int(self.km.n_clusters),
                "centres_crc32": zlib.crc32(centres.tobytes()), "feature": self.reader.spec.feature}
        super().__init__(self._units, name, self.reader.spec.frame_shift, layer, info)

    def _units(self, batch: dict) -> list[np.ndarray]:
        feats = self.reader.features(batch)
        for cid, f in zip(batch["cut_ids"], feats):
            if f.shape[0] == 0:
                raise ValueError(f"cut '{cid}' gives no feature frames (too short for the features)")
        units = self.km.predict(np.concatenate(feats))
        return np.split(units.astype(np.int64), np.cumsum([f.shape[0] for f in feats])[:-1])


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
        what = reader.spec.feature if reader.encoder is None else f"layer {layer}"
        bar = progress_bar(total=len(chosen), desc=f"features ({what})", unit="cut", disable=not progress)
        # the batches of `speechssl extract`: whole utterances by duration
        for batch in extraction_loader(chosen, reader.spec.frame_shift, ExtractOptions(num_workers=0)):
            for f in reader.features(batch):
                frames.add(f)
            bar.update(len(batch["cut_ids"]))
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
        if reader.encoder is not None and Path(reader.spec.feature).exists():
            # also relative to KM_DIR, so that `label` still finds the model after the experiment dir moves
            meta["feature_relative"] = os.path.relpath(reader.spec.feature, Path(out).resolve())
        km.save(out, meta=meta)
        del X
    finally:
        if fpath is not None and fpath.exists():
            fpath.unlink()
    return km


def _load_kmeans(km_dir, device: str = "cpu") -> tuple[KMeans, dict]:
    """The k-means of ``km_dir`` and its feature spec; a feature model moved with the experiment directory is
    found through the path recorded relative to ``km_dir``."""
    km = KMeans.load(km_dir, device=device)
    meta = getattr(km, "meta", {}) or {}
    spec = meta.get("features")
    if not spec:
        raise ValueError(f"{km_dir}/kmeans.json has no meta.features: was it written by `speechssl kmeans`?")
    rel = meta.get("feature_relative")
    if spec["feature"] not in HANDCRAFTED and not Path(spec["feature"]).exists() and rel:
        moved = Path(km_dir) / rel
        if not moved.exists():
            raise FileNotFoundError(f"{km_dir}/kmeans.json: its feature model is neither at {spec['feature']} "
                                    f"nor at {moved} (relative to {km_dir})")
        spec = {**spec, "feature": str(moved)}
    return km, spec


def label_cuts(cuts, km_dir, out_path, *, name: str = "kmeans", storage_dir=None, device: str = "cpu",
               progress: bool = True, max_duration: float = 100.0) -> int:
    """Label every cut with the units of the k-means in ``km_dir`` and write the manifest ``out_path``.

    Units are recomputed from the features recorded in ``kmeans.json`` and stored as lossless arrays under
    ``storage_dir`` (default: ``<out_path stem>_<name>/`` next to it) at the features' frame shift. This is
    :func:`speechssl.extract.extract_corpus` with a :class:`KMeansUnits` source (batches of ``max_duration``
    seconds, resumable after a kill; a labelling with other settings in ``storage_dir`` is replaced). The
    manifest is renamed into place at the end. Returns the number of cuts labelled.
    """
    out_path = Path(out_path)
    if not str(out_path).endswith((".jsonl.gz", ".jsonl")):
        raise ValueError(f"argument 'out_path' must be a .jsonl.gz (or .jsonl) cut manifest, got {out_path}")
    source = KMeansUnits(km_dir, name=name, device=device)
    stem = out_path.name.split(".jsonl")[0]
    storage = Path(storage_dir) if storage_dir is not None else out_path.parent / f"{stem}_{name}"
    record = extract_corpus(cuts, storage, source, options=ExtractOptions(max_duration=max_duration),
                            manifest=out_path, progress=progress, restart_on_change=True)
    log.info("labelled %d cuts with '%s' (K=%d, %.0f Hz) -> %s", record["cuts"], name, source.km.n_clusters,
             1.0 / source.reader.spec.frame_shift, out_path)
    return int(record["cuts"])
