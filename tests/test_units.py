"""Units end to end: features from cuts -> KMeans -> labels on cuts, aligned to encoder frames at 100 and 50 Hz."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_wav

from speechssl.cli.main import main
from speechssl.cluster import KMeans
from speechssl.train.units import fit_kmeans, label_cuts


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def write_wav_cuts(d, lengths) -> Path:
    """One synthetic wav per length (``utt{i}.wav`` in ``d``, seed i) and their cuts in ``d/cuts.jsonl.gz``."""
    from lhotse import CutSet, Recording

    cuts = []
    for i, n in enumerate(lengths):
        p = d / f"utt{i}.wav"
        sf.write(p, make_wav(n, seed=i), 16000)
        cuts.append(Recording.from_file(p, recording_id=f"utt{i}").to_cut())
    path = d / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


@pytest.fixture
def cuts_file(tmp_path):
    return write_wav_cuts(tmp_path, [16000, 12345, 8000, 20160])


def _load(path):
    from lhotse import CutSet

    return list(CutSet.from_file(path))


def test_mfcc_units_100hz_align_to_50hz_frames(tmp_path, cuts_file):
    from speechssl.data.audio import load_cut_audio
    from speechssl.data.dataset import SpeechDataset
    from speechssl.data.features import compute_mfcc

    km = fit_kmeans(cuts_file, tmp_path / "km", feature="mfcc", n_clusters=6, fraction=1.0, progress=False)
    info = json.loads((tmp_path / "km" / "kmeans.json").read_text())
    assert info["meta"]["features"] == {"feature": "mfcc", "layer": None, "frame_shift": 0.01, "dim": 39}
    out = tmp_path / "cuts_mfcc.jsonl.gz"
    assert label_cuts(cuts_file, tmp_path / "km", out, name="mfcc", progress=False) == 4
    cuts = _load(out)
    for cut in cuts:
        wav = load_cut_audio(cut)
        feats, n = compute_mfcc(torch.from_numpy(wav))
        units = np.asarray(cut.load_custom("mfcc"))
        assert units.shape == ((len(wav) + 80) // 160,) == (int(n),)
        np.testing.assert_array_equal(units, km.predict(feats.numpy()))
    # a 50 Hz encoder frame i takes the 100 Hz label 2i (fairseq's rule); padding is -100
    ds = SpeechDataset(units=["mfcc"], downsample_rate=320,
                       num_frames=lambda n: torch.div(n, 320, rounding_mode="floor"))
    from lhotse import CutSet

    batch = ds[CutSet.from_cuts(cuts)]
    for i, cut in enumerate(cuts):
        units = np.asarray(cut.load_custom("mfcc"))
        nf = int(batch["audio_lens"][i]) // 320
        assert batch["units"]["mfcc"][i, :nf].tolist() == units[0 : 2 * nf : 2].tolist()
        assert (batch["units"]["mfcc"][i, nf:] == -100).all()


def test_model_layer_units_50hz(tmp_path, cuts_file):
    from speechssl import export_pretrained, load_pretrained
    from speechssl.data.audio import load_cut_audio
    from speechssl.data.dataset import SpeechDataset
    from speechssl.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", num_layers=2)
    export_pretrained(enc, tmp_path / "model", format="speechssl")
    km = fit_kmeans(cuts_file, tmp_path / "km", feature=str(tmp_path / "model"), layer=1, n_clusters=5,
                    fraction=0.5, seed=1, progress=False)
    assert km.cluster_centers_.shape == (5, 256)
    out = tmp_path / "cuts_l1.jsonl.gz"
    label_cuts(cuts_file, tmp_path / "km", out, name="hubert_l1", progress=False)
    model = load_pretrained(tmp_path / "model")
    cuts = _load(out)
    from lhotse import CutSet

    ds = SpeechDataset(units=["hubert_l1"], num_frames=model.num_frames, downsample_rate=model.downsample_rate)
    batch = ds[CutSet.from_cuts(cuts)]
    for i, cut in enumerate(cuts):
        wav = torch.from_numpy(load_cut_audio(cut))[None]
        with torch.no_grad():
            h = model(wav).hidden_states[1][0]
        units = np.asarray(cut.load_custom("hubert_l1"))
        assert units.shape == (int(model.num_frames(torch.tensor([wav.shape[1]]))),) == (h.shape[0],)
        np.testing.assert_array_equal(units, km.predict(h.numpy()))
        assert cut.custom["hubert_l1"].frame_shift == pytest.approx(0.02)
        nf = units.shape[0]
        assert batch["units"]["hubert_l1"][i, :nf].tolist() == units.tolist()  # 50 Hz on 50 Hz: identity


def test_cli_kmeans_and_label(tmp_path, cuts_file, capsys):
    km_dir, out = tmp_path / "km", tmp_path / "cuts_km.jsonl.gz"
    assert main(["kmeans", "--cuts", str(cuts_file), "--out", str(km_dir), "--feature", "mfcc",
                 "--n-clusters", "8", "--fraction", "0.5", "--seed", "0", "--store", "disk"]) == 0
    assert not (km_dir / "features.f32").exists()  # the temporary feature file is removed
    km = KMeans.load(km_dir)
    assert km.n_clusters == 8 and km.meta["num_cuts"] == 2
    assert main(["label", "--cuts", str(cuts_file), "--kmeans", str(km_dir), "--out", str(out)]) == 0
    cuts = _load(out)
    assert len(cuts) == 4 and all(c.custom["kmeans"].frame_shift == 0.01 for c in cuts)
    assert all(0 <= np.asarray(c.load_custom("kmeans")).max() < 8 for c in cuts)
    # clear errors (into a new directory: the finished one above is refused without --overwrite), which leave
    # no directory behind
    bad = tmp_path / "km_bad"
    assert main(["kmeans", "--cuts", str(cuts_file), "--out", str(bad), "--n-clusters", "100000",
                 "--fraction", "0.5"]) == 2
    assert "raise argument 'fraction' or lower 'n_clusters'" in capsys.readouterr().err
    assert main(["kmeans", "--cuts", str(cuts_file), "--out", str(bad), "--n-clusters", "4",
                 "--layer", "3"]) == 2
    assert "argument 'layer' applies to model features" in capsys.readouterr().err
    assert not bad.exists()
    assert main(["kmeans", "--cuts", str(tmp_path / "nope.jsonl.gz"), "--out", str(bad), "--n-clusters", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["label", "--cuts", str(cuts_file), "--kmeans", str(tmp_path), "--out", str(out)]) == 2
    assert "not a k-means directory" in capsys.readouterr().err


def test_label_finds_the_feature_model_after_the_experiment_dir_moves(tmp_path, cuts_file):
    import shutil

    from speechssl import export_pretrained
    from speechssl.models import build_encoder

    torch.manual_seed(0)
    exp = tmp_path / "exp"
    export_pretrained(build_encoder("tiny_hubert", num_layers=2), exp / "iter1" / "final", format="speechssl")
    fit_kmeans(cuts_file, exp / "km2", feature=str(exp / "iter1" / "final"), layer=1, n_clusters=4,
               fraction=0.5, seed=1, progress=False)
    meta = json.loads((exp / "km2" / "kmeans.json").read_text())["meta"]
    assert meta["feature_relative"] == "../iter1/final"
    label_cuts(cuts_file, exp / "km2", tmp_path / "before.jsonl.gz", name="u", progress=False)
    moved = tmp_path / "moved_exp"
    shutil.move(str(exp), str(moved))  # the absolute path in kmeans.json no longer exists
    label_cuts(cuts_file, moved / "km2", tmp_path / "after.jsonl.gz", name="u", progress=False)
    before = [np.asarray(c.load_custom("u")).tolist() for c in _load(tmp_path / "before.jsonl.gz")]
    after = [np.asarray(c.load_custom("u")).tolist() for c in _load(tmp_path / "after.jsonl.gz")]
    assert before == after and len(before) == 4
    shutil.rmtree(moved / "iter1")
    with pytest.raises(FileNotFoundError, match="neither at"):
        label_cuts(cuts_file, moved / "km2", tmp_path / "gone.jsonl.gz", name="u", progress=False)


def test_library_errors_name_arguments(tmp_path, cuts_file):
    """Errors of the library functions name their arguments, not the command-line flags of `speechssl kmeans`."""
    with pytest.raises(ValueError, match="argument 'cuts': manifest not found") as e:
        fit_kmeans(tmp_path / "nope.jsonl.gz", tmp_path / "km", n_clusters=2, progress=False)
    with pytest.raises(ValueError, match="argument 'layer' applies to model features") as e2:
        fit_kmeans(cuts_file, tmp_path / "km", layer=1, n_clusters=2, progress=False)
    with pytest.raises(ValueError, match="argument 'fraction'") as e3:
        fit_kmeans(cuts_file, tmp_path / "km", fraction=0.0, n_clusters=2, progress=False)
    with pytest.raises(ValueError, match="raise argument 'fraction' or lower 'n_clusters'") as e4:
        fit_kmeans(cuts_file, tmp_path / "km", fraction=0.5, n_clusters=10**6, progress=False)
    assert not any("--" in str(x.value) for x in (e, e2, e3, e4))
