"""Bad input: each case gives a BadCutError naming the cut and path, or a counted skip with skip_bad."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, Recording, SupervisionSegment

from speechssl.data.audio import BadCutError, load_cut_audio, validate_cuts
from speechssl.data.dataset import SpeechDataset
from speechssl.data.sampler import ResumableLoader, make_sampler


def _cut(path, cid, text="HELLO", **rec_over):
    rec = Recording.from_file(path, recording_id=cid)
    if rec_over:
        rec = Recording.from_dict({**rec.to_dict(), **rec_over})
    cut = rec.to_cut()
    cut.supervisions = [SupervisionSegment(id=cid, recording_id=cid, start=0, duration=rec.duration, text=text,
                                           speaker="s1")]
    return cut


@pytest.fixture
def bad_cuts(tmp_path, synthetic_wav):
    good = tmp_path / "good.wav"
    sf.write(good, synthetic_wav(16000, 0), 16000)
    out = {"good": _cut(good, "good")}
    # missing file
    missing = tmp_path / "gone.wav"
    sf.write(missing, synthetic_wav(16000, 1), 16000)
    out["missing"] = _cut(missing, "missing")
    missing.unlink()
    # truncated: header claims the full length, half the bytes are gone
    tr = tmp_path / "trunc.wav"
    sf.write(tr, synthetic_wav(16000, 2), 16000)
    out["truncated"] = _cut(tr, "truncated")
    data = tr.read_bytes()
    tr.write_bytes(data[: len(data) // 2])
    # unreadable
    garbage = tmp_path / "garbage.wav"
    sf.write(garbage, synthetic_wav(16000, 3), 16000)
    out["unreadable"] = _cut(garbage, "unreadable")
    garbage.write_bytes(b"RIFF" + b"\x00garbage" * 100)
    # too short (10 ms) and zero length
    short = tmp_path / "short.wav"
    sf.write(short, synthetic_wav(160, 4), 16000)
    out["too_short"] = _cut(short, "too_short")
    out["empty"] = _cut(good, "empty", duration=0.0, num_samples=0)
    # missing transcript
    out["notext"] = _cut(good, "notext", text=None)
    return out


@pytest.mark.parametrize("case,reason", [("missing", "missing_file"), ("truncated", "truncated"),
                                         ("unreadable", "unreadable"), ("too_short", "too_short"),
                                         ("empty", "empty")])
def test_load_errors_name_cut_and_path(bad_cuts, case, reason):
    cut = bad_cuts[case]
    with pytest.raises(BadCutError) as ei:
        load_cut_audio(cut)
    assert ei.value.reason == reason and ei.value.cut_id == case
    assert case in str(ei.value) and str(cut.recording.sources[0].source) in str(ei.value)


def test_multichannel_downmix_and_resample(tmp_path, synthetic_wav):
    st = np.stack([synthetic_wav(16000, 0), synthetic_wav(16000, 1)], axis=1)
    sf.write(tmp_path / "st.wav", st, 16000)
    cut = Recording.from_file(tmp_path / "st.wav").to_cut()  # a MultiCut over both channels
    wav = load_cut_audio(cut)
    assert wav.shape == (16000,) and np.allclose(wav, st.mean(axis=1), atol=1e-4)
    # 8 kHz audio comes back at 16 kHz with the right duration and content (a 440 Hz tone)
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "r8.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    w16 = load_cut_audio(Recording.from_file(tmp_path / "r8.wav").to_cut())
    assert w16.shape == (16000,)
    spec = np.abs(np.fft.rfft(w16))
    assert abs(np.argmax(spec) * 16000 / len(w16) - 440) < 2


def test_validate_cuts_raises_or_counts(bad_cuts):
    cs = CutSet.from_cuts(bad_cuts.values())
    with pytest.raises(BadCutError, match="missing"):
        validate_cuts(cs, require=["text"])
    kept, report = validate_cuts(cs, require=["text"], skip_bad=True, min_duration=0.05)
    assert [c.id for c in kept] == ["good"]
    assert report["total"] == 7 and report["kept"] == 1
    assert report["skipped"] == {"missing_file": 1, "truncated": 1, "unreadable": 1, "too_short": 1, "empty": 1,
                                 "missing_field": 1}
    assert any("notext" in m for m in report["examples"]["missing_field"])


def test_dataset_skip_bad_counted(bad_cuts):
    cs = CutSet.from_cuts([bad_cuts[k] for k in ("good", "missing", "notext", "truncated")])
    ds = SpeechDataset(fields=["text"])
    with pytest.raises(BadCutError):
        ds[cs]
    ds = SpeechDataset(fields=["text"], skip_bad=True)
    b = ds[cs]
    assert b["cut_ids"] == ["good"] and b["audio"].shape == (1, 16000)
    assert sorted(r for _, r in b["skipped"]) == ["missing_field", "missing_file", "truncated"]
    # the loader pops the per-batch list and keeps the totals
    loader = ResumableLoader(make_sampler(cs, max_duration=100.0, shuffle=False),
                             SpeechDataset(fields=["text"], skip_bad=True))
    batches = list(loader)
    assert sum(len(b["cut_ids"]) for b in batches) == 1 and all("skipped" not in b for b in batches)
    assert dict(loader.skipped) == {"missing_file": 1, "missing_field": 1, "truncated": 1}


def test_missing_units_is_bad(bad_cuts):
    ds = SpeechDataset(units=["kmeans"], num_frames=lambda n: n // 320)
    with pytest.raises(BadCutError, match="kmeans"):
        ds[CutSet.from_cuts([bad_cuts["good"]])]


def test_unreadable_units_file_is_bad(tmp_path):
    from speechssl.data.synthetic import write_synthetic_cuts

    cuts = write_synthetic_cuts(tmp_path, 2, 1.0, 1.0, units={"kmeans": 0.02})
    arr = cuts[0].custom["kmeans"].array
    (tmp_path / "units_kmeans" / arr.storage_key).unlink()
    with pytest.raises(BadCutError, match="units 'kmeans'"):
        SpeechDataset(units=["kmeans"], num_frames=lambda n: n // 320)[cuts]
    b = SpeechDataset(units=["kmeans"], num_frames=lambda n: n // 320, skip_bad=True)[cuts]
    assert b["cut_ids"] == [cuts[1].id] and b["skipped"] == [(cuts[0].id, "missing_field")]
