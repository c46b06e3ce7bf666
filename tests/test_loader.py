"""The one batch builder (speechssl.data.loader): manifests and Shar to batches, filters, laziness, DDP shards,
exact resume, frame-aligned labels and bad-input skips."""
from __future__ import annotations

import shutil

import pytest
import torch
from lhotse import CutSet

from speechssl.config import ConfigError, from_dict
from speechssl.constants import PAD_ID
from speechssl.data.audio import BadCutError
from speechssl.data.loader import DataConfig, build_dataset, build_loader, open_cuts, split_cuts
from speechssl.data.shar import export_shar
from speechssl.data.synthetic import write_synthetic_cuts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny encoder: see conftest

N_CUTS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 cuts of 0.6-2.2 s with 50 Hz units, as a jsonl.gz manifest and as Shar shards."""
    d = tmp_path_factory.mktemp("loader")
    cuts = write_synthetic_cuts(d / "src", N_CUTS, 0.6, 2.2, seed=3, units={"km": 0.02})
    cuts.to_file(d / "cuts.jsonl.gz")
    export_shar(cuts, d / "shar", shard_size=4)
    return cuts, d


@pytest.fixture(scope="module")
def encoder():
    from speechssl.models import build_encoder

    torch.manual_seed(0)
    return build_encoder("tiny_hubert", num_layers=1)


def _cfg(d, **kw) -> DataConfig:
    kw.setdefault("max_duration", 4.0)
    kw.setdefault("num_buckets", 2)
    kw.setdefault("crop_to_shortest", False)
    kw.setdefault("max_crop_seconds", None)
    return DataConfig(train=[str(d / "cuts.jsonl.gz")], **kw)


def _dataset(cfg, encoder, train=True):
    return build_dataset(cfg, num_frames=encoder.num_frames, downsample_rate=encoder.downsample_rate, seed=0,
                         train=train)


def _ids(loader, n=None):
    out = []
    for b in loader:
        out.append(tuple(b["cut_ids"]))
        if n is not None and len(out) == n:
            break
    return out


def split_by_resume(build, k, ids=_ids):
    """The batches' cut ids (``ids(loader, n)``) of a loader from ``build()`` stopped after ``k`` batches, those of a
    fresh loader resumed from its ``state_dict``, and that resumed loader."""
    a = build()
    first = ids(a, k)
    state = a.state_dict()
    b = build()
    b.load_state_dict(state)
    return first, ids(b), b


def test_manifests_and_shar_give_the_same_cuts(corpus, encoder):
    cuts, d = corpus
    cfg = _cfg(d, units=["km"])
    for source in (cfg, DataConfig(shar_dir=str(d / "shar"), max_duration=4.0, num_buckets=2, units=["km"],
                                   crop_to_shortest=False, max_crop_seconds=None)):
        loader = build_loader(source, _dataset(source, encoder), seed=0)
        batches = list(loader)
        seen = [i for b in batches for i in b["cut_ids"]]
        assert sorted(seen) == sorted(c.id for c in cuts)  # one epoch: every cut exactly once
        assert len(batches) > 1
        for b in batches:
            assert b["audio"].shape == (len(b["cut_ids"]), int(b["audio_lens"].max()))
            assert b["units"]["km"].shape == (len(b["cut_ids"]), int(encoder.num_frames(b["audio_lens"]).max()))


def test_duration_filters_drop_what_they_should(corpus):
    cuts, d = corpus
    lo, hi = 1.0, 1.8
    want = sorted(c.id for c in cuts if lo <= c.duration <= hi)
    assert 0 < len(want) < N_CUTS  # the filter really removes some and keeps some
    got = sorted(c.id for c in split_cuts(_cfg(d, min_duration=lo, max_cut_duration=hi)))
    assert got == want
    assert len(list(split_cuts(_cfg(d)))) == N_CUTS
    shar = DataConfig(shar_dir=str(d / "shar"), min_duration=lo, max_cut_duration=hi)
    assert sorted(c.id for c in split_cuts(shar)) == want
    loader = build_loader(_cfg(d, min_duration=lo, max_cut_duration=hi), build_dataset(
        _cfg(d), num_frames=None, downsample_rate=320, seed=0, train=False), seed=0)
    assert sorted(i for b in loader for i in b["cut_ids"]) == want


def test_cuts_are_read_lazily(corpus, encoder):
    _, d = corpus
    assert open_cuts(d / "cuts.jsonl.gz").is_lazy
    assert split_cuts(_cfg(d, min_duration=1.0)).is_lazy
    loader = build_loader(_cfg(d), _dataset(_cfg(d), encoder), seed=0)
    assert all(cs.is_lazy for cs in loader.sampler.cuts)  # the sampler streams the manifest too


def test_tiny_manifest_fewer_cuts_than_buckets(corpus, tmp_path, encoder):
    cuts, _ = corpus
    cuts.subset(first=3).to_file(tmp_path / "tiny.jsonl.gz")
    cfg = DataConfig(train=[str(tmp_path / "tiny.jsonl.gz")], num_buckets=10, max_duration=60.0)
    loader = build_loader(cfg, _dataset(cfg, encoder), seed=0)
    assert sorted(i for b in loader for i in b["cut_ids"]) == sorted(c.id for c in cuts.subset(first=3))


def test_ddp_ranks_see_disjoint_cuts_covering_the_epoch(corpus, encoder):
    cuts, d = corpus
    cfg = _cfg(d)
    batches = [list(build_loader(cfg, _dataset(cfg, encoder), seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(batches[0]) == len(batches[1])  # equal step counts on every rank (Lhotse pads with copies)
    seen = [{i for b in bs for i in b["cut_ids"] if "_dup" not in i} for bs in batches]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {c.id for c in cuts}


@pytest.mark.parametrize("source", ["manifest", "shar"])
def test_resume_mid_epoch_is_exact(corpus, encoder, source):
    _, d = corpus
    cfg = _cfg(d) if source == "manifest" else DataConfig(shar_dir=str(d / "shar"), max_duration=4.0,
                                                          num_buckets=2)

    def build():
        return build_loader(cfg, _dataset(cfg, encoder), seed=5)

    ref = _ids(build())
    assert len(ref) >= 6
    first, rest, _ = split_by_resume(build, 3)
    assert first + rest == ref


def test_labels_are_aligned_to_the_encoders_frames(corpus, encoder):
    _, d = corpus
    cfg = _cfg(d, units=["km"], crop_to_shortest=True, max_crop_seconds=1.0)
    for b in build_loader(cfg, _dataset(cfg, encoder), seed=0):
        frames = encoder.num_frames(b["audio_lens"])
        units = b["units"]["km"]
        assert units.shape == (len(b["cut_ids"]), int(frames.max()))
        for i, n in enumerate(frames.tolist()):
            assert (units[i, :n] >= 0).sum() >= n - 1 and (units[i, n:] == PAD_ID).all()
        assert int(b["audio_lens"].max()) <= 16000  # max_crop_seconds


def test_bad_input_is_skipped_and_counted(corpus, tmp_path, encoder):
    cuts, d = corpus
    src = [c for c in cuts.subset(first=6)]
    moved = tmp_path / "wav"
    moved.mkdir()
    for c in src[:2]:  # two cuts whose audio file disappears
        shutil.move(c.recording.sources[0].source, moved / c.id)
    try:
        CutSet.from_cuts(src).to_file(tmp_path / "bad.jsonl.gz")
        cfg = DataConfig(train=[str(tmp_path / "bad.jsonl.gz")], max_duration=100.0, num_buckets=1)
        loader = build_loader(cfg, _dataset(cfg, encoder), seed=0)
        assert sorted(i for b in loader for i in b["cut_ids"]) == sorted(c.id for c in src[2:])
        assert dict(loader.skipped) == {"missing_file": 2}
        strict = DataConfig(train=cfg.train, max_duration=100.0, num_buckets=1, skip_bad=False)
        with pytest.raises(BadCutError, match="missing_file"):
            list(build_loader(strict, _dataset(strict, encoder), seed=0))
    finally:
        for c in src[:2]:
            shutil.move(moved / c.id, c.recording.sources[0].source)


def test_errors_name_the_config_keys(tmp_path, encoder):
    with pytest.raises(ConfigError, match="'data.train': manifest not found"):
        open_cuts([tmp_path / "nope.jsonl.gz"], "data.train")
    with pytest.raises(ConfigError, match="'data.valid' lists no manifest"):
        split_cuts(DataConfig(train=["x"]), "valid")
    with pytest.raises(ConfigError, match="'data.shar_dir': not a directory"):
        build_loader(DataConfig(shar_dir=str(tmp_path / "none")), None, seed=0)
    with pytest.raises(ConfigError, match="'data.features' must be one of"):
        from_dict(DataConfig, {"features": "spectrogram"}, prefix="data.")
    with pytest.raises(ConfigError, match="'data.max_cut_duration'"):
        DataConfig(min_duration=2.0, max_cut_duration=1.0).validate()
    with pytest.raises(ValueError, match="'units' needs 'num_frames'"):
        build_dataset(DataConfig(units=["km"]), num_frames=None, downsample_rate=320, seed=0, train=False)
    with pytest.raises(ConfigError, match="'data.augment'"):
        build_dataset(from_dict(DataConfig, {"augment": {"enabled": True, "noise_prob": 1.0,
                                                          "noise_cuts": str(tmp_path / "none.jsonl.gz")}}),
                      num_frames=encoder.num_frames, downsample_rate=320, seed=0, train=True)


def test_compression_defaults_come_from_the_callers_factory():
    """One DataConfig class: a job with other defaults declares its own default_factory."""
    from dataclasses import dataclass, field

    def whole_utterances() -> DataConfig:
        return DataConfig(max_duration=60.0, crop_to_shortest=False, max_crop_seconds=None, skip_bad=False)

    @dataclass
    class Job:
        data: DataConfig = field(default_factory=whole_utterances)

    d = Job().data
    assert (d.max_duration, d.crop_to_shortest, d.max_crop_samples, d.skip_bad) == (60.0, False, None, False)
    assert DataConfig(max_crop_seconds=0.0).max_crop_samples is None  # 0 = no crop (compression's old spelling)
    assert DataConfig().max_crop_samples == 250000
