"""Data integrity: the 25 ms rule on every loading path, header checks against the manifest, all-bad batches,
`validate --skip-bad` keeping the original, and SUPERB's skip_bad. Each test injects a fault and asserts the
outcome: refused (a BadCutError with its reason), reported, or counted, with the previous state intact."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording, SupervisionSegment
from test_loader import split_by_resume

from speechssl.cli.main import main
from speechssl.data.audio import BadCutError, check_cut, load_cut_audio
from speechssl.data.corpora.prepare import write_cuts
from speechssl.data.dataset import SpeechDataset
from speechssl.data.sampler import ResumableLoader, make_sampler
from speechssl.data.synthetic import write_synthetic_cuts

SR = 16000


def _rec(path, **over) -> Recording:
    rec = Recording.from_file(path)
    return Recording.from_dict({**rec.to_dict(), **over}) if over else rec


def _reason(cut, decode: bool | None = None) -> str:
    """The BadCutError reason of loading (decode=None) or checking (header-only / decoded) ``cut``."""
    with pytest.raises(BadCutError) as ei:
        if decode is None:
            load_cut_audio(cut)
        else:
            check_cut(cut, decode=decode)
    assert ei.value.cut_id == cut.id  # every error names the cut
    return ei.value.reason


# ------------------------------------------------------------------------------------- item 5: the 25 ms rule
def test_8khz_file_behind_16khz_manifest_is_rate_mismatch(tmp_path, synthetic_wav):
    path = tmp_path / "a.wav"
    sf.write(path, synthetic_wav(SR), SR)
    cut = _rec(path).to_cut()  # the manifest: 1 s at 16 kHz
    sf.write(path, synthetic_wav(SR // 2, sr=8000), 8000)  # the file: 1 s at 8 kHz
    # the fault as Lhotse alone sees it: half the samples, padded by reflection, no error
    assert cut.load_audio().shape == (1, SR)
    assert _reason(cut) == "rate_mismatch"
    assert _reason(cut, decode=False) == "rate_mismatch"  # the header check alone finds it
    assert _reason(cut, decode=True) == "rate_mismatch"
    with pytest.raises(BadCutError, match="8000 Hz.*16000 Hz.*re-create"):
        load_cut_audio(cut)


def test_short_stereo_file_is_truncated_on_every_check(tmp_path, synthetic_wav):
    st = np.stack([synthetic_wav(SR, 0), synthetic_wav(SR, 1)], axis=1)
    path = tmp_path / "st.wav"
    sf.write(path, st, SR)
    cut = _rec(path).to_cut()  # a MultiCut over both channels: Lhotse's loader, not the mono fast path
    sf.write(path, st[: SR - int(0.45 * SR)], SR)  # 0.45 s short: inside Lhotse's 0.5 s tolerance
    assert cut.load_audio().shape == (2, SR)  # what Lhotse alone would do
    assert _reason(cut) == "truncated"
    assert _reason(cut, decode=False) == "truncated"
    # bytes cut off a WAV: libsndfile counts the frames that are there, so the header check sees it
    sf.write(path, st, SR)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - int(0.3 * SR) * 4])
    assert _reason(cut, decode=False) == "truncated"
    # a FLAC cut short keeps a header claiming every frame: only decoding finds it
    fl = tmp_path / "st.flac"
    sf.write(fl, st, SR)
    fcut = _rec(fl).to_cut()
    fl.write_bytes(fl.read_bytes()[: int(fl.stat().st_size * 0.6)])
    check_cut(fcut, decode=False)
    assert _reason(fcut, decode=True) in ("truncated", "unreadable")
    # within 25 ms the clip loads, padded to the manifest's length
    sf.write(path, st[: SR - int(0.02 * SR)], SR)
    assert load_cut_audio(cut).shape == (SR,)


def test_channel_count_mismatch(tmp_path, synthetic_wav):
    path = tmp_path / "c.wav"
    sf.write(path, np.stack([synthetic_wav(SR, 0)] * 2, axis=1), SR)
    cut = _rec(path).to_cut()
    sf.write(path, synthetic_wav(SR, 0), SR)  # now mono
    assert _reason(cut, decode=False) == "channel_mismatch"
    assert _reason(cut) == "channel_mismatch"


def test_in_memory_source_follows_the_25ms_rule(tmp_path, synthetic_wav):
    import lhotse.audio.utils as lu

    sf.write(tmp_path / "m.wav", synthetic_wav(12000), SR)
    rec = _rec(tmp_path / "m.wav").move_to_memory()  # no file: only Lhotse's own length check applies
    before = lu._LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE
    long = Recording.from_dict({**rec.to_dict(), "num_samples": SR, "duration": 1.0})  # 0.25 s more than stored
    assert _reason(long.to_cut()) == "truncated"
    assert lu._LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE == before  # Lhotse's setting is put back
    ok = Recording.from_dict({**rec.to_dict(), "num_samples": 12200, "duration": 12200 / SR})  # 12.5 ms more
    assert load_cut_audio(ok.to_cut()).shape == (12200,)


# --------------------------------------------------------------------------------- item 6: all-bad batches
def _mixed_cuts(tmp_path, n_good=5, n_bad=3):
    """1 s cuts; the bad ones lose their files."""
    cuts = write_synthetic_cuts(tmp_path, n_good + n_bad, 1.0, 1.0, seed=3)
    for c in list(cuts)[n_good:]:
        Path(c.recording.sources[0].source).unlink()
    return cuts


def _ids(loader, n=None):
    out = []
    for b in loader:
        assert b["audio"].shape[0] == len(b["cut_ids"]) > 0  # never an empty batch
        out.append(tuple(b["cut_ids"]))
        if len(out) == n:
            break
    return out


def test_all_bad_batch_is_skipped_counted_and_resumes_exactly(tmp_path):
    cuts = _mixed_cuts(tmp_path)

    def build():  # 1.5 s per batch: one cut each, so every bad cut makes an all-bad batch
        return ResumableLoader(make_sampler(cuts, max_duration=1.5, seed=2, num_buckets=2),
                               SpeechDataset(skip_bad=True))

    ref_loader = build()
    ref = _ids(ref_loader)
    assert len(ref) == 5 and ref_loader.skipped_batches == 3 and dict(ref_loader.skipped) == {"missing_file": 3}
    first, rest, b = split_by_resume(build, 2, _ids)
    assert first + rest == ref
    assert b.skipped_batches == 3 and sum(b.skipped.values()) == 3  # counts carried over the resume


def test_epoch_of_only_bad_cuts_is_a_clear_error(tmp_path):
    cuts = _mixed_cuts(tmp_path, n_good=0, n_bad=2)
    loader = ResumableLoader(make_sampler(cuts, max_duration=1.5, num_buckets=2), SpeechDataset(skip_bad=True))
    with pytest.raises(RuntimeError, match="only bad cuts.*validate"):
        list(loader)


def test_shar_all_bad_batch_is_skipped(tmp_path, synthetic_wav):
    from speechssl.data.shar import export_shar, make_resumable_shar_loader

    cuts = list(write_synthetic_cuts(tmp_path / "w", 3, 1.0, 1.0, seed=5))
    for i in range(4):  # 10 ms clips: too short for one frame, bad wherever they are read from
        p = tmp_path / f"tiny{i}.wav"
        sf.write(p, synthetic_wav(160, i), SR)
        cuts.append(_rec(p).to_cut())
    export_shar(CutSet.from_cuts(cuts), tmp_path / "shar", shard_size=10)

    def build():
        return make_resumable_shar_loader(tmp_path / "shar", SpeechDataset(skip_bad=True), max_duration=1.5,
                                          num_workers=0, num_buckets=1)

    loader = build()
    ref = _ids(loader)
    assert sorted(i for b in ref for i in b) == sorted(c.id for c in cuts[:3])
    assert loader.skipped_batches >= 1 and dict(loader.skipped) == {"too_short": 4}
    a = build()
    first = _ids(a, 1)
    b = build()
    b.load_state_dict(a.state_dict())
    assert first + _ids(b) == ref


# ---------------------------------------------------------------------- item 8: validate --skip-bad keeps originals
def _manifest_ids(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["id"] for line in f]


def test_validate_skip_bad_keeps_original_and_lists_every_id(tmp_path, capsys):
    cuts = write_synthetic_cuts(tmp_path / "a", 9, 0.5, 0.5, seed=1)
    man = tmp_path / "cuts_asr_train.jsonl.gz"
    write_cuts(cuts, man)
    bad = [c.id for c in list(cuts)[1:8]]  # seven bad cuts: more than any "first five" list would show
    for c in list(cuts)[1:8]:
        Path(c.recording.sources[0].source).unlink()
    assert main(["prepare", "validate", str(tmp_path)]) == 1
    assert _manifest_ids(man) == [c.id for c in cuts]  # a failing run changes nothing
    assert main(["prepare", "validate", str(tmp_path), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "--decode" in out and "NaN" in out  # header-only runs say what they did not check
    orig = tmp_path / "cuts_asr_train.orig.jsonl.gz"
    assert _manifest_ids(orig) == [c.id for c in cuts]
    assert _manifest_ids(man) == [cuts[0].id, cuts[8].id]
    rep = json.loads((tmp_path / "validation.json").read_text())["asr_train"]
    assert sorted(rep["dropped_ids"]["missing_file"]) == sorted(bad) and rep["original"] == str(orig)
    assert rep["decoded"] is False and "--decode" in rep["note"]
    # a later run: the .orig file is not a split, and a further drop keeps the first original
    Path(cuts[0].recording.sources[0].source).unlink()
    assert main(["prepare", "validate", str(tmp_path), "--skip-bad"]) == 0
    rep = json.loads((tmp_path / "validation.json").read_text())
    assert set(rep) == {"asr_train"} and rep["asr_train"]["dropped_ids"] == {"missing_file": [cuts[0].id]}
    assert _manifest_ids(orig) == [c.id for c in cuts] and _manifest_ids(man) == [cuts[8].id]


def test_nan_audio_needs_decode(tmp_path, synthetic_wav, capsys):
    w = synthetic_wav(SR)
    w[100] = np.nan
    sf.write(tmp_path / "nan.wav", w, SR, subtype="FLOAT")
    cut = _rec(tmp_path / "nan.wav").to_cut()
    cut.supervisions = [SupervisionSegment(id=cut.id, recording_id=cut.recording_id, start=0, duration=1.0,
                                           text="A")]
    write_cuts(CutSet.from_cuts([cut]), tmp_path / "cuts_x.jsonl.gz")
    assert main(["prepare", "validate", str(tmp_path)]) == 0  # headers are fine
    assert "--decode" in capsys.readouterr().out
    assert main(["prepare", "validate", str(tmp_path), "--decode"]) == 1
    assert "non_finite" in capsys.readouterr().err
    assert not (tmp_path / "cuts_x.orig.jsonl.gz").exists()


# ------------------------------------------------------------------------------- item 7: SUPERB skip_bad
def _superb_corpus(root: Path, synthetic_wav) -> dict[str, str]:
    """sid_{train,dev,test}: 2 'speakers' of 0.4 s clips; returns {fault: cut id} for the faults injected."""
    from lhotse import CutSet

    faults = {}
    for split, n in (("sid_train", 4), ("sid_dev", 2), ("sid_test", 3)):
        cuts = []
        for k in range(2):
            for i in range(n):
                cid = f"{split}-{k}-{i}"
                path = root / "wav" / f"{cid}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, synthetic_wav(6400, seed=100 * k + i) * (1 + k), SR)
                cut = _rec(path).to_cut()
                cut.supervisions = [SupervisionSegment(id=cid, recording_id=cut.recording_id, start=0,
                                                       duration=cut.duration, speaker=f"spk{k}")]
                cuts.append(cut)
        write_cuts(CutSet.from_cuts(cuts), root / f"cuts_{split}.jsonl.gz")
        if split == "sid_train":  # a missing file and a cut without its label
            faults["missing_file"] = cuts[0].id
            Path(cuts[0].recording.sources[0].source).unlink()
            faults["missing_field"] = cuts[1].id
            cuts[1].supervisions = []
            write_cuts(CutSet.from_cuts(cuts), root / f"cuts_{split}.jsonl.gz")
        if split == "sid_test":  # a test file rewritten at 8 kHz behind its 16 kHz manifest
            faults["rate_mismatch"] = cuts[2].id
            sf.write(cuts[2].recording.sources[0].source, synthetic_wav(3200, sr=8000), 8000)
    return faults


@pytest.mark.parametrize("cache", ["true", "false"])  # screening fills the cache, or decodes once without one
def test_superb_skip_bad_counts_and_reports_scored(tmp_path, synthetic_wav, cache):
    from speechssl.config import load_config
    from speechssl.superb.train import SuperbConfig, run_superb

    faults = _superb_corpus(tmp_path / "data", synthetic_wav)
    cfg_path = Path(__file__).resolve().parents[1] / "conf" / "superb" / "mini_sid.yaml"
    sets = [f"data.manifest_dir={tmp_path / 'data'}", "trainer.progress=false", "head.proj_dim=16",
            "trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=4", "data.max_duration=2",
            "data.train_crop=0",
            f"cache.enabled={cache}"]
    n = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match=f"{faults['missing_field']}.*skip_bad"):  # off: the first bad cut stops it
            run_superb(load_config(SuperbConfig, cfg_path, sets + ["data.skip_bad=false", "data.dev_split=none"]),
                       tmp_path / "strict")
        r = run_superb(load_config(SuperbConfig, cfg_path, sets), tmp_path / "exp")
    finally:
        torch.set_num_threads(n)
    assert r["scored"] == 5  # 6 test utterances, one at the wrong sample rate
    assert r["skipped"]["sid_train"]["dropped_ids"] == {"missing_file": [faults["missing_file"]],
                                                        "missing_field": [faults["missing_field"]]}
    assert r["skipped"]["sid_test"] == {"skipped": {"rate_mismatch": 1},
                                        "dropped_ids": {"rate_mismatch": [faults["rate_mismatch"]]}}
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["scored"] == 5


def test_superb_asv_trials_naming_skipped_cuts_are_dropped_and_counted():
    from speechssl.superb.cache import Example
    from speechssl.superb.train import SkipLog, Unit, _drop_unscorable_trials

    units = [Unit(None, [], [], {"asv_test": [Example(id=i, num_samples=1) for i in ("a", "b", "c")]})]
    skips = SkipLog()
    skips.add("asv_test", "d", "truncated")
    trials = [(1, "a", "b"), (0, "a", "d"), (0, "d", "c")]
    assert _drop_unscorable_trials(trials, units, skips) == [(1, "a", "b")]
    assert skips.report()["trials_dropped"] == 2
    with pytest.raises(ValueError, match="no ASV trial"):
        _drop_unscorable_trials(trials[1:], units, SkipLog())
