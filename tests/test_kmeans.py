"""speechssl.cluster.KMeans: correctness against known blobs and scikit-learn, chunking, streaming, persistence."""
import numpy as np
import pytest
import torch

from speechssl.cluster import KMeans


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def blobs(n=3000, k=8, d=5, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 5
    y = rng.integers(0, k, n)
    X = centers[y] + spread * rng.normal(size=(n, d))
    return X.astype(np.float32), y, centers


def purity(labels, y):
    # every found cluster maps to one true blob
    tot = 0
    for c in np.unique(labels):
        tot += np.bincount(y[labels == c]).max()
    return tot / len(y)


def test_recovers_blobs_and_reports_inertia():
    X, y, _ = blobs()
    km = KMeans(8, seed=0).fit(X)
    assert km.cluster_centers_.shape == (8, 5)
    assert purity(km.labels_, y) == 1.0
    # inertia_ is the sum of squared distances to the nearest centre
    d = ((X[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1).min(1).sum()
    assert km.inertia_ == pytest.approx(d, rel=1e-4)
    assert km.score(X) == pytest.approx(-d, rel=1e-4)
    assert km.n_iter_ >= 1
    assert np.array_equal(km.predict(X), km.labels_)
    assert np.array_equal(km.transform(X).argmin(1), km.labels_)


def test_matches_sklearn_inertia():
    sk = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2000, 6)).astype(np.float32)  # no clear clusters: a real optimisation problem
    ours = KMeans(16, seed=0).fit(X).inertia_
    ref = sk.KMeans(16, n_init=2, random_state=0).fit(X).inertia_
    assert ours <= ref * 1.02


def test_chunking_numpy_torch_and_memmap_agree(tmp_path):
    X, _, _ = blobs(n=2000)
    a = KMeans(8, seed=3).fit(X)
    b = KMeans(8, seed=3, chunk_size=97).fit(X)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
    mm[:] = X
    mm.flush()
    c = KMeans(8, seed=3, chunk_size=500).fit(np.load(tmp_path / "x.npy", mmap_mode="r"))
    d = KMeans(8, seed=3).fit(torch.from_numpy(X))
    def srt(c):  # the same partition may come out with permuted centres
        return c[np.lexsort(c.T[::-1])]

    for other in (b, c, d):
        np.testing.assert_allclose(srt(a.cluster_centers_), srt(other.cluster_centers_), atol=1e-4)
        assert other.inertia_ == pytest.approx(a.inertia_, rel=1e-4)
    assert isinstance(d.labels_, torch.Tensor) and isinstance(a.labels_, np.ndarray)
    assert torch.equal(d.predict(torch.from_numpy(X)), torch.from_numpy(a.labels_))


def test_seeded():
    X, _, _ = blobs(n=1500, k=12, spread=2.0)
    a = KMeans(12, seed=5).fit(X).cluster_centers_
    b = KMeans(12, seed=5).fit(X).cluster_centers_
    assert np.array_equal(a, b)


def test_minibatch_mode_and_partial_fit():
    X, y, _ = blobs(n=6000)
    mb = KMeans(8, mode="minibatch", batch_size=500, max_iter=5, seed=0).fit(X)
    full = KMeans(8, seed=0).fit(X)
    assert mb.inertia_ <= full.inertia_ * 1.05
    stream = KMeans(8, seed=0)
    for _ in range(3):
        for s in range(0, len(X), 1000):
            stream.partial_fit(X[s : s + 1000])
    assert purity(stream.predict(X), y) > 0.99
    assert -stream.score(X) <= full.inertia_ * 1.05
    with pytest.raises(ValueError, match="at least n_clusters"):
        KMeans(8).partial_fit(X[:5])


def test_empty_cluster_is_reseeded():
    # two identical init centres: one cluster is empty after the first pass and must be moved
    X, _, centers = blobs(n=1000, k=4)
    init = np.repeat(centers[:1], 4, axis=0)
    km = KMeans(4, init=init, seed=0).fit(X)
    assert len(np.unique(km.labels_)) == 4


def test_errors_are_clear():
    X, _, _ = blobs(n=100)
    with pytest.raises(ValueError, match="n_samples=100 must be >= n_clusters=200"):
        KMeans(200).fit(X)
    km = KMeans(4).fit(X)
    with pytest.raises(ValueError, match="3 features but the model was fitted on 5"):
        km.predict(X[:, :3])
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(3).predict(X)
    with pytest.raises(ValueError, match="mode"):
        KMeans(3, mode="elkan")


def test_save_load_roundtrip(tmp_path):
    X, _, _ = blobs(n=800)
    km = KMeans(8, seed=0).fit(X)
    km.save(tmp_path / "km", meta={"feature": "mfcc"})
    back = KMeans.load(tmp_path / "km")
    np.testing.assert_array_equal(back.cluster_centers_, km.cluster_centers_)
    assert back.meta == {"feature": "mfcc"}
    assert np.array_equal(back.predict(X), km.labels_)
    with pytest.raises(FileNotFoundError, match="not a k-means directory"):
        KMeans.load(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    X, _, _ = blobs(n=5000)
    cpu = KMeans(8, seed=0).fit(X)
    gpu = KMeans(8, seed=0, device="cuda").fit(X)
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=1e-3)
    lab = gpu.predict(torch.from_numpy(X).cuda())
    assert lab.is_cuda


def test_bounds_and_neighbour_search_are_exact():
    # the pruned passes (bounds + neighbour-restricted search) must give plain Lloyd's result
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3000, 4)).astype(np.float32)
    init = X[:24].copy()
    pruned = KMeans(24, init=init, neighbours=3, tol=0.0, max_iter=30).fit(X)
    full = KMeans(24, init=init, neighbours=1000, tol=0.0, max_iter=30).fit(X)
    c = torch.from_numpy(init).double()
    x = torch.from_numpy(X).double()
    for _ in range(29):  # reference: textbook Lloyd in float64 (30 assignments, the last for the returned centres)
        lab = torch.cdist(x, c).argmin(1)
        c = torch.stack([x[lab == k].mean(0) if (lab == k).any() else c[k] for k in range(24)])
    lab = torch.cdist(x, c).argmin(1)
    assert (torch.from_numpy(pruned.labels_) == lab).float().mean() > 0.999
    assert np.array_equal(pruned.labels_, full.labels_)
    np.testing.assert_allclose(pruned.cluster_centers_, c.numpy(), atol=1e-3)
