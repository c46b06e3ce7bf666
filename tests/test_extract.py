"""speechssl extract: padded batches equal single utterances, layers named and checked, resume after a kill equals
an uninterrupted run, ranks split the cuts, units lossless, run-length dedup and the unit BPE round-trip."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_units import write_wav_cuts

from speechssl.cli.main import main
from speechssl.extract import (ExtractOptions, HiddenStates, LayerEncoder, UnitSource, expand, extract_corpus,
                               run_length, train_unit_bpe)
from speechssl.extract.run import RankShard
from speechssl.extract.units import MAX_UNITS, UnitBPE, text_to_units, units_to_text
from speechssl.extract.writer import PartWriter, read_lines
from speechssl.models import build_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest
ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [16000, 12345, 8000, 20160, 5000, 9999, 14000, 7001, 11000, 6400]


@pytest.fixture
def cuts_file(tmp_path):
    return write_wav_cuts(tmp_path, LENGTHS)


@pytest.fixture
def model_dir(tmp_path):
    from speechssl import export_pretrained

    torch.manual_seed(0)
    export_pretrained(build_encoder("tiny_hubert", num_layers=2), tmp_path / "model", format="speechssl")
    return tmp_path / "model"


def _cuts(path):
    from lhotse import CutSet

    return {c.id: c for c in CutSet.from_file(path)}


def _alone(model, cut, layer):
    from speechssl.data.audio import load_cut_audio

    wav = torch.from_numpy(load_cut_audio(cut))[None]
    with torch.no_grad():
        return model(wav, torch.tensor([wav.shape[1]])).hidden_states[layer][0].numpy()


@pytest.mark.parametrize("preset", ["tiny_hubert", "tiny_wavlm", "tiny_fbank"])
def test_padded_batch_equals_each_utterance_alone(preset):
    """Group-norm CNNs normalise over time: the extractor's batches still give each utterance its own states."""
    torch.manual_seed(0)
    enc = build_encoder(preset, num_layers=2) if preset != "tiny_fbank" else build_encoder(
        "tiny_hubert", num_layers=2, frontend="fbank", conv_layers=[[64, 3, 2], [64, 3, 2]])
    lens = torch.tensor([16000, 6000, 11111])
    audio = torch.zeros(3, 16000)
    for i, n in enumerate(lens):
        audio[i, :n] = torch.randn(int(n)) * 0.1
    states, frames = LayerEncoder(enc, [0, 2])(audio, lens)
    enc.requires_grad_(False)
    plain = enc(audio, lens).hidden_states[2]  # without the extractor's group-norm handling
    worst_plain = 0.0
    for b in range(3):
        alone = enc(audio[b:b + 1, : lens[b]], lens[b:b + 1])
        assert int(frames[b]) == alone.hidden_states[0].shape[1] == int(enc.num_frames(lens[b]))
        for layer in (0, 2):
            torch.testing.assert_close(states[layer][b, : frames[b]], alone.hidden_states[layer][0],
                                       atol=2e-5, rtol=1e-4)
        worst_plain = max(worst_plain, float((plain[b, : frames[b]] - alone.hidden_states[2][0]).abs().max()))
    if enc.config.frontend == "cnn" and enc.config.extractor_mode == "group_norm":
        assert worst_plain > 1e-2  # the handling is needed: a plain padded forward differs


def test_wrong_layer_is_a_clear_error(model_dir, cuts_file, tmp_path, capsys):
    enc = build_encoder("tiny_hubert", num_layers=2)
    with pytest.raises(ValueError, match=r"layer 3 is out of range: model <encoder> has hidden states 0\.\.2"):
        LayerEncoder(enc, [1, 3])
    with pytest.raises(ValueError, match="names a layer twice"):
        LayerEncoder(enc, [1, 1])
    out = tmp_path / "bad"
    assert main(["extract", "--model", str(model_dir), "--cuts", str(cuts_file), "--out", str(out),
                 "--layer", "7"]) == 2
    err = capsys.readouterr().err
    assert "layer 7 is out of range" in err and "0..2" in err and str(model_dir.resolve()) in err
    assert main(["extract", "--model", str(model_dir), "--cuts", str(cuts_file), "--out", str(out)]) == 2
    assert "name the layer(s) explicitly" in capsys.readouterr().err
    # `speechssl kmeans` (HuBERT iteration 2) checks its layer on the same path
    assert main(["kmeans", "--cuts", str(cuts_file), "--out", str(tmp_path / "km"), "--feature", str(model_dir),
                 "--layer", "9", "--n-clusters", "2"]) == 2
    assert "argument 'layer': layer 9 is out of range" in capsys.readouterr().err


