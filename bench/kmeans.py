"""speechssl.cluster.KMeans against scikit-learn's MiniBatchKMeans on the same features, same K, same run.

The baseline uses the settings of fairseq's HuBERT k-means script (``learn_kmeans.py``): MiniBatchKMeans with
k-means++ init, batch 10000, max_iter 100, n_init 20, tol 0, max_no_improvement 100, reassignment_ratio 0.
Ours runs exact Lloyd passes in chunks (k-means++ on a 30k-row sample refined there by Lloyd, then bounded Lloyd passes on all rows).

Features are synthetic but shaped like the real ones, so the benchmark needs no data:
- "mfcc": 39-dim, a 1000-component Gaussian mixture with Zipf-like weights and variances that decay with the
  coefficient index (like cepstra + deltas);
- "hidden": 768-dim, a 64-dim latent 1000-component mixture through a random linear map plus noise (like a
  transformer layer's hidden states, whose intrinsic dimension is low).
Both fits get the same float32 array; time is wall-clock of ``fit`` (init included); inertia is recomputed for
both sets of centres by one float64 routine on all rows.

    python bench/kmeans.py            # 200k x 39 (K=100, 500) and 100k x 768 (K=500), 2 threads
    python bench/kmeans.py --quick    # small sizes, a correctness check of the script
    python bench/kmeans.py --device cuda
Target: at least 5x faster at equal or lower inertia (ratio ours/sklearn <= 1.0) on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechssl.cluster import KMeans  # noqa: E402

SK_SETTINGS = dict(init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100, n_init=20,
                   reassignment_ratio=0.0, compute_labels=False)


def make_features(kind: str, n: int, seed: int = 0, components: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, components + 1) ** 0.8
    w = rng.permutation(w / w.sum())
    comp = rng.choice(components, size=n, p=w)
    if kind == "mfcc":
        d = 39
        scale = np.exp(-np.arange(d) % 13 / 6.0) * np.repeat([4.0, 1.0, 0.4], 13)  # decaying cepstra, deltas
        means = rng.normal(size=(components, d)) * scale
        spread = rng.uniform(0.3, 1.0, size=(components, 1)) * scale
        X = means[comp] + spread[comp] * rng.standard_normal((n, d))
    elif kind == "hidden":
        d, latent = 768, 64
        means = rng.normal(size=(components, latent)) * 2.0
        spread = rng.uniform(0.3, 1.0, size=(components, 1))
        Z = means[comp] + spread[comp] * rng.standard_normal((n, latent))
        proj = rng.normal(size=(latent, d)) / np.sqrt(latent)
        X = Z @ proj + 0.1 * rng.standard_normal((n, d))
    else:
        raise ValueError(kind)
    return X.astype(np.float32)


def inertia(X: np.ndarray, centers: np.ndarray, chunk: int = 32768) -> float:
    """Sum of squared distances to the nearest centre, float64, the same routine for both methods."""
    C = torch.from_numpy(np.asarray(centers, dtype=np.float64))
    c2 = (C * C).sum(1)
    tot = 0.0
    for s in range(0, len(X), chunk):
        x = torch.from_numpy(X[s : s + chunk]).double()
        d = (x * x).sum(1, keepdim=True) - 2 * x @ C.T + c2
        tot += float(d.min(1).values.clamp_min(0).sum())
    return tot


def run_case(kind: str, n: int, k: int, seed: int, device: str, sk_n_init: int) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    X = make_features(kind, n, seed)
    t = time.perf_counter()
    ours = KMeans(k, seed=seed, device=device).fit(X)
    if device != "cpu":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t
    settings = dict(SK_SETTINGS, n_init=sk_n_init)
    t = time.perf_counter()
    sk = MiniBatchKMeans(n_clusters=k, random_state=seed, **settings).fit(X)
    t_sk = time.perf_counter() - t
    i_ours, i_sk = inertia(X, ours.cluster_centers_), inertia(X, sk.cluster_centers_)
    return dict(case=f"{kind} {n}x{X.shape[1]} K={k}", t_ours=t_ours, t_sk=t_sk, speedup=t_sk / t_ours,
                i_ours=i_ours, i_sk=i_sk, inertia_ratio=i_ours / i_sk, iters=ours.n_iter_, sk_steps=sk.n_steps_)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that the script runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="device for ours (scikit-learn is CPU only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sk-n-init", type=int, default=SK_SETTINGS["n_init"], help="baseline n_init (fairseq: 20)")
    ap.add_argument("--cases", default=None, metavar="KIND:N:K,...",
                    help="override the cases, e.g. mfcc:200000:100,hidden:100000:500 (kinds: mfcc, hidden)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn depends on it; keep the script usable without
        threadpool_limits = None
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.cases.split(",")]
    elif args.quick:
        cases = [("mfcc", 20000, 100), ("hidden", 12000, 100)]
    else:
        cases = [("mfcc", 200000, 100), ("mfcc", 200000, 500), ("hidden", 100000, 500)]
    print(f"threads={args.threads} device={args.device} baseline=MiniBatchKMeans({', '.join(f'{k}={v}' for k, v in dict(SK_SETTINGS, n_init=args.sk_n_init).items())})")
    print(f"ours=KMeans(mode='lloyd', max_iter=100, tol=1e-3, n_init=1, init_iter=20, init_size=30000)")
    rows = []
    for kind, n, k in cases:
        if threadpool_limits is not None:
            with threadpool_limits(limits=args.threads):
                r = run_case(kind, n, k, args.seed, args.device, args.sk_n_init)
        else:
            r = run_case(kind, n, k, args.seed, args.device, args.sk_n_init)
        rows.append(r)
        print(f"{r['case']:<26} ours {r['t_ours']:7.2f}s ({r['iters']} passes)  sklearn {r['t_sk']:7.2f}s "
              f"({r['sk_steps']} steps)  speedup {r['speedup']:5.1f}x  inertia ours/sklearn {r['inertia_ratio']:.4f}",
              flush=True)
    ok = all(r["speedup"] >= 5.0 and r["inertia_ratio"] <= 1.0 for r in rows)
    print(f"target (>= 5x faster at <= inertia) {'met' if ok else 'NOT met'} in {sum(r['speedup'] >= 5.0 and r['inertia_ratio'] <= 1.0 for r in rows)}/{len(rows)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
