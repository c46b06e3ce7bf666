"""Every shell recipe parses and answers --help (the option parser sees each script's own defaults)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# recipes/lib/ holds the sourced helpers (option parsing, launching), not recipes
SCRIPTS = sorted(p for p in [*ROOT.glob("recipes/*/*.sh"), *ROOT.glob("egs/**/run.sh")]
                 if not p.name.startswith("_") and p.parent.name != "lib")


def test_recipes_exist():
    names = {str(p.relative_to(ROOT)) for p in SCRIPTS}
    for required in ("egs/mini/run.sh", "recipes/ssl/hubert.sh", "recipes/compress/dphubert.sh", "recipes/superb/run.sh"):
        assert required in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses_and_helps(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "--stage" in out.stderr


def test_unknown_option_is_an_error():
    out = subprocess.run(["bash", str(ROOT / "egs/mini/run.sh"), "--no-such-option", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "unknown option --no-such-option" in out.stderr


# ---------------------------------------------------------------------------------- multi-machine launching
def _dry_run(*args, script="recipes/ssl/pretrain.sh", required=("--data", "/d", "--config", "c.yaml")):
    import os

    env = dict(os.environ, SPEECHSSL_LAUNCH_DRY_RUN="1")
    return subprocess.run(["bash", str(ROOT / script), *required, *args], capture_output=True, text=True,
                          timeout=30, env=env)


@pytest.mark.parametrize("script, command, started", [
    ("recipes/ssl/pretrain.sh", "pretrain", "checkpoints/step-10"),
    ("recipes/compress/distilhubert.sh", "distill", "checkpoints/step-10"),
    ("recipes/compress/dphubert.sh", "prune", "stage1/checkpoints/step-10"),
    ("recipes/compress/dphubert.sh", "prune", "pruned"),
])
def test_training_resumes_a_started_run(tmp_path, script, command, started):
    required = ("--data", "/d", "--teacher", "t") if "compress" in script else ("--data", "/d", "--config", "c.yaml")
    args = ("--exp", str(tmp_path / "exp"), "--stop-stage", "1")
    fresh = _dry_run(*args, script=script, required=required)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.startswith(f"speechssl {command} --out {tmp_path / 'exp'} --config "), fresh.stdout
    assert "--resume" not in fresh.stdout
    (tmp_path / "exp" / started).mkdir(parents=True)
    again = _dry_run(*args, script=script, required=required)
    assert again.stdout.startswith(f"speechssl {command} --out {tmp_path / 'exp'} --resume --config "), again.stdout


def test_required_option_is_named():
    out = _dry_run(script="recipes/compress/dphubert.sh", required=("--data", "/d"))
    assert out.returncode != 0 and "--teacher is required" in out.stderr


def test_launch_multi_machine_uses_accelerate():
    out = _dry_run("--ngpu", "8", "--nnodes", "2", "--machine-rank", "1", "--main-ip", "10.0.0.7",
                   "--main-port", "29123", "--ref-gpus", "32")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip()
    assert cmd.startswith("accelerate launch --multi_gpu --num_machines 2 --machine_rank 1 --main_process_ip "
                          "10.0.0.7 --main_process_port 29123 --num_processes 16 -m speechssl.cli.main pretrain "), cmd
    assert "--set trainer.grad_accum=2" in cmd  # 32 reference GPUs / 16 processes
    assert "--set data.train=[/d/cuts_train.jsonl.gz]" in cmd


def test_launch_single_machine_and_custom_launcher():
    out = _dry_run("--ngpu", "4")
    assert out.stdout.startswith("torchrun --standalone --nproc-per-node 4 -m speechssl.cli.main pretrain "), out
    assert "--set trainer.grad_accum=8" in out.stdout
    assert _dry_run().stdout.startswith("speechssl pretrain --out exp/pretrain --config c.yaml ")
    out = _dry_run("--launcher", "torchrun --nnodes 2 --node-rank 0", "--nnodes", "2")
    assert out.stdout.startswith("torchrun --nnodes 2 --node-rank 0 -m speechssl.cli.main pretrain "), out


def test_launch_multi_machine_errors():
    out = _dry_run("--nnodes", "2")
    assert out.returncode != 0 and "--main-ip" in out.stderr
    out = _dry_run("--nnodes", "2", "--main-ip", "h", "--machine-rank", "2")
    assert out.returncode != 0 and "--machine-rank must be in 0..1" in out.stderr


def test_compress_recipes_launch_on_several_machines():
    out = _dry_run("--ngpu", "8", "--nnodes", "2", "--machine-rank", "1", "--main-ip", "10.0.0.7", "--stop-stage", "1",
                   script="recipes/compress/distilhubert.sh", required=("--data", "/d", "--teacher", "t"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("accelerate launch --multi_gpu --num_machines 2 --machine_rank 1 "
                                 "--main_process_ip 10.0.0.7 --main_process_port 29500 --num_processes 16 "
                                 "-m speechssl.cli.main distill "), out.stdout


def test_egs_pass_machine_options():
    for eg in ("egs/librispeech/ssl/run.sh", "egs/librilight/ssl/run.sh"):
        text = (ROOT / eg).read_text()
        assert '--machine-rank "$machine_rank" --main-ip "$main_ip" --main-port "$main_port"' in text, eg
    out = subprocess.run(["bash", str(ROOT / "recipes/ssl/hubert.sh"), "--help"], capture_output=True, text=True)
    assert "--machine-rank" in out.stderr and "--main-ip" in out.stderr