def test_hidden_states_per_cut_with_manifest_and_record(model_dir, cuts_file, tmp_path):
    from speechssl import load_pretrained

    model = load_pretrained(model_dir)
    src = HiddenStates(LayerEncoder(model, [1, 2], name=str(model_dir)), dtype="fp32")
    rec = extract_corpus(cuts_file, tmp_path / "out", src, options=ExtractOptions(max_duration=3.0, num_workers=0),
                         progress=False)
    assert rec["finished"] and rec["cuts"] == len(LENGTHS)
    assert rec["audio_hours"] == pytest.approx(sum(LENGTHS) / 16000 / 3600)
    assert rec["settings"]["source"]["layers"] == [1, 2]
    assert rec["settings"]["fields"]["layer_2"] == {"kind": "hidden", "layer": 2, "frame_shift": 0.02,
                                                    "dedup": False}
    assert json.loads((tmp_path / "out" / "extract.json").read_text()) == rec
    cuts = _cuts(tmp_path / "out" / "cuts.jsonl.gz")
    assert sorted(cuts) == sorted(f"utt{i}" for i in range(len(LENGTHS)))
    for cut in cuts.values():
        for layer in (1, 2):
            h = cut.load_custom(f"layer_{layer}")
            assert h.dtype == np.float32 and cut.custom[f"layer_{layer}"].frame_shift == 0.02
            np.testing.assert_allclose(h, _alone(model, cut, layer), atol=2e-5, rtol=1e-4)
    # fp16 storage halves the bytes and stays within fp16 rounding
    src16 = HiddenStates(LayerEncoder(model, [2]), dtype="fp16")
    extract_corpus(cuts_file, tmp_path / "out16", src16, options=ExtractOptions(max_duration=3.0, num_workers=0),
                   progress=False)
    cut = _cuts(tmp_path / "out16" / "cuts.jsonl.gz")["utt3"]
    h16 = cut.load_custom("layer_2")
    assert h16.dtype == np.float16
    np.testing.assert_allclose(h16.astype(np.float32), _alone(model, cut, 2), atol=1e-2, rtol=1e-2)


