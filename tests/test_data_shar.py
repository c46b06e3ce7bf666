"""Shar export/import round trip with unit labels, and per-rank/per-worker streaming."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechssl.cli.main import main
from speechssl.data.corpora.prepare import write_cuts
from speechssl.data.dataset import SpeechDataset
from speechssl.data.labels import label_rate, load_units
from speechssl.data.loader import DataConfig, build_loader
from speechssl.data.shar import export_shar, open_shar_cuts
from speechssl.data.synthetic import write_synthetic_cuts


def per320(n):
    return torch.div(n, 320, rounding_mode="floor")


@pytest.fixture(scope="module")
def cuts(tmp_path_factory):
    return write_synthetic_cuts(tmp_path_factory.mktemp("sh"), 8, 0.5, 1.5, seed=4, units={"kmeans": 0.02})


def test_round_trip_units_exact(cuts, tmp_path):
    export_shar(cuts, tmp_path / "shar", shard_size=3)
    assert len(list((tmp_path / "shar").glob("cuts.*.jsonl.gz"))) == 3
    back = {c.id: c for c in open_shar_cuts(tmp_path / "shar", split_for_dataloading=False, shuffle_shards=False)}
    assert set(back) == {c.id for c in cuts}
    for c in cuts:
        b = back[c.id]
        assert np.array_equal(load_units(b, "kmeans"), load_units(c, "kmeans"))
        assert label_rate(b, "kmeans") == pytest.approx(50.0)
        # FLAC holds 16-bit audio: equal up to quantisation
        assert np.abs(b.load_audio() - c.load_audio()).max() < 1e-4
        assert b.supervisions[0].text == c.supervisions[0].text


def test_cli_and_streaming_splits(cuts, tmp_path):
    write_cuts(cuts, tmp_path / "cuts.jsonl.gz")
    assert main(["export-shar", str(tmp_path / "cuts.jsonl.gz"), str(tmp_path / "shar"), "--shard-size", "2",
                 "--fields", "kmeans"]) == 0
    seen = []
    for rank in (0, 1):
        cfg = DataConfig(shar_dir=str(tmp_path / "shar"), max_duration=3.0, num_buckets=2)
        dl = build_loader(cfg, SpeechDataset(units=["kmeans"], num_frames=per320), seed=0, num_workers=2, rank=rank,
                          world_size=2)
        ids = [i for b in dl for i in b["cut_ids"]]
        assert len(ids) == len(set(ids))  # no duplicates across the two workers
        seen.append(set(ids))
        for b in dl:
            assert b["units"]["kmeans"].dtype == torch.long
            break
    assert not seen[0] & seen[1]  # ranks read disjoint shards
    assert seen[0] | seen[1] == {c.id for c in cuts}


def test_missing_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Shar"):
        open_shar_cuts(tmp_path)


# ------------------------------------------------------------------------------- exact resume of Shar streams
@pytest.fixture(scope="module")
def shar24(tmp_path_factory):
    d = tmp_path_factory.mktemp("shar24")
    cuts = write_synthetic_cuts(d / "src", 24, 0.5, 1.5, seed=4, units={"kmeans": 0.02})
    export_shar(cuts, d / "shar", shard_size=3)
    return cuts, d / "shar"


def _resumable(shar, num_workers, **kw):
    from speechssl.data.shar import make_resumable_shar_loader

    return make_resumable_shar_loader(shar, SpeechDataset(units=["kmeans"], num_frames=per320), max_duration=3.0,
                                      num_workers=num_workers, num_buckets=3, **kw)


def _ids(batch):
    return tuple(batch["cut_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_shar_resume_is_exact(shar24, num_workers):
    cuts, shar = shar24
    ref = _resumable(shar, num_workers)
    epochs = []
    for e in range(2):
        ref.set_epoch(e)
        epochs.append([_ids(b) for b in ref])
    flat = [i for b in epochs[0] for i in b]
    assert sorted(flat) == sorted(c.id for c in cuts)  # one epoch = every cut exactly once
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    n = len(epochs[0])
    # resume after K batches, including right at the end of a worker's stream and of the epoch
    for k in sorted({1, n // 2, n - 1, n}):
        run = _resumable(shar, num_workers)
        run.set_epoch(0)
        it = iter(run)
        got = [_ids(next(it)) for _ in range(k)]
        state = run.state_dict()
        del it
        assert sum(state["consumed"]) == k
        again = _resumable(shar, num_workers)
        again.set_epoch(0)
        again.load_state_dict(state)
        assert got + [_ids(b) for b in again] == epochs[0], k
        again.set_epoch(1)
        assert [_ids(b) for b in again] == epochs[1]


def test_resumable_shar_batches_match_source(shar24):
    """Random-access hydration attaches the same audio and units as the source manifest (FLAC: 16-bit)."""
    cuts, shar = shar24
    by_id = {c.id: c for c in cuts}
    ds = SpeechDataset(units=["kmeans"], num_frames=per320)
    for b in _resumable(shar, 0):
        from lhotse import CutSet

        src = ds[CutSet.from_cuts([by_id[i] for i in b["cut_ids"]])]
        assert torch.equal(b["audio_lens"], src["audio_lens"])
        assert (b["audio"] - src["audio"]).abs().max() < 1e-4
        assert torch.equal(b["units"]["kmeans"], src["units"]["kmeans"])


def test_resumable_shar_skip_reads_no_audio(shar24, monkeypatch):
    """Skipping consumed batches replays the cut manifests only: no tar member is read for them."""
    from speechssl.data import shar as shar_mod

    _, shar = shar24
    ref = [_ids(b) for b in _resumable(shar, 0)]
    run = _resumable(shar, 0)
    it = iter(run)
    for _ in range(len(ref) - 1):
        next(it)
    state = run.state_dict()
    del it
    reads = []
    real = shar_mod._TarIndex.read
    monkeypatch.setattr(shar_mod._TarIndex, "read", lambda self, cid: reads.append(cid) or real(self, cid))
    again = _resumable(shar, 0)
    again.load_state_dict(state)
    rest = [_ids(b) for b in again]
    assert rest == ref[-1:]
    assert sorted(set(reads)) == sorted(rest[0])  # only the last batch's cuts were read from the tars


def test_resumable_shar_ranks_and_mismatch(shar24, caplog):
    cuts, shar = shar24
    seen = [{i for b in _resumable(shar, 2, rank=r, world_size=2) for i in _ids(b)} for r in (0, 1)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {c.id for c in cuts}
    run = _resumable(shar, 2)
    it = iter(run)
    next(it)
    state = run.state_dict()
    del it
    other = _resumable(shar, 0)  # different worker count: the shard split differs -> the epoch starts over
    other.load_state_dict(state)
    assert "starts over" in caplog.text
    assert sorted(i for b in other for i in _ids(b)) == sorted(c.id for c in cuts)
    with pytest.raises(ValueError, match="not a Shar loader state"):
        other.load_state_dict({"epoch": 0, "consumed": 3})
