"""How well k-means units of a layer match phones: cluster purity, phone purity and PNMI (HuBERT paper, IV-C).

With y a frame's phone, z its unit and P(y, z) their joint frequency over aligned frames:

- phone purity ``E_z[max_y P(y|z)] = sum_z max_y P(y, z)``: how pure in phones a unit is on average (grows
  with K);
- cluster purity ``E_y[max_z P(z|y)] = sum_y max_z P(y, z)``: how much of a phone its most frequent unit
  covers (shrinks with K);
- PNMI ``I(y; z) / H(y)``: the share of the phone's uncertainty a unit removes, 0 to 1.

PNMI and the joint counts are those of :mod:`speechssl.train.diagnostics` (one implementation); ``unit_quality``
gives them the paper's names. ``layer_units`` fits :class:`speechssl.cluster.KMeans` on one set of frames and
labels another with it.
"""
from __future__ import annotations

import numpy as np

from speechssl.cluster import KMeans
from speechssl.train.diagnostics import pnmi, purity

__all__ = ["unit_quality", "layer_units"]


def unit_quality(units, phones) -> dict[str, float]:
    """``{"pnmi", "phone_purity", "cluster_purity"}`` of aligned frame labels: ``units`` and ``phones`` are 1-D
    integer arrays of the same length (pairs with a negative id on either side are left out); NaN without
    frames (PNMI also with a single phone)."""
    phone_purity, cluster_purity = purity(units, phones)
    return {"pnmi": pnmi(units, phones), "phone_purity": phone_purity, "cluster_purity": cluster_purity}


def layer_units(fit_frames, frames, n_clusters: int, *, seed: int = 0, max_iter: int = 50,
                device: str | None = None) -> np.ndarray:
    """Units [M] of ``frames`` [M, D] from a k-means with ``n_clusters`` centres fitted on ``fit_frames`` [N, D]
    (k-means++ init, Lloyd passes; ``seed`` fixes the init). Fewer fitting frames than clusters is an error."""
    n = int(fit_frames.shape[0])
    if n < n_clusters:
        raise ValueError(f"k-means: {n} training frames for {n_clusters} clusters; analyse more cuts or lower "
                         "the number of clusters")
    km = KMeans(n_clusters, max_iter=max_iter, seed=seed, device=device).fit(fit_frames)
    return np.asarray(km.predict(frames)).astype(np.int64)
