"""K-means for speech units, in torch: k-means++ init, full-batch Lloyd or mini-batch updates, chunked distances.

Why not scikit-learn's MiniBatchKMeans (the HuBERT references' choice)? It wants every feature in RAM as float64/32
numpy, runs 20 k-means++ inits and thousands of small steps. Here:

- distances are computed chunk by chunk as ``|x|^2 - 2 x.c + |c|^2`` with one GEMM per chunk, so the [N, K]
  matrix never exists and X may be a numpy memmap on disk, a CPU tensor or a GPU tensor;
- k-means++ (greedy, ``2 + log K`` local trials as scikit-learn) runs on a sample of ``init_size`` points;
- ``mode="lloyd"`` then runs exact Lloyd passes over all of X (each pass streams the chunks once);
  ``mode="minibatch"`` and :meth:`KMeans.partial_fit` do count-weighted mini-batch updates for streams.

Conventions follow scikit-learn: ``fit``, ``predict``, ``fit_predict``, ``transform``, ``score``,
``cluster_centers_`` (numpy [K, D]), ``inertia_`` (sum of squared distances on the data given to ``fit``),
``n_iter_``, ``labels_`` (from ``fit``).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from speechssl.utils.io import atomic_write, atomic_write_json

from .lloyd import BoundedLloyd
from .rows import check_rows, iter_chunks, num_rows, read_rows, take_rows

__all__ = ["KMeans"]

log = logging.getLogger(__name__)

_STATE_FILE = "kmeans.safetensors"
_META_FILE = "kmeans.json"


class KMeans:
    """K-means clustering of rows of X [N, D].

    Args:
        n_clusters: K.
        mode: "lloyd" (exact passes over all data, default) or "minibatch" (random batches of ``batch_size``).
        max_iter: Lloyd passes, or mini-batch epochs over the data.
        tol: Lloyd stops when a pass lowers the inertia by less than ``tol`` (relative) or no row changes
            cluster; mini-batch stops when the smoothed
            mini-batch inertia stops improving for ``max_no_improvement`` batches (mini-batch).
        n_init: candidate k-means++ inits (1, as scikit-learn's KMeans for k-means++), each refined on the init
            sample by up to ``init_iter`` Lloyd passes; the one with the lowest sample inertia seeds the full fit.
        init_iter: Lloyd passes on the init sample per candidate (0 = compare raw inits, as MiniBatchKMeans).
        init: "k-means++" or "random" (K distinct random rows), or an array [K, D] of initial centres.
        init_size: rows sampled for the k-means++ init and its refinement (default ``max(3 * batch_size, 20 * K)``,
            i.e. 30000 as MiniBatchKMeans; at most N).
        batch_size: mini-batch size (mini-batch mode and the default init sample).
        chunk_size: rows per distance chunk (bounds memory at ``chunk_size * K`` floats).
        neighbours: re-assigned rows are first compared with this many centres nearest their own (exactness is
            checked with the triangle inequality; rows that fail it are compared with all K).
        device: where to compute ("cpu", "cuda"); default: X's device for tensors, else CPU.
        seed: seeds the init, sampling and batch order.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        mode: str = "lloyd",
        max_iter: int = 100,
        tol: float = 1e-3,
        n_init: int = 1,
        init_iter: int = 20,
        init="k-means++",
        init_size: int | None = None,
        batch_size: int = 10000,
        max_no_improvement: int = 10,
        chunk_size: int = 65536,
        neighbours: int = 32,
        device: str | torch.device | None = None,
        seed: int = 0,
        verbose: bool = False,
    ):
        if int(n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if mode not in ("lloyd", "minibatch"):
            raise ValueError(f"mode must be 'lloyd' or 'minibatch', got {mode!r}")
        if isinstance(init, str) and init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or an array, got {init!r}")
        if n_init < 1 or max_iter < 1 or batch_size < 1 or chunk_size < 1:
            raise ValueError("n_init, max_iter, batch_size and chunk_size must be >= 1")
        self.n_clusters = int(n_clusters)
        self.mode, self.max_iter, self.tol, self.n_init = mode, int(max_iter), float(tol), int(n_init)
        self.init_iter = int(init_iter)
        self.init, self.init_size, self.batch_size = init, init_size, int(batch_size)
        self.max_no_improvement, self.chunk_size = int(max_no_improvement), int(chunk_size)
        self.neighbours = max(1, int(neighbours))
        self.device = torch.device(device) if device is not None else None
        self.seed, self.verbose = int(seed), verbose
        self._centers: Tensor | None = None  # [K, D] float32 on the compute device
        self._counts: Tensor | None = None   # [K] float64, mini-batch / partial_fit state
        self.inertia_: float | None = None
        self.n_iter_: int = 0
        self.n_steps_: int = 0
        self.labels_ = None
        self._rng = np.random.default_rng(self.seed)

    # ------------------------------------------------------------------ helpers
    def _device_for(self, X) -> torch.device:
        if self.device is not None:
            return self.device
        if isinstance(X, Tensor):
            return X.device
        return torch.device("cpu")

    @staticmethod
    def _assign(x: Tensor, centers: Tensor, c2: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest centre for each row: x [n, D], centers [K, D], c2 [K] -> (labels [n] long, sq. dist [n])."""
        d = torch.addmm(c2.unsqueeze(0), x, centers.t(), beta=1.0, alpha=-2.0)  # |c|^2 - 2 x.c  [n, K]
        lab = d.argmin(dim=1)
        mind = (d.gather(1, lab.unsqueeze(1)).squeeze(1) + (x * x).sum(1)).clamp_min_(0.0)
        return lab, mind

    # ------------------------------------------------------------------ init
    def _kmeanspp(self, x: Tensor, k: int, gen: torch.Generator) -> Tensor:
        """Greedy k-means++ on x [n, D]: each new centre is the best of ``2 + log k`` D^2-weighted candidates."""
        n = x.shape[0]
        trials = 2 + int(math.log(k))
        x2 = (x * x).sum(1)
        first = int(torch.randint(n, (1,), generator=gen, device=x.device).item())
        centers = [x[first]]
        closest = (x2 - 2 * x @ x[first] + x2[first]).clamp_min_(0.0)  # [n]
        pot = closest.sum()
        for _ in range(1, k):
            if pot <= 0:  # fewer distinct points than clusters: fill with random rows
                idx = torch.randint(n, (trials,), generator=gen, device=x.device)
            else:
                r = torch.rand(trials, generator=gen, device=x.device, dtype=torch.float64) * pot.double()
                cum = torch.cumsum(closest.double(), 0)
                idx = torch.searchsorted(cum, r).clamp_max_(n - 1)
            cand = x[idx]  # [t, D]
            d = (x2.unsqueeze(0) - 2 * cand @ x.t() + x2[idx].unsqueeze(1)).clamp_min_(0.0)  # [t, n]
            new_closest = torch.minimum(closest.unsqueeze(0), d)
            pots = new_closest.sum(1)
            best = int(pots.argmin().item())
            closest, pot = new_closest[best], pots[best]
            centers.append(cand[best])
        return torch.stack(centers)

    def _init_centers(self, x, device, gen: torch.Generator) -> Tensor:
        """Initial centres from rows of ``x`` (already a sample): k-means++, random rows or the given array."""
        K = self.n_clusters
        if not isinstance(self.init, str):
            c = self.init if isinstance(self.init, Tensor) else torch.as_tensor(np.asarray(self.init))
            if tuple(c.shape) != (K, x.shape[1]):
                raise ValueError(f"init array must have shape [{K}, {x.shape[1]}], got {tuple(c.shape)}")
            return c.to(device=device, dtype=torch.float32).clone()
        x = read_rows(x, 0, num_rows(x), device)
        if self.init == "random":
            return x[torch.randperm(x.shape[0], generator=gen, device=device)[:K]].clone()
        return self._kmeanspp(x, K, gen)

    # ------------------------------------------------------------------ fitting
    def _fit_lloyd(self, X, centers: Tensor, device, max_iter: int | None = None):
        """Exact Lloyd passes with bounds (:class:`~speechssl.cluster.lloyd.BoundedLloyd`) until no row moves, a
        pass lowers the inertia by less than ``tol`` (relative), or ``max_iter`` passes. Returns (centres, passes,
        labels [N], inertia), the labels optimal for the returned centres."""
        lloyd = BoundedLloyd(X, centers, device, self.chunk_size, self.neighbours, self.verbose)
        return lloyd.run(centers, self.max_iter if max_iter is None else max_iter, self.tol)

    def _minibatch_step(self, x: Tensor, centers: Tensor, counts: Tensor) -> float:
        """Count-weighted update (centre = running mean of the points ever assigned to it), in place."""
        K = centers.shape[0]
        lab, mind = self._assign(x, centers, (centers * centers).sum(1))
        bc = torch.bincount(lab, minlength=K).to(counts.dtype)
        bs = torch.zeros_like(centers, dtype=torch.float64).index_add_(0, lab, x.double())
        new_counts = counts + bc
        upd = bc > 0
        merged = (centers.double() * counts.unsqueeze(1) + bs) / new_counts.clamp_min(1).unsqueeze(1)
        centers[upd] = merged[upd].float()
        counts.copy_(new_counts)
        return float(mind.mean().item())

    def _fit_minibatch(self, X, centers: Tensor, device) -> tuple[Tensor, int]:
        """Count-weighted updates on random batches of ``batch_size`` rows, ``max_iter`` epochs at most, stopping
        when the smoothed batch inertia stalls for ``max_no_improvement`` batches -> (centres, epochs run)."""
        n = num_rows(X)
        counts = torch.zeros(self.n_clusters, dtype=torch.float64, device=device)
        steps_per_epoch = max(1, math.ceil(n / self.batch_size))
        ewa, best, stall, step = None, math.inf, 0, 0
        alpha = min(1.0, 2.0 * self.batch_size / max(n, 1))
        for epoch in range(self.max_iter):
            for _ in range(steps_per_epoch):
                idx = self._rng.choice(n, size=min(self.batch_size, n), replace=False)
                cost = self._minibatch_step(take_rows(X, idx, device), centers, counts)
                step += 1
                ewa = cost if ewa is None else ewa * (1 - alpha) + cost * alpha
                if ewa < best * (1 - self.tol):
                    best, stall = ewa, 0
                else:
                    stall += 1
                if stall >= self.max_no_improvement:
                    self._counts, self.n_steps_ = counts, step
                    return centers, epoch + 1
        self._counts, self.n_steps_ = counts, step
        return centers, self.max_iter

    def _best_init(self, X, device, gen: torch.Generator) -> Tensor:
        """``n_init`` candidate inits, each k-means++ on the same sample of ``init_size`` rows and refined there by
        up to ``init_iter`` Lloyd passes; the one with the lowest sample inertia seeds the fit on all of X.
        (MiniBatchKMeans compares its ``n_init`` inits on a sample in the same spirit, without the refinement.)"""
        n, K = num_rows(X), self.n_clusters
        if not isinstance(self.init, str):
            return self._init_centers(X, device, gen)
        size = min(n, max(self.init_size or max(3 * self.batch_size, 20 * K), K))
        idx = self._rng.choice(n, size=size, replace=False) if size < n else np.arange(n)
        sample = take_rows(X, idx, device)
        best, best_inertia = None, math.inf
        for run in range(self.n_init):
            centers = self._init_centers(sample, device, gen)
            if self.init_iter > 0:
                centers, _, _, inertia = self._fit_lloyd(sample, centers, device, max_iter=self.init_iter)
            else:
                _, inertia = self._predict_with_inertia(sample, device, centers)
            if self.verbose:
                log.info("k-means init %d/%d: sample inertia %.6g", run + 1, self.n_init, inertia)
            # a clear improvement only: candidates that reach the same optimum (permuted) differ by float noise
            if best is None or inertia < best_inertia * (1 - 1e-4):
                best, best_inertia = centers, inertia
        return best

    def fit(self, X, y=None) -> "KMeans":
        """Fit on X [N, D] (numpy array or memmap, or torch tensor on any device). Sets ``cluster_centers_``,
        ``inertia_`` (on all of X), ``n_iter_`` and ``labels_`` (numpy for numpy input, else a tensor)."""
        X = check_rows(X)
        n = num_rows(X)
        if n < self.n_clusters:
            raise ValueError(f"n_samples={n} must be >= n_clusters={self.n_clusters}")
        device = self._device_for(X)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        self._rng = np.random.default_rng(self.seed)
        centers = self._best_init(X, device, gen)
        if self.mode == "lloyd":
            # the last bounded pass leaves labels optimal for the returned centres and their exact inertia
            centers, n_iter, labels, self.inertia_ = self._fit_lloyd(X, centers, device)
            self._centers = centers
        else:
            centers, n_iter = self._fit_minibatch(X, centers, device)
            self._centers = centers
            labels, self.inertia_ = self._predict_with_inertia(X, device)
        self.n_iter_ = n_iter
        if self.verbose:
            log.info("k-means: inertia %.6g after %d iterations", self.inertia_, n_iter)
        self.labels_ = labels.cpu().numpy() if not isinstance(X, Tensor) else labels
        return self

    def partial_fit(self, X, y=None) -> "KMeans":
        """One mini-batch update from X [n, D] (streaming). The first call initialises the centres from X
        with k-means++ (so it needs at least K rows). ``inertia_`` is the last batch's sum of squared distances."""
        X = check_rows(X, None if self._centers is None else self._centers.shape[1])
        device = self._device_for(X) if self._centers is None else self._centers.device
        x = read_rows(X, 0, num_rows(X), device)
        if self._centers is None:
            if x.shape[0] < self.n_clusters:
                raise ValueError(
                    f"the first partial_fit batch has {x.shape[0]} rows; it needs at least n_clusters="
                    f"{self.n_clusters} to initialise the centres")
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._centers = self._init_centers(x, device, gen)
            self._counts = torch.zeros(self.n_clusters, dtype=torch.float64, device=device)
        if self._counts is None:
            self._counts = torch.zeros(self.n_clusters, dtype=torch.float64, device=device)
        cost = self._minibatch_step(x, self._centers, self._counts)
        self.inertia_ = cost * x.shape[0]
        self.n_steps_ += 1
        return self

    # ------------------------------------------------------------------ inference
    @property
    def cluster_centers_(self) -> np.ndarray:
        self._require_fit()
        return self._centers.detach().cpu().numpy()

    @property
    def centers(self) -> Tensor:
        """The centres as a float32 tensor [K, D] on the compute device."""
        self._require_fit()
        return self._centers

    def _fitted_input(self, X):
        """(X checked against the fitted centres, where to compute: X's device for tensors, else the centres')."""
        self._require_fit()
        X = check_rows(X, self._centers.shape[1])
        return X, (self._device_for(X) if isinstance(X, Tensor) else self._centers.device)

    def _require_fit(self):
        if self._centers is None:
            raise RuntimeError("this KMeans is not fitted yet: call fit(), partial_fit() or KMeans.load()")

    def _predict_with_inertia(self, X, device, centers: Tensor | None = None) -> tuple[Tensor, float]:
        centers = (self._centers if centers is None else centers).to(device)
        c2 = (centers * centers).sum(1)
        labs, inertia = [], 0.0
        for _, x in iter_chunks(X, self.chunk_size, device):
            lab, mind = self._assign(x, centers, c2)
            labs.append(lab)
            inertia += float(mind.sum(dtype=torch.float64).item())
        return torch.cat(labs) if labs else torch.zeros(0, dtype=torch.long, device=device), inertia

    def predict(self, X):
        """Nearest-centre labels for X [N, D]: numpy int64 [N] for numpy input, a long tensor on X's device for
        tensor input."""
        X, device = self._fitted_input(X)
        labels, _ = self._predict_with_inertia(X, device)
        return labels if isinstance(X, Tensor) else labels.cpu().numpy()

    def fit_predict(self, X, y=None):
        return self.fit(X).labels_

    def transform(self, X):
        """Euclidean distances to every centre: [N, K] (numpy for numpy input, tensor for tensor input)."""
        X, device = self._fitted_input(X)
        centers = self._centers.to(device)
        c2 = (centers * centers).sum(1)
        outs = []
        for _, x in iter_chunks(X, self.chunk_size, device):
            d = torch.addmm(c2.unsqueeze(0), x, centers.t(), alpha=-2.0) + (x * x).sum(1, keepdim=True)
            outs.append(d.clamp_min_(0.0).sqrt_())
        out = torch.cat(outs)
        return out if isinstance(X, Tensor) else out.cpu().numpy()

    def score(self, X, y=None) -> float:
        """Negative inertia of X under the fitted centres (scikit-learn convention)."""
        X, device = self._fitted_input(X)
        return -self._predict_with_inertia(X, device)[1]

    # ------------------------------------------------------------------ persistence
    def save(self, out_dir: str | os.PathLike, meta: dict | None = None) -> None:
        """Write ``kmeans.safetensors`` (centres [K, D]) and ``kmeans.json`` (settings, inertia, ``meta``)
        atomically into ``out_dir``."""
        self._require_fit()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"cluster_centers": self._centers.detach().float().cpu().contiguous()}
        if self._counts is not None:
            tensors["counts"] = self._counts.detach().double().cpu().contiguous()
        atomic_write(out / _STATE_FILE, lambda tmp: save_file(tensors, tmp))
        atomic_write_json(out / _META_FILE, {
            "n_clusters": self.n_clusters, "dim": int(self._centers.shape[1]), "mode": self.mode,
            "max_iter": self.max_iter, "tol": self.tol, "n_init": self.n_init,
            "batch_size": self.batch_size, "seed": self.seed, "inertia": self.inertia_, "n_iter": self.n_iter_,
            "meta": meta or {},
        })

    @classmethod
    def load(cls, km_dir: str | os.PathLike, device: str | torch.device | None = None) -> "KMeans":
        """Load a model written by :meth:`save`; ``.meta`` holds the saved ``meta`` dict."""
        km_dir = Path(km_dir)
        if not (km_dir / _STATE_FILE).is_file() or not (km_dir / _META_FILE).is_file():
            raise FileNotFoundError(f"{km_dir} is not a k-means directory: expected {_STATE_FILE} and {_META_FILE}")
        info = json.loads((km_dir / _META_FILE).read_text())
        tensors = load_file(str(km_dir / _STATE_FILE))
        km = cls(info["n_clusters"], mode=info.get("mode", "lloyd"), max_iter=info.get("max_iter", 100),
                 tol=info.get("tol", 1e-3), n_init=info.get("n_init", 1), batch_size=info.get("batch_size", 10000),
                 seed=info.get("seed", 0), device=device)
        centers = tensors["cluster_centers"]
        if tuple(centers.shape) != (info["n_clusters"], info["dim"]):
            raise ValueError(f"{km_dir}: centres have shape {tuple(centers.shape)}, json says "
                             f"[{info['n_clusters']}, {info['dim']}]")
        km._centers = centers.to(device or "cpu")
        km._counts = tensors.get("counts")
        km.inertia_, km.n_iter_ = info.get("inertia"), info.get("n_iter", 0)
        km.meta = info.get("meta", {})
        return km

    def __repr__(self) -> str:
        return f"KMeans(n_clusters={self.n_clusters}, mode={self.mode!r}, max_iter={self.max_iter})"