def _arrays(out: Path, field: str) -> dict:
    return {cid: np.asarray(c.load_custom(field)) for cid, c in _cuts(out / "cuts.jsonl.gz").items()}


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["after_batch", "before_state"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(model_dir, cuts_file, tmp_path, monkeypatch, where):
    """Killed after 2 batches (or after writing batch 3's lines but before saving its state), the rerun skips the
    finished cuts and the result equals an uninterrupted run exactly."""
    from speechssl import load_pretrained

    model = load_pretrained(model_dir)
    options = ExtractOptions(max_duration=2.0, num_workers=0)

    def source():
        return HiddenStates(LayerEncoder(model, [2], name=str(model_dir)), dtype="fp32")

    extract_corpus(cuts_file, tmp_path / "whole", source(), options=options, progress=False)
    calls = {"n": 0}
    original = PartWriter.write_batch

    def dying(self, cuts, outputs, state):
        calls["n"] += 1
        if where == "after_batch" and calls["n"] == 3:
            raise _Killed("simulated kill")
        if where == "before_state" and calls["n"] == 3:
            for i, cut in enumerate(cuts):  # the lines reach the file, the state does not
                for f, spec in self.fields.items():
                    cut = self._store(cut, f, spec, outputs[f][i])
                self._gz.write(json.dumps(cut.to_dict()) + "\n")
            self._gz.flush()
            raise _Killed("simulated kill")
        return original(self, cuts, outputs, state)

    monkeypatch.setattr(PartWriter, "write_batch", dying)
    with pytest.raises(_Killed):
        extract_corpus(cuts_file, tmp_path / "killed", source(), options=options, progress=False)
    part = tmp_path / "killed" / "parts" / "rank-0-of-1"
    kept = sum(1 for _ in read_lines(part / "cuts.jsonl.gz"))
    done = torch.load(part / "state.pt", weights_only=False)["lines"]
    assert 0 < done < len(LENGTHS) and kept >= done and not (tmp_path / "killed" / "cuts.jsonl.gz").exists()
    monkeypatch.setattr(PartWriter, "write_batch", original)
    seen = []
    monkeypatch.setattr(PartWriter, "write_batch",
                        lambda self, cuts, o, s: (seen.extend(c.id for c in cuts), original(self, cuts, o, s)))
    extract_corpus(cuts_file, tmp_path / "killed", source(), options=options, progress=False)
    assert len(seen) == len(LENGTHS) - done  # finished cuts were not extracted again
    a, b = _arrays(tmp_path / "whole", "layer_2"), _arrays(tmp_path / "killed", "layer_2")
    assert list(a) == list(b)  # same cuts in the same order
    for cid in a:
        assert np.array_equal(a[cid], b[cid]), cid


def test_truncated_manifest_tail_is_ignored(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
        f.flush()
        f.write('{"a": 3}\n' * 2000)  # never flushed past here: the file ends mid-stream
        f.flush()
        data = path.read_bytes()  # before close: no gzip trailer, as after a kill
    path.write_bytes(data[: len(data) - 7])
    lines = list(read_lines(path))
    assert lines[:2] == ['{"a": 1}\n', '{"a": 2}\n'] and all(x.endswith("\n") for x in lines)
    assert list(read_lines(path, 1)) == ['{"a": 1}\n']


def test_other_settings_are_refused_naming_them(model_dir, cuts_file, tmp_path, capsys):
    args = ["extract", "--model", str(model_dir), "--cuts", str(cuts_file), "--out", str(tmp_path / "o"),
            "--max-duration", "3", "--num-workers", "0", "--no-progress"]
    assert main(args + ["--layer", "1"]) == 0
    assert main(args + ["--layer", "1"]) == 0  # complete already: nothing to do
    assert main(args + ["--layer", "2"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "'layers': [1]" in err and "--overwrite" in err
    assert main(args + ["--layer", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "o" / "extract.json").read_text())["settings"]["source"]["layers"] == [2]
    assert all("layer_2" in c.custom and "layer_1" not in c.custom for c in _cuts(tmp_path / "o" / "cuts.jsonl.gz").values())


def test_rank_shards_partition_the_cuts():
    ids = [f"cut-{i}" for i in range(500)]

    class C:
        def __init__(self, i):
            self.id = i

    for world in (1, 2, 3):
        owners = [[r for r in range(world) if RankShard(r, world)(C(i))] for i in ids]
        assert all(len(o) == 1 for o in owners)
        counts = np.bincount([o[0] for o in owners], minlength=world)
        assert counts.min() > 500 / world * 0.8  # balanced


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_one_manifest_equal_to_one_process(model_dir, cuts_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    common = ["extract", "--model", str(model_dir), "--cuts", str(cuts_file), "--layer", "2", "--dtype", "fp32",
              "--max-duration", "3", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), "-m", "speechssl.cli.main", *common,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    rec = json.loads((tmp_path / "two" / "extract.json").read_text())
    assert rec["settings"]["world"] == 2 and rec["cuts"] == len(LENGTHS)
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").iterdir())
    assert parts == ["rank-0-of-2", "rank-1-of-2"]
    per_rank = [sum(1 for _ in read_lines(tmp_path / "two" / "parts" / p / "cuts.jsonl.gz")) for p in parts]
    assert min(per_rank) > 0 and sum(per_rank) == len(LENGTHS)
    a, b = _arrays(tmp_path / "two", "layer_2"), _arrays(tmp_path / "one", "layer_2")
    assert sorted(a) == sorted(b)
    for cid in a:  # other batch companions: equal up to float rounding
        np.testing.assert_allclose(a[cid], b[cid], atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ units
def test_units_are_lossless_integers_and_dedup_keeps_durations(cuts_file, tmp_path):
    import zlib

    def expected(cut_id, num_samples):  # frame codes with runs, ids past 16 bits
        rng = np.random.default_rng(zlib.crc32(cut_id.encode()))
        codes = np.repeat(rng.integers(0, 100_000, size=max(1, num_samples // 1600)), rng.integers(1, 4))
        codes[0] = 99_999
        return codes

    def codes(batch):  # a pluggable unit source: any batch -> int codes function (a quantizer's codes ...)
        return [expected(c, n) for c, n in zip(batch["cut_ids"], batch["audio_lens"].tolist())]

    src = UnitSource(codes, "units_vq", frame_shift=0.02, info={"model": "toy"})
    rec = extract_corpus(cuts_file, tmp_path / "u", src, options=ExtractOptions(max_duration=3.0, num_workers=0,
                                                                               dedup=True), progress=False)
    assert rec["settings"]["fields"]["units_vq"]["dedup"] is True
    assert rec["settings"]["source"] == {"kind": "units", "field": "units_vq", "layer": None, "model": "toy"}
    for cut in _cuts(tmp_path / "u" / "cuts.jsonl.gz").values():
        ids, dur = np.asarray(cut.load_custom("units_vq")), np.asarray(cut.load_custom("units_vq_durations"))
        assert np.issubdtype(ids.dtype, np.integer) and ids[0] == 99_999
        want = expected(cut.id, round(cut.duration * 16000))
        assert expand(ids, dur).tolist() == want.tolist()
        assert (ids[1:] != ids[:-1]).all() and (dur >= 1).all()
    ids = np.array([4, 4, 4, 1, 1, 9, 4, 4, 0])
    u, d = run_length(ids)
    assert u.tolist() == [4, 1, 9, 4, 0] and d.tolist() == [3, 2, 1, 2, 1]
    assert expand(u, d).tolist() == ids.tolist()
    assert [x.tolist() for x in run_length([])] == [[], []]
    with pytest.raises(ValueError, match="1-D integers"):
        UnitSource(lambda b: [np.zeros(3)] * len(b["cut_ids"]), "x", 0.02)({"cut_ids": ["a"], "audio_lens": None})


def test_unit_bpe_round_trip_non_monotonic(tmp_path):
    rng = np.random.default_rng(0)
    train = [run_length(np.repeat(rng.integers(0, 30, 80), rng.integers(1, 4, 80)))[0] for _ in range(300)]
    train.append(np.array([7000, 6399, 6400, 7000]))  # ids on both sides of the BMP/plane-15 boundary
    bpe = train_unit_bpe(train, tmp_path / "u.model", vocab_size=120)
    assert isinstance(bpe, UnitBPE) and bpe.vocab_size == 120
    seq = np.array([5, 3, 9, 3, 5, 0, 29, 1, 1, 7, 3, 6400, 7000, 6399, 3, 2, 1, 0])  # not sorted, repeats
    pieces = bpe.encode(seq)
    assert bpe.decode(pieces).tolist() == seq.tolist()
    assert bpe.piece_lengths(pieces).sum() == len(seq)
    long = train[0]
    assert len(bpe.encode(long)) < len(long)  # merges happen
    with pytest.raises(ValueError, match="not in the BPE's training data"):
        bpe.encode([55])
    assert text_to_units(units_to_text([0, 6399, 6400, MAX_UNITS - 1])).tolist() == [0, 6399, 6400, MAX_UNITS - 1]
    with pytest.raises(ValueError, match="cannot be written"):
        units_to_text([MAX_UNITS])
    with pytest.raises(ValueError, match="at least"):
        train_unit_bpe(train, tmp_path / "small.model", vocab_size=10)


def test_cli_kmeans_units_dedup_bpe_and_shar(model_dir, cuts_file, tmp_path, capsys):
    from lhotse import CutSet

    from speechssl.cluster import KMeans

    km = tmp_path / "km"
    assert main(["kmeans", "--cuts", str(cuts_file), "--out", str(km), "--feature", str(model_dir), "--layer", "1",
                 "--n-clusters", "6", "--fraction", "1.0"]) == 0
    out = tmp_path / "units"
    args = ["extract", "--kmeans", str(km), "--cuts", str(cuts_file), "--out", str(out), "--max-duration", "3",
            "--num-workers", "0", "--no-progress"]
    assert main(args + ["--layer", "2"]) == 2
    assert "fitted on layer 1" in capsys.readouterr().err
    assert main(args + ["--dedup", "--bpe", str(tmp_path / "bpe.model"), "--bpe-vocab", "20", "--shar"]) == 0
    rec = json.loads((out / "extract.json").read_text())
    assert rec["settings"]["source"]["layer"] == 1 and rec["settings"]["source"]["n_clusters"] == 6
    assert rec["bpe"]["field"] == "units_layer_1_bpe" and rec["shar"] == "shar"
    centres = KMeans.load(km)
    from speechssl import load_pretrained

    model = load_pretrained(model_dir)
    bpe = UnitBPE(tmp_path / "bpe.model")
    cuts = _cuts(out / "cuts.jsonl.gz")
    for cut in cuts.values():
        frames = centres.predict(_alone(model, cut, 1))
        ids, dur = cut.load_custom("units_layer_1"), cut.load_custom("units_layer_1_durations")
        assert expand(ids, dur).tolist() == frames.tolist()
        pieces = cut.load_custom("units_layer_1_bpe")
        assert bpe.decode(pieces).tolist() == ids.tolist()
        assert cut.load_custom("units_layer_1_bpe_durations").sum() == dur.sum()
    shar = list(CutSet.from_shar(in_dir=out / "shar"))
    assert sorted(c.id for c in shar) == sorted(cuts)
    for c in shar:
        assert c.load_custom("units_layer_1_bpe").tolist() == cuts[c.id].load_custom("units_layer_1_bpe").tolist()
    # HuBERT iteration 2 labels from `label` are the frame units `extract` computes
    assert main(["label", "--cuts", str(cuts_file), "--kmeans", str(km), "--out", str(tmp_path / "lab.jsonl.gz"),
                 "--name", "u"]) == 0
    for cut in CutSet.from_file(tmp_path / "lab.jsonl.gz"):
        assert np.asarray(cut.load_custom("u")).tolist() == expand(
            cuts[cut.id].load_custom("units_layer_1"), cuts[cut.id].load_custom("units_layer_1_durations")).tolist()
