"""Exact Lloyd iterations with Hamerly's bounds and neighbour-restricted re-assignment (``KMeans(mode="lloyd")``).

Per row: an upper bound on the distance to its centre and a lower bound on the distance to any other. After each
centre update the bounds move by the centres' shifts and only rows whose bounds overlap are re-assigned. Those
rows are first compared with the ``M`` centres nearest to their own (one small GEMM per centre); the triangle
inequality proves the result exact when the nearest found is closer than ``r_k - d(x, c_k)`` (``r_k`` = distance
from c_k to its first non-neighbour), otherwise the row falls back to all K centres. Sums are updated
incrementally for the rows that move, and the inertia of every pass is exact at O(K D):
``sum |x|^2 - 2 sum_k c_k.S_k + sum_k n_k |c_k|^2``.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .rows import iter_chunks, num_rows, read_rows, rows_at

__all__ = ["BoundedLloyd", "assign2"]

log = logging.getLogger(__name__)

# neighbour search is abandoned when more than this share of re-assigned rows needs all K centres
_FALLBACK_LIMIT = 0.3


def assign2(x: Tensor, centers: Tensor, c2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest and second-nearest centre distances: x [n, D] -> (labels [n], d1 [n], d2 [n]) (Euclidean)."""
    d = torch.addmm(c2.unsqueeze(0), x, centers.t(), alpha=-2.0)
    if centers.shape[0] == 1:
        v, a = d.min(1)
        d1 = (v + (x * x).sum(1)).clamp_min_(0).sqrt_()
        return a, d1, torch.full_like(d1, float("inf"))
    # argmin + gather + amin: several times faster on CPU than topk(2) or min(dim) with indices
    a = d.argmin(1)
    v1 = d.gather(1, a.unsqueeze(1)).squeeze(1)
    v2 = d.scatter_(1, a.unsqueeze(1), float("inf")).amin(1)
    x2 = (x * x).sum(1)
    return a, (v1 + x2).clamp_min_(0).sqrt_(), (v2 + x2).clamp_min_(0).sqrt_()


@dataclass
class _Neighbourhood:
    """Per centre k: ``half`` [K] half the distance to its nearest other centre; for the neighbour search (None
    when it is off) ``cand`` [K, M+1] k and its M nearest centres, ``radius`` [K] the distance to the next one."""

    half: Tensor
    cand: Optional[Tensor] = None
    radius: Optional[Tensor] = None


def _assign_nb(x: Tensor, own: Tensor, d_own: Tensor, centers: Tensor, c2: Tensor, nb: _Neighbourhood):
    """Nearest / second-nearest among each row's own centre and its M neighbours, one GEMM per own centre.

    Returns (labels, d1, d2 lower bound, ok) where ok marks rows whose result is provably exact: the nearest
    candidate is within ``radius[own] - d_own``, a lower bound on the distance to any non-candidate centre.
    """
    n = x.shape[0]
    a = torch.empty(n, dtype=torch.long, device=x.device)
    d1 = torch.empty(n, dtype=torch.float32, device=x.device)
    d2 = torch.empty(n, dtype=torch.float32, device=x.device)
    order = own.argsort()
    ks, cnt = torch.unique_consecutive(own[order], return_counts=True)
    x2 = (x * x).sum(1)
    start = 0
    for k, c in zip(ks.tolist(), cnt.tolist()):
        rows = order[start : start + c]
        start += c
        ci = nb.cand[k]
        d = torch.addmm(c2[ci].unsqueeze(0), x[rows], centers[ci].t(), alpha=-2.0)
        j = d.argmin(1)
        v1 = d.gather(1, j.unsqueeze(1)).squeeze(1)
        v2 = d.scatter_(1, j.unsqueeze(1), float("inf")).amin(1)
        a[rows] = ci[j]
        d1[rows] = (v1 + x2[rows]).clamp_min_(0).sqrt_()
        d2[rows] = (v2 + x2[rows]).clamp_min_(0).sqrt_()
    outside = nb.radius[own] - d_own  # no centre outside the neighbourhood is closer than this
    ok = d1 <= outside
    return a, d1, torch.minimum(d2, outside), ok


