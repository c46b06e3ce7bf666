"""ML-SUPERB at mini scale: the synthetic multilingual corpus, the lid and mlasr tasks, the real-layout preparer."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from speechssl.config import load_config  # noqa: E402
from speechssl.data.corpora.mini_multilingual import (  # noqa: E402
    LANGUAGES, normalize_text, plan_multilingual, prepare_mini_multilingual,
)
from speechssl.superb.cache import Example  # noqa: E402
from speechssl.superb.tasks import HeadConfig, build_task, language_of  # noqa: E402
from speechssl.superb.train import SuperbConfig, run_superb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cuts(d: Path, split: str) -> list[dict]:
    with gzip.open(d / f"cuts_{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mini_multilingual")
    prepare_mini_multilingual(d, minutes=2.0, seed=0, num_jobs=2)
    return d


def test_corpus_has_native_text_in_every_language_and_the_two_training_settings(corpus):
    assert len(LANGUAGES) >= 10
    splits = {s: _cuts(corpus, s) for s in ("ml_train_10min", "ml_train_1h", "ml_dev", "ml_test")}
    for split, cuts in splits.items():
        assert {c["supervisions"][0]["custom"]["language"] for c in cuts} == set(LANGUAGES), split
    ids = {s: {c["id"] for c in cuts} for s, cuts in splits.items()}
    assert ids["ml_train_10min"] < ids["ml_train_1h"]              # the 10-minute set is part of the 1-hour one
    assert len(ids["ml_train_1h"]) == 6 * len(LANGUAGES) and len(ids["ml_train_10min"]) == 2 * len(LANGUAGES)
    assert not (ids["ml_train_1h"] & (ids["ml_dev"] | ids["ml_test"]))
    speakers = lambda cuts: {c["supervisions"][0]["speaker"] for c in cuts}  # noqa: E731
    assert not speakers(splits["ml_train_1h"]) & speakers(splits["ml_test"])  # unseen voices at test time
    text = {c["supervisions"][0]["custom"]["language"]: c["supervisions"][0]["text"] for c in splits["ml_train_1h"]}
    assert any(ch in "абвгдеёжзийклмнопрстуфхцчшщъыьэюя" for ch in text["rus"]), text["rus"]
    assert any("\u03b1" <= ch <= "\u03c9" or ch in "άέήίόύώ" for ch in text["ell"]), text["ell"]
    for c in splits["ml_dev"]:
        sup = c["supervisions"][0]
        assert sup["text"] == normalize_text(sup["text"]) and sup["custom"]["phones"]
        assert 0.3 < c["duration"] < 8.0


def test_plan_depends_on_the_seed_only():
    a, b, c = plan_multilingual(2.0, 0), plan_multilingual(2.0, 0), plan_multilingual(2.0, 1)
    assert [s.text for s in a[0]] == [s.text for s in b[0]] and a[1] == b[1]
    assert [s.text for s in a[0]] != [s.text for s in c[0]]


def test_normalize_text():
    assert normalize_text("Die GRÖSSE, bitte!  Straße?") == "die grösse bitte straße"
    assert normalize_text("L'école d'été 2024 -- 'fin'") == "l'école d'été fin"
    assert normalize_text("Το ΠΑΙΔΊ.") == "το παιδί"


def test_cer_per_language_by_hand():
    task = build_task("mlasr", HeadConfig())
    # deu: "ab c" -> "ab" is 2 deletions (" ", "c") of 4 characters, "xy" -> "xy" none of 2: 2/6
    # rus: "абв" -> "абг" is 1 substitution of 3: 1/3
    records = [("deu", "ab c", "ab"), ("deu", "xy", "xy"), ("rus", "абв", "абг")]
    s = task.score(records)
    assert s["cer_per_language"] == pytest.approx({"deu": 2 / 6, "rus": 1 / 3})
    assert s["cer"] == pytest.approx((2 / 6 + 1 / 3) / 2)          # every language weighs the same
    assert s["cer_all"] == pytest.approx(3 / 9)                    # all characters pooled
    assert s["num_languages"] == 2 and task.metric == "cer" and not task.higher_better


def test_mlasr_needs_the_language_field():
    with pytest.raises(ValueError, match="'language'"):
        language_of(Example(id="u1", num_samples=1600, label="ab", audio=np.zeros(1600, np.float32)))


def _run(task: str, corpus: Path, out: Path, *extra: str) -> dict:
    cfg = load_config(SuperbConfig, ROOT / f"conf/superb/mini_{task}.yaml",
                      [f"data.manifest_dir={corpus}", "trainer.progress=false", *extra])
    r = run_superb(cfg, out)
    return r[0] if isinstance(r, list) else r


def test_lid_beats_chance(corpus, tmp_path):
    r = _run("lid", corpus, tmp_path / "lid")
    assert r["split"] == "ml_test" and r["scored"] == 2 * len(LANGUAGES)
    assert r["value"] >= 3 / len(LANGUAGES), r                    # chance: 1/12


def test_mlasr_beats_an_empty_output(corpus, tmp_path):
    r = _run("mlasr", corpus, tmp_path / "mlasr")
    assert set(r["scores"]["cer_per_language"]) == set(LANGUAGES)
    assert r["value"] == pytest.approx(np.mean(list(r["scores"]["cer_per_language"].values())))
    assert r["value"] < 0.9, r                                     # an empty output scores 1.0


# ------------------------------------------------------------------------------------ the real ML-SUPERB layout


def _fake_release(root: Path) -> None:
    import soundfile as sf

    rng = np.random.default_rng(0)
    layout = {("fleurs", "deu"): "Hallo, Welt! [noise]", ("mls", "pol"): "Dzień dobry."}
    for (source, lang), text in layout.items():
        folder = root / source / lang
        (folder / "wav").mkdir(parents=True)
        names = {"10min_train": 2, "1h_train": 3, "10min_dev": 1, "10min_test": 1}
        for name, n in names.items():
            lines = []
            for k in range(n):
                utt = f"{source}_{lang}_{name}_{k:03d}"
                seconds = 25.0 if (name == "1h_train" and k == 2) else 1.0   # one over the 20 s limit
                sf.write(folder / "wav" / f"{utt}.wav", 0.01 * rng.standard_normal(int(seconds * 16000)), 16000)
                lines.append(f"{utt} {lang} {text}\n")
            (folder / f"transcript_{name}.txt").write_text("".join(lines), encoding="utf-8")


def test_mlsuperb_preparer_reads_the_release_layout(tmp_path):
    from speechssl.cli.main import main

    _fake_release(tmp_path / "ml_superb")
    assert main(["prepare", "mlsuperb", str(tmp_path / "ml_superb"), str(tmp_path / "out")]) == 0
    splits = {s: _cuts(tmp_path / "out", s) for s in ("ml_train_10min", "ml_train_1h", "ml_dev", "ml_test")}
    assert {s: len(c) for s, c in splits.items()} == {"ml_train_10min": 4, "ml_train_1h": 4, "ml_dev": 2,
                                                       "ml_test": 2}  # 1h: 2 x 3, less the two 25 s cuts
    sups = {c["id"]: c["supervisions"][0] for c in splits["ml_dev"]}
    deu, pol = sups["fleurs_deu_10min_dev_000"], sups["mls_pol_10min_dev_000"]
    assert deu["text"] == "HALLO WELT" and deu["custom"] == {"language": "deu", "source": "fleurs"}
    assert pol["text"] == "DZIEŃ DOBRY" and pol["language"] == "pol"
    assert splits["ml_dev"][0]["duration"] == pytest.approx(1.0)


def test_mlsuperb_preparer_names_a_wrong_directory(tmp_path):
    from speechssl.data.corpora.prepare import prepare_corpus

    (tmp_path / "empty" / "fleurs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="transcript_10min_dev.txt"):
        prepare_corpus("mlsuperb", tmp_path / "empty", tmp_path / "out")
