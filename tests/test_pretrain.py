"""``speechssl pretrain`` end to end on a few synthetic cuts with a 2-layer encoder: every objective trains,
EXP/final loads with load_pretrained, the config is saved and validated, and resume is exact on real data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_wav

from speechssl.config import ConfigError, load_config
from speechssl.train.pretrain import PretrainConfig, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "ffn_dim": 128, "conv_pos": 16, "conv_pos_groups": 4}
CNN_SMALL = {**SMALL, "conv_layers": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """12 cuts of 1-2 s with 100 Hz 'mfcc' units (id = frame index // 10 % 7) and 50 Hz 'l6' units."""
    from lhotse import CutSet, NumpyFilesWriter, Recording

    from speechssl.data.labels import store_units

    d = tmp_path_factory.mktemp("mini")
    cuts = []
    with NumpyFilesWriter(str(d / "units")) as w:
        for i in range(12):
            n = 16000 + 1600 * i
            path = d / f"utt{i}.wav"
            sf.write(path, make_wav(n, seed=i), 16000)
            cut = Recording.from_file(path, recording_id=f"utt{i}").to_cut()
            cut = store_units(cut, (np.arange(n // 160) // 10 % 7).astype(np.int64), w, "mfcc", 0.01)
            cut = store_units(cut, (np.arange(n // 320) // 3 % 5).astype(np.int64), w, "l6", 0.02)
            cuts.append(cut)
    path = d / "cuts_pretrain.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def _cfg(manifest, objective: str, steps: int = 3, **extra) -> PretrainConfig:
    preset = {"hubert": "tiny_hubert", "wavlm": "tiny_wavlm", "wav2vec2": "tiny_wav2vec2",
              "bestrq": "tiny_bestrq"}[objective]
    kwargs = {"hubert": {"num_classes": {"mfcc": 7, "l6": 5}, "final_dim": 32},
              "wavlm": {"num_classes": {"l6": 5}, "final_dim": 32},
              "wav2vec2": {"final_dim": 32, "num_negatives": 10, "latent_vars": 16},
              "bestrq": {"codebook_size": 64, "mask_prob": 0.05, "mask_length": 4}}[objective]
    units = {"hubert": ["mfcc", "l6"], "wavlm": ["l6"]}.get(objective, [])
    data = {"train": [str(manifest)], "max_duration": 6.0, "units": units, "num_buckets": 2}
    data.update(extra.pop("data", {}))
    d = {
        "data": data,
        "model": {"preset": preset, "overrides": SMALL if objective == "bestrq" else CNN_SMALL},
        "objective": {"name": objective, "kwargs": kwargs},
        "optim": {"lr": 1e-3},
        "schedule": {"name": "linear", "warmup_steps": 1},
        "trainer": {"max_steps": steps, "log_every": 1, "ckpt_every": 100, "num_workers": 0, "progress": False,
                    **extra.pop("trainer", {})},
    }
    from speechssl.config import from_dict

    return from_dict(PretrainConfig, d)


@pytest.mark.parametrize("objective", ["hubert", "wav2vec2", "wavlm", "bestrq"])
def test_every_objective_trains_and_exports(manifest, tmp_path, objective):
    from speechssl import load_pretrained

    out = tmp_path / objective
    logs = run_pretrain(_cfg(manifest, objective), out)
    assert logs["step"] == 3 and np.isfinite(logs["loss"])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    acc_key = {"hubert": "acc_masked", "wavlm": "acc_masked", "wav2vec2": "acc", "bestrq": "acc_masked"}[objective]
    assert any(k.startswith(acc_key) for k in recs[-1]), sorted(recs[-1])
    assert recs[-1]["audio_sec_per_sec"] > 0
    enc = load_pretrained(out / "final")
    assert enc.num_layers == 2 and not enc.training
    wav = torch.from_numpy(make_wav(16000))[None]
    with torch.no_grad():
        o = enc(wav)
    assert len(o.hidden_states) == 3
    saved = load_config(PretrainConfig, out / "config.yaml")
    assert saved.objective.name == objective and saved.trainer.max_steps == 3


def test_resume_exact_with_workers(manifest, tmp_path):
    """Run 4 steps (checkpoints at 2 and 4), roll back to step 2 as a crash would, resume: same losses."""
    import shutil

    out = tmp_path / "res"
    cfg = _cfg(manifest, "hubert", steps=4, data={"max_duration": 3.0},
               trainer={"num_workers": 2, "ckpt_every": 2})
    run_pretrain(cfg, out)
    ref = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints" / "step-4")
    shutil.rmtree(out / "final")
    run_pretrain(cfg, out, resume=True)
    got = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(ref) == 4 and ref == got
    assert (out / "final" / "model.safetensors").is_file()


def test_config_errors_name_the_key(manifest, tmp_path):
    with pytest.raises(ConfigError, match="data.units"):
        _cfg(manifest, "hubert", data={"units": []})
    with pytest.raises(ConfigError, match="did you mean 'max_duration'"):
        load_config(PretrainConfig, None, [f"data.train=[{manifest}]", "data.max_duratio=3"])
    cfg = _cfg(manifest, "hubert")
    cfg.objective.kwargs["nm_classes"] = 3
    with pytest.raises(ConfigError, match="objective.kwargs"):
        run_pretrain(cfg, tmp_path / "x")
    cfg = _cfg(manifest, "wav2vec2", data={"train": [str(tmp_path / "missing.jsonl.gz")]})
    with pytest.raises(ConfigError, match="manifest not found"):
        run_pretrain(cfg, tmp_path / "y")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "pretrain").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(PretrainConfig, ROOT / "conf" / "pretrain" / f"{name}.yaml")
    assert cfg.trainer.max_steps > 0
    from speechssl.models import get_preset

    get_preset(cfg.model.preset if not cfg.model.preset.endswith(".yaml") else ROOT / cfg.model.preset)


def test_trains_from_shar(manifest, tmp_path):
    from speechssl.data.shar import export_shar

    export_shar(str(manifest), tmp_path / "shar", shard_size=4, fields={"recording": "flac", "l6": "numpy"})
    cfg = _cfg(manifest, "wavlm", steps=2, data={"shar_dir": str(tmp_path / "shar"), "train": []})
    logs = run_pretrain(cfg, tmp_path / "exp")
    assert logs["step"] == 2 and np.isfinite(logs["loss"])
    assert (tmp_path / "exp" / "final" / "model.safetensors").is_file()


def test_cli_pretrain_and_resume(manifest, tmp_path, capsys):
    from speechssl.cli.main import main

    out = tmp_path / "w2v"
    args = ["pretrain", "--config", str(ROOT / "conf/pretrain/mini_wav2vec2.yaml"), "--out", str(out),
            "--set", f"data.train=[{manifest}]", "--set", "trainer.max_steps=2", "--set", "trainer.num_workers=0",
            "--set", "model.overrides={num_layers: 1}", "--set", "optim.lr=1e-3", "--set", "trainer.progress=false"]
    assert main(args) == 0
    assert "step=2" in capsys.readouterr().out
    assert main(args + ["--set", "trainer.max_steps=3", "--resume"]) == 2  # a longer lr curve: refused, unless
    assert main(args + ["--set", "trainer.max_steps=3", "--resume", "--allow-schedule-change"]) == 0  # from step 2
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]  # logged at the last step of each run (log_every 5)
    assert main(args + ["--set", "trainer.max_stepz=3", "--resume"]) == 2  # config error: exit code 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
