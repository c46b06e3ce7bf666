"""Features, unit alignment, SpeechDataset batches and the resumable sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechssl.data.features import add_deltas, compute_fbank, compute_mfcc, num_feature_frames
from speechssl.data.labels import PAD_ID, align_units, label_rate, load_units
from speechssl.data.dataset import SpeechDataset
from speechssl.data.sampler import ResumableLoader, make_sampler
from speechssl.data.synthetic import write_synthetic_cuts


def per320(n):
    return torch.div(n, 320, rounding_mode="floor")


def _loader(cuts, seed, workers=0):
    return ResumableLoader(make_sampler(cuts, max_duration=4.0, seed=seed, num_buckets=2), SpeechDataset(),
                           num_workers=workers)


@pytest.fixture(scope="module")
def cuts(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    return write_synthetic_cuts(d, 24, 0.6, 2.2, seed=1, units={"km50": 0.02, "km100": 0.01})


def test_fbank_mfcc_shapes_and_lengths(synthetic_wav):
    w = torch.from_numpy(np.stack([synthetic_wav(16000, 0), synthetic_wav(16000, 1)]))
    lens = torch.tensor([16000, 12345])
    fb, fl = compute_fbank(w, lens)
    assert fb.shape == (2, 100, 80) and fl.tolist() == [100, 77]
    assert torch.all(fb[1, 77:] == 0)
    # a padded item equals the item computed alone
    alone, n = compute_fbank(w[1, :12345])
    assert n == 77 and torch.allclose(alone, fb[1, :77], atol=1e-5)
    mf, ml = compute_mfcc(w, lens)
    assert mf.shape == (2, 100, 39) and ml.tolist() == [100, 77]
    assert num_feature_frames(torch.tensor([400, 159, 160, 241])).tolist() == [3, 1, 1, 2]


def test_fbank_matches_lhotse_extractor(synthetic_wav):
    from lhotse import Fbank, FbankConfig

    w = synthetic_wav(8000, 3)
    ref = Fbank(FbankConfig(num_filters=80)).extract(w, 16000)
    ours, _ = compute_fbank(torch.from_numpy(w))
    assert ours.shape == ref.shape
    assert np.allclose(ours.numpy(), ref, atol=1e-3)


def test_add_deltas_formula():
    x = torch.arange(6, dtype=torch.float32).pow(2)[:, None]  # c_t = t^2
    d = add_deltas(x)
    assert d.shape == (6, 3)
    # interior frame t=2: sum_n n (c[t+n]-c[t-n]) / 10 = (1*(9-1) + 2*(16-0)) / 10 = 4.0
    assert d[2, 1].item() == pytest.approx(4.0)
    # edge frame t=0 repeats c_0: (1*(1-0) + 2*(4-0)) / 10 = 0.9
    assert d[0, 1].item() == pytest.approx(0.9)


def test_align_units_rates_offsets_and_padding():
    u = np.arange(7)
    assert align_units(u, 50.0, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, PAD_ID, PAD_ID]
    assert align_units(u, 100.0, 5).tolist() == [0, 2, 4, 6, PAD_ID]
    assert align_units(u, 100.0, 3, offset=0.02).tolist() == [2, 4, 6]
    assert align_units(u, 25.0, 4).tolist() == [0, 0, 1, 1]
    assert align_units(torch.tensor([5, 6, 7]), 50.0, 0).numel() == 0


def test_units_round_trip_lossless(cuts):
    c = cuts[0]
    assert label_rate(c, "km50") == pytest.approx(50.0) and label_rate(c, "km100") == pytest.approx(100.0)
    u = load_units(c, "km100")
    assert u.dtype == np.int64 and np.array_equal(u, np.arange(len(u)) % 97)


def _expected(n_frames, label_shift, start_samples, frame_rate=50.0, n_labels=None):
    out = []
    for i in range(n_frames):
        j = int(np.floor((start_samples / 16000 + i / frame_rate) / label_shift + 1e-6))
        out.append(j % 97 if j < n_labels else PAD_ID)
    return out


def test_dataset_crop_aligns_units_and_pads(cuts):
    cnn = lambda n: torch.div(n - 400, 320, rounding_mode="floor") + 1  # wav2vec2 CNN frame arithmetic
    ds = SpeechDataset(units=["km50", "km100"], num_frames=cnn, crop_to_shortest=True, seed=3)
    sub = cuts.subset(first=5)
    b = ds[sub]
    B, T = b["audio"].shape
    assert B == 5 and (b["audio_lens"] == T).all() and T == min(int(c.num_samples) for c in sub)
    for i, c in enumerate(sub):
        full = c.load_audio()[0]
        # find the crop start on the 320 grid and check labels at that offset
        starts = [s for s in range(0, len(full) - T + 1, 320) if np.allclose(full[s : s + T], b["audio"][i].numpy())]
        assert len(starts) == 1
        nf = int(cnn(torch.tensor(T)))
        for name, shift in (("km50", 0.02), ("km100", 0.01)):
            n_lab = len(load_units(c, name))
            assert b["units"][name][i, :nf].tolist() == _expected(nf, shift, starts[0], n_labels=n_lab)
    assert b["text"] == [f"UTT {c.id[3:].lstrip('0') or '0'}" for c in sub]


def test_dataset_padding_never_real_id(cuts):
    ds = SpeechDataset(units=["km50"], mode="mfcc", num_frames=per320)
    sub = cuts.subset(first=4)
    b = ds[sub]
    nf = torch.div(b["audio_lens"] * 50, 16000, rounding_mode="floor")
    u = b["units"]["km50"]
    assert u.shape[1] == int(nf.max())
    for i in range(4):
        assert (u[i, nf[i]:] == PAD_ID).all()
        assert (u[i, : nf[i]] >= 0).sum() >= nf[i] - 1  # at most the final partial frame lacks a label
    assert b["features"].shape[-1] == 39 and b["features_lens"].tolist() == [
        (int(n) + 80) // 160 for n in b["audio_lens"]]


def test_max_crop_and_odd_lengths(cuts):
    ds = SpeechDataset(units=["km100"], max_crop_samples=12345, downsample_rate=160, seed=0,
                       num_frames=lambda n: torch.div(n, 160, rounding_mode="floor"))
    b = ds[cuts.subset(first=6)]
    assert int(b["audio_lens"].max()) <= 12345
    assert b["units"]["km100"].shape[1] == 12345 // 160  # 100 Hz frames: one 100 Hz label each


def _ids(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append(tuple(b["cut_ids"]))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_exact_with_workers(cuts, workers):
    def build():
        return _loader(cuts, 7, workers)

    ref = _ids(build())
    assert len(ref) >= 6
    a = build()
    first = _ids(a, 3)  # the DataLoader has prefetched beyond these 3 batches
    if workers:  # the sampler really ran ahead of training: a naive resume would skip batches
        assert a.sampler.state_dict()["diagnostics"]["stats_per_epoch"][0]["kept_batches"] > 3
    state = a.state_dict()
    assert state["consumed"] == 3
    b = build()
    b.load_state_dict(state)
    rest = _ids(b)
    assert first + rest == ref
    # next epoch reshuffles
    assert b.epoch == 1 and _ids(b) != ref


def test_ddp_ranks_disjoint(cuts):
    ids = []
    for rank in (0, 1):
        s = make_sampler(cuts, max_duration=4.0, world_size=2, rank=rank, seed=0, num_buckets=2)
        ids.append([c.id for batch in s for c in batch])
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == len(cuts)


def test_set_epoch_after_restore_keeps_position(cuts):
    def build():
        return _loader(cuts, 1)

    ref = _ids(build())
    a = build()
    first = _ids(a, 2)
    state = a.state_dict()
    b = build()
    b.load_state_dict(state)
    b.set_epoch(0)  # a trainer re-announcing the restored epoch must not restart it
    assert first + _ids(b) == ref


def test_snip_edges_frames_match_kaldi_default(synthetic_wav):
    w = torch.from_numpy(np.stack([synthetic_wav(16000, 0), synthetic_wav(16000, 1)]))
    lens = torch.tensor([16000, 12345])
    fb, fl = compute_fbank(w, lens, snip_edges=True)
    assert fl.tolist() == [98, 75] and fb.shape == (2, 98, 80)  # 1 + (n - 400) // 160
    mf, ml = compute_mfcc(w, lens, snip_edges=True)
    assert ml.tolist() == [98, 75] and mf.shape[-1] == 39
    # snip_edges frame t starts at sample 160 t: it equals the default extractor on audio shifted by 120 samples
    ref, _ = compute_fbank(w[0, 120:])
    assert torch.allclose(fb[0, 1:90], ref[1:90], atol=1e-4)


def test_resume_in_second_epoch(cuts):
    def build():
        return _loader(cuts, 5)

    ref = build()
    _ids(ref)
    ref_ep1 = _ids(ref)
    a = build()
    _ids(a)  # epoch 0 fully consumed: the loader moved to epoch 1 by itself
    part = _ids(a, 3)
    state = a.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == 3
    b = build()
    b.set_epoch(1)
    b.load_state_dict(state)
    assert part + _ids(b) == ref_ep1
