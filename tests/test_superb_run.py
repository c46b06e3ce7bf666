"""`speechssl superb` end to end on tiny manifests: results.json, lr sweep, folds, ASV trials, resume, report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.cli.main import main
from speechssl.superb.report import collect_results, make_report, upstream_label

SR = 16000
BANDS = [(200, 500), (700, 1300), (1800, 2800), (3500, 5500)]


def _wav(k, seed):
    rng = np.random.default_rng(seed)
    n = int(SR * rng.uniform(0.4, 0.6))
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[(f < BANDS[k][0]) | (f > BANDS[k][1])] = 0
    x = np.fft.irfft(spec, n)
    x = 0.3 * x / np.abs(x).max() * (np.arange(n) % 3200 < 2400)  # bursts with gaps
    return (x + 0.01 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 'speakers' (one band each): splits sid_{train,dev,test} (sessions 1-2 alternate), asv_{train,test}."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    root = tmp_path_factory.mktemp("superb_corpus")
    emotions = ["neutral", "happy", "sad", "angry"]
    splits = {"sid_train": 6, "sid_dev": 2, "sid_test": 3}

    def write(split, items):
        recs, sups = [], []
        for rid, k, seed, session in items:
            path = root / "wav" / f"{rid}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _wav(k, seed), SR)
            rec = Recording.from_file(path, recording_id=rid)
            recs.append(rec)
            sups.append(SupervisionSegment(id=rid, recording_id=rid, start=0, duration=rec.duration,
                                           speaker=f"spk{k}", custom={"emotion": emotions[k], "session": session}))
        cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs),
                                     supervisions=SupervisionSet.from_segments(sups))
        cuts.to_file(root / f"cuts_{split}.jsonl.gz")
        return {c.recording_id: c.id for c in cuts}

    seed = 0
    for split, n in splits.items():
        items = []
        for k in range(4):
            for i in range(n):
                seed += 1
                items.append((f"{split}-{k}-{i}", k, seed, 1 + i % 2))
        write(split, items)
    write("asv_train", [(f"asvtr-{k}-{i}", k, 500 + 10 * k + i, 1) for k in range(4) for i in range(6)])
    ids = write("asv_test", [(f"asvte-{k}-{i}", k, 900 + 10 * k + i, 1) for k in range(4) for i in range(3)])
    trials = [f"{int(a // 3 == b // 3)} {ids[f'asvte-{a // 3}-{a % 3}']} {ids[f'asvte-{b // 3}-{b % 3}']}"
              for a in range(12) for b in range(a + 1, 12)]
    (root / "trials.txt").write_text("\n".join(trials) + "\n")
    return root


def _run(args):
    n = torch.get_num_threads()
    try:
        return main(args)
    finally:
        torch.set_num_threads(n)


COMMON = ["--set", "trainer.progress=false", "--set", "trainer.num_threads=1", "--set", "head.proj_dim=32",
          "--set", "trainer.max_steps=40", "--set", "trainer.eval_every=20", "--set", "trainer.log_every=10",
          "--set", "data.max_duration=4"]


def test_sid_with_lr_sweep_and_resume(corpus, tmp_path, capsys):
    cfg = Path(__file__).resolve().parents[1] / "conf" / "superb" / "mini_sid.yaml"
    out = tmp_path / "sid"
    rc = _run(["superb", "--config", str(cfg), "--out", str(out), "--set", f"data.manifest_dir={corpus}",
               "--set", "upstream=fbank", "--set", "sweep.lrs=[0.00001, 0.005]", *COMMON])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    for k in ("task", "upstream", "upstream_params", "split", "metric", "value", "best_lr", "dev", "layer_weights"):
        assert k in r
    assert r["task"] == "sid" and r["metric"] == "acc" and r["upstream_params"] == 0 and r["split"] == "sid_test"
    assert r["best_lr"] == 0.005 and r["lr_sweep"]["0.005"] >= r["lr_sweep"]["1e-05"]
    assert r["value"] >= 0.6  # 4 classes: chance 0.25
    assert r["layer_weights"] == [1.0] and r["cache"]["enabled"] and r["cache"]["passes"] > 1
    assert (out / "config.yaml").exists() and (out / "trials" / "lr-0.005" / "best.safetensors").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("split") == "dev" for x in lines) and any("loss" in x for x in lines)
    assert "sid sid_test acc=" in capsys.readouterr().out
    # resume reuses both finished trials and gives the same result
    rc = _run(["superb", "--config", str(cfg), "--out", str(out), "--set", f"data.manifest_dir={corpus}",
               "--set", "upstream=fbank", "--set", "sweep.lrs=[0.00001, 0.005]", "--resume", *COMMON])
    assert rc == 0 and json.loads((out / "results.json").read_text())["value"] == r["value"]


def test_er_folds(corpus, tmp_path):
    cfg = Path(__file__).resolve().parents[1] / "conf" / "superb" / "mini_er.yaml"
    out = tmp_path / "er"
    rc = _run(["superb", "--config", str(cfg), "--out", str(out), "--set", f"data.manifest_dir={corpus}",
               "--set", "data.folds=[1, 2]", "--set", "data.fold_splits=[sid_train, sid_test]",
               "--set", "data.dev_fraction=0.2", "--set", "optim.lr=0.005", *COMMON,
               "--set", "trainer.max_steps=150", "--set", "trainer.eval_every=50"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert [f["fold"] for f in r["folds"]] == [1, 2]
    assert r["value"] == pytest.approx(np.mean([f["value"] for f in r["folds"]]))
    assert r["value"] > 0.5


def test_asv_trials(corpus, tmp_path):
    cfg = Path(__file__).resolve().parents[1] / "conf" / "superb" / "mini_asv.yaml"
    out = tmp_path / "asv"
    rc = _run(["superb", "--config", str(cfg), "--out", str(out), "--set", f"data.manifest_dir={corpus}",
               "--set", f"data.trials={corpus / 'trials.txt'}", "--set", "data.dev_split=sid_dev",
               "--set", "data.min_duration=0",
               "--set", "head.tdnn_channels=[32, 32, 64]", "--set", "head.tdnn_kernels=[3, 3, 1]",
               "--set", "head.tdnn_dilations=[1, 2, 1]", "--set", "head.embed_dim=32", "--set", "optim.lr=0.005",
               *COMMON])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert r["metric"] == "eer" and 0.0 <= r["value"] < 0.35  # chance 0.5
    assert 0.0 <= r["scores"]["min_dcf"] <= 1.0 + 1e-9 and r["scores"]["num_trials"] == 66


def test_config_errors(corpus, tmp_path, capsys):
    cfg = Path(__file__).resolve().parents[1] / "conf" / "superb" / "mini_sid.yaml"
    assert _run(["superb", "--config", str(cfg), "--out", str(tmp_path / "x"), "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert _run(["superb", "--config", str(cfg), "--out", str(tmp_path / "x"), "--set", "task=foo"]) == 2
    with pytest.raises(FileNotFoundError, match="cuts_nope_train"):
        _run(["superb", "--config", str(cfg), "--out", str(tmp_path / "x"), "--set", f"data.manifest_dir={corpus}",
              "--set", "data.train_split=nope_train"])


def test_report_table_and_plots(tmp_path):
    def write(d, **kw):
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"split": "test", **kw}))

    write(tmp_path / "fbank" / "ks", task="ks", upstream="fbank", upstream_params=0, metric="acc", value=0.5,
          best_lr=1e-3, layer_weights=[1.0])
    write(tmp_path / "hubert" / "ks", task="ks", upstream="exp/hubert_iter2/final", upstream_params=2_500_000,
          metric="acc", value=0.8, best_lr=1e-3, layer_weights=[0.1, 0.2, 0.7])
    write(tmp_path / "hubert" / "asr", task="asr", upstream="exp/hubert_iter2/final", upstream_params=2_500_000,
          metric="wer", value=0.25, best_lr=1e-4, layer_weights=[0.3, 0.3, 0.4])
    assert upstream_label("exp/hubert_iter2/final") == "hubert_iter2"
    assert len(collect_results([tmp_path])) == 3
    rep = make_report([tmp_path / "fbank", tmp_path / "hubert"], tmp_path / "report")
    md = rep.markdown
    assert "| fbank | 0.00 | - | 50.00 |" in md
    assert "| hubert_iter2 | 2.50 | 25.00 | 80.00 |" in md
    assert "ks: 1/1 upstreams beat FBANK (hubert_iter2)" in md
    rows = (tmp_path / "report" / "superb.csv").read_text().splitlines()
    assert rows[0].startswith("upstream,params,asr_wer,ks_acc")
    assert {p.name for p in rep.plots} == {"layer_weights_ks.png", "layer_weights_asr.png"}
    assert all(p.stat().st_size > 1000 for p in rep.plots)
    assert "written:" in str(rep)


@pytest.mark.parametrize("name", ["asr", "pr", "sid", "asv", "er", "ks"])
def test_reference_and_mini_configs_load(name):
    from speechssl.config import load_config
    from speechssl.superb.train import SuperbConfig

    conf = Path(__file__).resolve().parents[1] / "conf" / "superb"
    full = load_config(SuperbConfig, conf / f"{name}.yaml")
    mini = load_config(SuperbConfig, conf / f"mini_{name}.yaml")
    assert full.task == mini.task == name
    assert full.trainer.clip_norm == 1.0 and full.trainer.max_steps >= 30000
    assert mini.trainer.max_steps <= 1000 and mini.cache.enabled  # the demo budget: seconds per head on cached states
    if name == "asv":
        assert (full.head.am_scale, full.head.am_margin, full.asv.p_target) == (30.0, 0.4, 0.01)
    if name == "er":
        assert full.data.folds == [1, 2, 3, 4, 5] and full.data.dev_fraction == 0.2
    if name == "ks":
        assert full.balanced and mini.balanced


# ------------------------------------------------------------------ mixed precision and several processes
def _sid_args(corpus, out, *extra):
    cfg = Path(__file__).resolve().parents[1] / "conf" / "superb" / "mini_sid.yaml"
    return ["superb", "--config", str(cfg), "--out", str(out), "--set", f"data.manifest_dir={corpus}",
            "--set", "upstream=fbank", "--set", "optim.lr=0.005", *COMMON, *extra]


def test_bf16_autocast_on_cpu(corpus, tmp_path, capsys):
    out = tmp_path / "sid_bf16"
    assert _run(_sid_args(corpus, out, "--set", "trainer.precision=bf16", "--set", "trainer.device=cpu")) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == "sid" and r["value"] >= 0.6  # 4 classes: chance 0.25
    assert "precision: bf16" in (out / "config.yaml").read_text()
    # fp16 needs a GPU: a clear config error, not a crash
    capsys.readouterr()
    cpu_fp16 = ("--set", "trainer.precision=fp16", "--set", "trainer.device=cpu")
    assert _run(_sid_args(corpus, tmp_path / "x", *cpu_fp16)) == 2
    assert "config key 'trainer.precision': fp16 needs a GPU" in capsys.readouterr().err
    assert _run(_sid_args(corpus, tmp_path / "x", "--set", "trainer.precision=fp8")) == 2
    assert "config key 'trainer.precision' must be one of ['fp32', 'bf16', 'fp16']" in capsys.readouterr().err
    # the old spelling of the section is refused with the key named
    assert _run(_sid_args(corpus, tmp_path / "x", "--set", "optim.steps=4")) == 2
    assert "unknown config key 'optim.steps'" in capsys.readouterr().err


def test_two_processes_gloo(corpus, tmp_path):
    """torchrun, 2 CPU processes: same results.json shape as one process, dev/test metrics over every utterance
    (gathered across ranks), and only rank 0 writes (one metrics line per step, one set of trial files)."""
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "speechssl.cli.main",
                           *_sid_args(corpus, two, "--set", "trainer.device=cpu", "--set", "sweep.lrs=[0.001, 0.005]")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    assert _run(_sid_args(corpus, one, "--set", "sweep.lrs=[0.001, 0.005]")) == 0
    r2, r1 = (json.loads((d / "results.json").read_text()) for d in (two, one))
    assert r2.keys() == r1.keys() and r2["scores"].keys() == r1["scores"].keys()
    assert r2["lr_sweep"].keys() == r1["lr_sweep"].keys() and r2["split"] == r1["split"] == "sid_test"
    assert r2["scores"]["num_utts"] == r1["scores"]["num_utts"] == 12  # every test utterance, both ranks'
    assert r2["dev"]["num_utts"] == 8 and r2["value"] >= 0.5
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    dev = [(x["lr"], x["step"]) for x in lines if x.get("split") == "dev"]
    assert sorted(dev) == sorted({(lr, s) for lr in (0.001, 0.005) for s in (20, 40)})  # once each, not per rank
    assert sorted(p.name for p in (two / "trials").iterdir()) == ["lr-0.001", "lr-0.005"]
    assert sorted(p.name for p in (two / "trials" / "lr-0.005").iterdir()) == ["best.safetensors", "summary.json"]
    assert proc.stdout.count("sid sid_test acc=") == 1  # rank 0 prints
