"""What is never lost (issue 13): each test injects a fault and asserts the outcome (refused, reported or counted)
and that the earlier state is intact. docs/reliability.md lists the guarantees and these tests."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from _train_toys import ToyLoader, ToyModel

from speechssl.cli.main import main
from speechssl.config import ExperimentError
from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig
from speechssl.train import checkpoint as ckpt_lib
from speechssl.train.optim import lr_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest
ROOT = Path(__file__).resolve().parents[1]
CONF = {"pretrain": ROOT / "conf/pretrain/mini_hubert_iter1.yaml",
        "distill": ROOT / "conf/distill/mini_distilhubert.yaml",
        "prune": ROOT / "conf/prune/mini_dphubert.yaml", "superb": ROOT / "conf/superb/mini_sid.yaml"}


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes: equal snapshots = nothing changed."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cli(args, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``speechssl ARGS``."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    """The command's error: exactly one line starting with 'speechssl' (no traceback)."""
    lines = [x for x in err.splitlines() if x.startswith("speechssl ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny speechssl model directories (different weights) and a copy of the first with its weights cut."""
    import torch

    from speechssl.models import build_encoder
    from speechssl.models.io import export_pretrained

    d = tmp_path_factory.mktemp("models")
    conv = [[16, 10, 5], [16, 3, 2], [16, 3, 2], [16, 3, 2], [16, 3, 2], [16, 2, 2], [16, 2, 2]]
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        enc = build_encoder(dict(model_type="hubert", num_layers=2, hidden_size=32, num_heads=2, ffn_dim=64,
                                 conv_layers=conv, conv_pos=8, conv_pos_groups=4))
        export_pretrained(enc, d / name, format="speechssl")
        out[name] = d / name
    cut = d / "truncated"
    cut.mkdir()
    for f in (d / "a").iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    out["truncated"] = cut
    return out


# ------------------------------------------------------------------- 1. an earlier run is never overwritten
EARLIER = {  # what each command leaves in its output directory
    "trainer": {"config.yaml": b"a: 1\n", "metrics.jsonl": b'{"step": 4}\n', "checkpoints/step-4/trainer_state.json":
                b'{"step": 4}', "final/model.safetensors": b"weights"},
    "superb": {"config.yaml": b"a: 1\n", "results.json": b"{}", "trials/lr-0.001/summary.json": b"{}"},
    "kmeans": {"kmeans.json": b"{}", "kmeans.safetensors": b"centres"},
    "export": {"config.json": b"{}", "model.safetensors": b"weights"},
}
COMMANDS = {
    "pretrain": ("trainer", lambda out: ["pretrain", "--config", CONF["pretrain"], "--out", out]),
    "distill": ("trainer", lambda out: ["distill", "--config", CONF["distill"], "--out", out]),
    "prune": ("trainer", lambda out: ["prune", "--config", CONF["prune"], "--out", out]),
    "superb": ("superb", lambda out: ["superb", "--config", CONF["superb"], "--out", out]),
    "kmeans": ("kmeans", lambda out: ["kmeans", "--cuts", "cuts.jsonl.gz", "--out", out, "--n-clusters", "4"]),
    "export": ("export", lambda out: ["export", "model_dir", out]),
}


def _earlier_run(out: Path, kind: str) -> dict[str, bytes]:
    for name, data in EARLIER[kind].items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return snapshot(out)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_earlier_run_is_refused_by_every_command(command, tmp_path, capsys):
    kind, argv = COMMANDS[command]
    out = tmp_path / "exp"
    before = _earlier_run(out, kind)
    rc, err = cli(argv(out), capsys)
    line = one_line(err)
    assert rc == 2 and str(out) in line and "--overwrite" in line
    assert ("--resume" in line) == (command not in ("kmeans", "export"))
    assert snapshot(out) == before


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    out = tmp_path / "exp"
    before = _earlier_run(out, "trainer")
    rc, err = cli(COMMANDS["pretrain"][1](out) + ["--resume", "--overwrite"], capsys)
    assert rc == 2 and "exclude each other" in one_line(err)
    assert snapshot(out) == before


def test_empty_or_foreign_directory_is_accepted_and_overwrite_keeps_foreign_files(models, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()  # an empty existing directory is accepted
    assert cli(["export", models["a"], out], capsys)[0] == 0
    rc, err = cli(["export", models["b"], out], capsys)  # now it holds a model: refused, unchanged
    before = snapshot(out)
    assert rc == 2 and "already holds a run" in one_line(err) and snapshot(out) == before
    other = tmp_path / "other"
    (other / "profile").mkdir(parents=True)  # what another command nested there is not a run
    (other / "profile" / "summary.json").write_text("{}")
    assert cli(["export", models["a"], other], capsys)[0] == 0
    assert cli(["export", models["b"], other, "--overwrite"], capsys)[0] == 0
    from safetensors.torch import load_file

    got, want = load_file(other / "model.safetensors"), load_file(models["b"] / "model.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)  # b's weights replaced a's
    assert (other / "profile" / "summary.json").read_text() == "{}"


def _toy(out, steps=6, *, model=None, run_config=None, schedule=None, lr=1e-2, **kw):
    cfg = TrainerConfig(**{"max_steps": steps, "log_every": 1, "ckpt_every": 3, "keep_last": 5, "progress": False,
                           **kw})
    return Trainer(cfg, model or ToyModel(), out, optim=OptimConfig(lr=lr, weight_decay=0.0),
                   schedule=schedule or ScheduleConfig(name="linear", warmup_steps=2),
                   make_train_loader=lambda: ToyLoader(n=48), run_config=run_config)


def test_fresh_run_never_starts_over_earlier_checkpoints(tmp_path):
    """The library refuses too: the old step-N would count as newest and keep_last would delete the new ones."""
    out = tmp_path / "exp"
    _toy(out, 3).fit()
    before = snapshot(out)
    with pytest.raises(ExperimentError, match="earlier run"):
        _toy(out, 3).fit()
    assert snapshot(out) == before


# --------------------------------------------------------------------- 2. everything is checked before writing
@dataclass
class RunConfig:
    hidden: int = 16


def test_failed_resume_leaves_config_and_checkpoints_intact(tmp_path):
    out = tmp_path / "exp"
    _toy(out, 3, model=ToyModel(hidden=16), run_config=RunConfig(16)).fit()
    before = snapshot(out)
    with pytest.raises(ExperimentError, match="does not match the model built from this config"):
        _toy(out, 3, model=ToyModel(hidden=32), run_config=RunConfig(32)).fit(resume=True)
    assert snapshot(out) == before and "hidden: 16" in (out / "config.yaml").read_text()


def test_failed_check_leaves_no_new_directory(tmp_path, capsys):
    """A ConfigError raised inside the run (here: the training manifest is missing) removes the --out it created."""
    out = tmp_path / "new" / "exp"
    rc, err = cli(["pretrain", "--config", ROOT / "conf/pretrain/mini_wav2vec2.yaml", "--out", out,
                   "--set", f"data.train=[{tmp_path / 'missing.jsonl.gz'}]", "--set", "model.overrides={num_layers: 1}",
                   "--set", "trainer.progress=false", "--set", "trainer.num_workers=0"], capsys)
    assert rc == 2 and "manifest not found" in one_line(err)
    assert not out.exists()


# ------------------------------------------------------------- 3. a resume does not silently change the lr curve
def test_schedule_change_on_resume_is_refused_unless_allowed(tmp_path):
    out = tmp_path / "exp"
    _toy(out, 4, ckpt_every=2).fit()
    before = snapshot(out)
    with pytest.raises(ExperimentError, match=r"trainer.max_steps 4 -> 8.*--allow-schedule-change"):
        _toy(out, 8, ckpt_every=2).fit(resume=True)
    with pytest.raises(ExperimentError, match=r"optim.lr 0.01 -> 0.02"):
        _toy(out, 4, ckpt_every=2, lr=2e-2).fit(resume=True)
    with pytest.raises(ExperimentError, match=r"schedule.warmup_steps 2 -> 3"):
        _toy(out, 4, ckpt_every=2, schedule=ScheduleConfig(name="linear", warmup_steps=3)).fit(resume=True)
    assert snapshot(out) == before
    assert _toy(out, 8, ckpt_every=2, allow_schedule_change=True).fit(resume=True)["step"] == 8
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    sched = ScheduleConfig(name="linear", warmup_steps=2)
    for step in range(5, 9):  # the new curve from the resumed step on
        assert lrs[step] == pytest.approx(1e-2 * lr_factor(sched, step, 8))


def test_allow_schedule_change_flag_reaches_the_trainer(tmp_path):
    from speechssl.cli.common import experiment_config
    from speechssl.cli.main import build_parser
    from speechssl.train.pretrain import PretrainConfig

    args = build_parser().parse_args(["pretrain", "--config", str(CONF["pretrain"]), "--out", str(tmp_path / "x"),
                                      "--resume", "--allow-schedule-change"])
    assert experiment_config(PretrainConfig, args).trainer.allow_schedule_change
    args = build_parser().parse_args(["pretrain", "--config", str(CONF["pretrain"]), "--out", str(tmp_path / "x")])
    assert not experiment_config(PretrainConfig, args).trainer.allow_schedule_change


# ---------------------------------------------------------------- 4. a checkpoint is complete or not a checkpoint
def _cut_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


FAULTS = {
    "no optimizer.pt": (lambda ck: (ck / "optimizer.pt").unlink(), "optimizer.pt missing"),
    "half model.safetensors": (lambda ck: _cut_half(ck / "model.safetensors"), "model.safetensors is"),
    "no loader-0.pt": (lambda ck: (ck / "loader-0.pt").unlink(), "loader-0.pt missing"),
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 toy steps, checkpoints at 3 and 6 (a manifest in each), and the metrics of that uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "exp"
    _toy(out).fit()
    return out


def test_manifest_lists_every_file_with_its_size(straight):
    ck = straight / "checkpoints" / "step-6"
    files = json.loads((ck / "manifest.json").read_text())["files"]
    assert files == {p.name: p.stat().st_size for p in ck.iterdir() if p.name != "manifest.json"}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "loader-0.pt", "rng-0.pt",
            "trainer_state.json"} <= set(files)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_incomplete_checkpoint_is_reported_and_previous_one_used(fault, straight, tmp_path, caplog):
    import shutil

    out = tmp_path / "exp"
    shutil.copytree(straight, out)
    inject, reason = FAULTS[fault]
    inject(out / "checkpoints" / "step-6")
    caplog.set_level("INFO")
    assert [s for s, _ in ckpt_lib.list_checkpoints(out / "checkpoints")] == [3]
    tr = _toy(out)
    tr.fit(resume=True)
    assert "step-6: incomplete" in caplog.text and reason in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step-3'}" in caplog.text
    # the resume from step 3 is exact: the losses equal the uninterrupted run's, and step-6 is whole again
    assert _losses(out) == _losses(straight) and sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert ckpt_lib.checkpoint_problem(out / "checkpoints" / "step-6") is None


def test_unknown_entries_are_reported_and_only_incomplete_ones_refused(straight, tmp_path, caplog):
    import shutil

    out = tmp_path / "exp"
    shutil.copytree(straight, out)
    root = out / "checkpoints"
    (root / "step-9.bak").mkdir()
    (root / "notes.txt").write_text("x")
    caplog.set_level("WARNING")
    assert ckpt_lib.latest_checkpoint(root) == root / "step-6"
    assert "step-9.bak: not a checkpoint" in caplog.text and "notes.txt: not a checkpoint" in caplog.text
    (root / "step-6" / "manifest.json").unlink()  # a checkpoint from before manifests: still accepted
    assert ckpt_lib.checkpoint_problem(root / "step-6") is None
    for step in (3, 6):
        _cut_half(root / f"step-{step}" / "model.safetensors")
    before = snapshot(out)
    with pytest.raises(ExperimentError, match="no complete checkpoint"):
        _toy(out).fit(resume=True)
    assert snapshot(out) == before


def test_damaged_file_of_a_complete_checkpoint_is_named(straight, tmp_path):
    import shutil

    out = tmp_path / "exp"
    shutil.copytree(straight, out)
    sched = out / "checkpoints" / "step-6" / "scheduler.pt"
    sched.write_bytes(b"\0" * sched.stat().st_size)  # same size: the manifest cannot see it, loading can
    with pytest.raises(ExperimentError, match=r"scheduler.pt cannot be read.*previous checkpoint"):
        _toy(out).fit(resume=True)


# ------------------------------------------------------------------------- 9. one line, exit code 2, no traceback
@pytest.fixture(scope="module")
def unit_cuts(tmp_path_factory) -> Path:
    from speechssl.data.synthetic import write_synthetic_cuts

    d = tmp_path_factory.mktemp("units")
    cuts = write_synthetic_cuts(d, num_cuts=2, min_duration=0.5, max_duration=0.6, units={"mfcc": 0.01})
    cuts.to_file(d / "cuts.jsonl.gz")
    return d / "cuts.jsonl.gz"


@pytest.fixture
def no_model_build(monkeypatch):
    """Building a pretraining model fails the test: these errors must come first."""
    import speechssl.train.pretrain as pretrain

    def refuse(cfg):
        raise AssertionError("a model was built")

    monkeypatch.setattr(pretrain, "build_model", refuse)


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [3\n  log_every: 1\n")
    rc, err = cli(["pretrain", "--config", bad, "--out", tmp_path / "exp"], capsys)
    line = one_line(err)
    assert rc == 2 and str(bad) in line and "line 3" in line and not (tmp_path / "exp").exists()


def test_unit_id_above_num_classes_names_the_key(unit_cuts, tmp_path, capsys, no_model_build):
    out = tmp_path / "exp"
    rc, err = cli(["pretrain", "--config", CONF["pretrain"], "--out", out, "--set", f"data.train=[{unit_cuts}]",
                   "--set", "objective.kwargs.num_classes.mfcc=10"], capsys)  # ids run to 49 on these cuts
    line = one_line(err)
    assert rc == 2 and "objective.kwargs.num_classes" in line and "'mfcc'" in line and "[0, 10)" in line
    assert not out.exists()


def test_superb_missing_upstream_or_manifest_dir(tmp_path, capsys):
    out = tmp_path / "sid"
    rc, err = cli(["superb", "--config", CONF["superb"], "--out", out, "--set", f"data.manifest_dir={tmp_path}",
                   "--set", f"upstream={tmp_path / 'no_model'}"], capsys)
    assert rc == 2 and "config key 'upstream'" in one_line(err) and "no_model" in one_line(err)
    rc, err = cli(["superb", "--config", CONF["superb"], "--out", out, "--set", "upstream=fbank",
                   "--set", f"data.manifest_dir={tmp_path / 'no_data'}"], capsys)
    assert rc == 2 and "data.manifest_dir" in one_line(err) and "no_data" in one_line(err)
    assert not out.exists()


def test_out_under_a_regular_file_is_refused_before_any_model(tmp_path, capsys, no_model_build):
    f = tmp_path / "taken"
    f.write_text("a file")
    rc, err = cli(["pretrain", "--config", CONF["pretrain"], "--out", f / "exp"], capsys)
    assert rc == 2 and f"{f} is a regular file" in one_line(err)
    assert f.read_text() == "a file"


def test_truncated_weights_name_the_file(models, tmp_path, capsys):
    rc, err = cli(["export", models["truncated"], tmp_path / "out"], capsys)
    line = one_line(err)
    assert rc == 2 and str(models["truncated"] / "model.safetensors") in line and "truncated" in line
    assert not (tmp_path / "out").exists()
    rc, err = cli(["distill", "--config", CONF["distill"], "--out", tmp_path / "d", "--set",
                   f"teacher={models['truncated']}"], capsys)
    assert rc == 2 and "config key 'teacher'" in one_line(err) and "truncated" in one_line(err)
    assert not (tmp_path / "d").exists()