class BoundedLloyd:
    """Lloyd's algorithm over rows of X [N, D] from ``centers`` [K, D], with per-row bounds (see the module).

    ``run(max_iter, tol)`` -> (centres, passes, labels [N], inertia); the labels are optimal for the returned
    centres and the inertia is theirs.
    """

    def __init__(self, X, centers: Tensor, device: torch.device, chunk_size: int, neighbours: int,
                 verbose: bool = False):
        self.X, self.device, self.chunk_size, self.verbose = X, device, chunk_size, verbose
        self.n, self.K = num_rows(X), centers.shape[0]
        self.M = min(self.K - 1, neighbours)
        self.use_nb_ok = True  # cleared for good when the neighbourhood rarely proves exactness
        self.acc = torch.float64 if device.type == "cpu" else torch.float32
        self._first_pass(centers)

    def _first_pass(self, centers: Tensor) -> None:
        """Full assignment with the two nearest centres: labels, bounds, per-cluster sums and counts."""
        n, K, D, device, acc = self.n, self.K, centers.shape[1], self.device, self.acc
        self.lab = torch.empty(n, dtype=torch.long, device=device)
        self.upper = torch.empty(n, dtype=torch.float32, device=device)
        self.lower = torch.empty(n, dtype=torch.float32, device=device)
        self.sums = torch.zeros(K, D, dtype=acc, device=device)
        self.counts = torch.zeros(K, dtype=acc, device=device)
        self.sq_total = torch.zeros((), dtype=torch.float64, device=device)
        c2 = (centers * centers).sum(1)
        for s0, x in iter_chunks(self.X, self.chunk_size, device):
            a, d1, d2 = assign2(x, centers, c2)
            e = s0 + x.shape[0]
            self.lab[s0:e], self.upper[s0:e], self.lower[s0:e] = a, d1, d2
            self.sums += torch.zeros(K, D, dtype=x.dtype, device=device).index_add_(0, a, x).to(acc)
            self.counts += torch.bincount(a, minlength=K).to(acc)
            self.sq_total += (x.double() ** 2).sum()

    def inertia(self, centers: Tensor) -> float:
        """sum_i |x_i - c_lab(i)|^2 from the per-cluster sums (float64)."""
        c = centers.double()
        return float(self.sq_total - 2 * (c * self.sums.double()).sum()
                     + (self.counts.double() * (c * c).sum(1)).sum())

    def _reseed_empty(self, new: Tensor) -> Tensor:
        """Move empty clusters onto the rows farthest from their centre (scikit-learn's rule); the bounds of all
        rows are then reset so that the next pass re-assigns everything against the moved centres."""
        empty = (self.counts <= 0).nonzero().flatten()
        if empty.numel() == 0:
            return new
        far = self.upper.topk(min(empty.numel(), self.upper.numel())).indices
        for k, r in zip(empty.tolist(), far.tolist()):
            new[k] = read_rows(self.X, r, r + 1, self.device)[0]
        self.upper.fill_(float("inf"))  # force a full re-assignment; sums/counts are rebuilt from the moved rows
        return new

    def _update_centers(self, centers: Tensor) -> Tensor:
        """New centres from the sums; the bounds move by the shifts (own centre: its shift; any other: at most
        the largest shift of another centre)."""
        new = self._reseed_empty((self.sums / self.counts.clamp_min(1).unsqueeze(1)).float())
        shift = (new - centers).norm(dim=1)  # [K]
        top2 = shift.topk(min(2, self.K)).values
        m1 = top2[0]
        m2 = top2[1] if self.K > 1 else top2[0]
        self.upper += shift[self.lab]
        self.lower -= torch.where(shift[self.lab] == m1, m2, m1)
        return new

    def _neighbourhood(self, centers: Tensor) -> _Neighbourhood:
        K, M = self.K, self.M
        cc = torch.cdist(centers, centers)
        cc.fill_diagonal_(float("inf"))
        near = cc.topk(min(K - 1, M + 1), dim=1, largest=False) if K > 1 else None
        if near is None:
            return _Neighbourhood(0.5 * torch.full((K,), float("inf"), device=self.device))
        nb = _Neighbourhood(0.5 * near.values[:, 0])
        if self.use_nb_ok and M >= 1 and K > 2 * (M + 1):
            nb.cand = torch.cat([torch.arange(K, device=self.device)[:, None], near.indices[:, :M]], 1)
            nb.radius = near.values[:, M]  # first centre outside the neighbourhood
        return nb

    def _reassign_chunk(self, s0: int, centers: Tensor, c2: Tensor, nb: _Neighbourhood, stats: Counter) -> None:
        """Re-assign the rows of chunk ``s0`` whose bounds overlap; update bounds, labels, sums and counts."""
        e = min(self.n, s0 + self.chunk_size)
        z = torch.maximum(self.lower[s0:e], nb.half[self.lab[s0:e]])
        idx = (self.upper[s0:e] > z).nonzero().flatten()
        if idx.numel() == 0:
            return
        x = rows_at(self.X, s0, idx, self.device)
        own = self.lab[s0 + idx]
        d_own = (x - centers[own]).norm(dim=1)  # tighten the upper bound first
        self.upper[s0 + idx] = d_own
        still = d_own > z[idx]
        if not bool(still.any()):
            return
        idx, x, own, d_own = idx[still], x[still], own[still], d_own[still]
        stats["checked"] += int(still.numel())
        stats["reassigned"] += int(idx.numel())
        if nb.cand is not None:
            a, d1, d2, ok = _assign_nb(x, own, d_own, centers, c2, nb)
            if not bool(ok.all()):
                bad = (~ok).nonzero().flatten()
                stats["fallback"] += int(bad.numel())
                a[bad], d1[bad], d2[bad] = assign2(x[bad], centers, c2)
        else:
            a, d1, d2 = assign2(x, centers, c2)
        rows = s0 + idx
        self.upper[rows], self.lower[rows] = d1, d2
        self._move_rows(rows, x, own, a, stats)

    def _move_rows(self, rows: Tensor, x: Tensor, own: Tensor, a: Tensor, stats: Counter) -> None:
        """Rows re-assigned from ``own`` to ``a``: update the sums and counts of the clusters they left and
        joined, and their labels."""
        moved = a != own
        if not bool(moved.any()):
            return
        xm = x[moved].to(self.acc)
        self.sums.index_add_(0, own[moved], -xm)
        self.sums.index_add_(0, a[moved], xm)
        self.counts.index_add_(0, own[moved], -torch.ones_like(xm[:, 0]))
        self.counts.index_add_(0, a[moved], torch.ones_like(xm[:, 0]))
        self.lab[rows] = a
        stats["moved"] += int(moved.sum())

    def _pass(self, centers: Tensor) -> tuple[Tensor, Counter]:
        """One bounded pass: update the centres, re-assign the rows whose bounds overlap -> (centres, counts of
        checked / re-assigned / fallback / moved rows)."""
        centers = self._update_centers(centers)
        c2 = (centers * centers).sum(1)
        nb = self._neighbourhood(centers)
        stats: Counter = Counter()
        for s0 in range(0, self.n, self.chunk_size):
            self._reassign_chunk(s0, centers, c2, nb, stats)
        if nb.cand is not None and stats["reassigned"] and stats["fallback"] > _FALLBACK_LIMIT * stats["reassigned"]:
            self.use_nb_ok = False  # overlapping clusters: the neighbourhood rarely proves exactness, stop trying
        return centers, stats

    def run(self, centers: Tensor, max_iter: int, tol: float) -> tuple[Tensor, int, Tensor, float]:
        """Passes from ``centers`` (those of the first pass) until no row moves, a pass lowers the inertia by less
        than ``tol`` (relative), or ``max_iter`` passes -> (centres, passes, labels [N], inertia)."""
        prev = self.inertia(centers)
        it = 1
        while it < max_iter:
            centers, stats = self._pass(centers)
            it += 1
            cur = self.inertia(centers)
            if self.verbose:
                log.info("k-means pass %d (%d rows): %d checked, %d re-assigned (%d against all centres), %d moved, "
                         "inertia %.8g", it, self.n, stats["checked"], stats["reassigned"], stats["fallback"],
                         stats["moved"], cur)
            improved = (prev - cur) / max(abs(cur), 1e-30)
            prev = cur
            if stats["moved"] == 0 or improved < tol:
                break
        return centers, it, self.lab, self.inertia(centers)
