"""Shar export/import round trip with unit labels, and per-rank/per-worker streaming."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechssl.cli.main import main
from speechssl.data.corpora.prepare import write_cuts
from speechssl.data.dataset import SpeechDataset
from speechssl.data.labels import label_rate, load_units
from speechssl.data.shar import export_shar, make_shar_loader, open_shar_cuts
from speechssl.data.synthetic import write_synthetic_cuts


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
        dl = make_shar_loader(tmp_path / "shar", SpeechDataset(None, units=["kmeans"]), max_duration=3.0,
                              num_workers=2, rank=rank, world_size=2, num_buckets=2)
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
