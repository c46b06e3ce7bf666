"""DDP on CPU (gloo, torchrun with 2 processes) ends with the same parameters as 1 process on the same global
batch, including the masked-frame (sample size) normalisation across ranks with unequal per-rank counts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

WORKER = r'''
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from _train_toys import ToyLoader, ToyModel
from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig

out, merge = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
model = ToyModel(dropout=0.0, layerdrop=0.0, seed=0)
cfg = TrainerConfig(max_steps=5, log_every=1, ckpt_every=100, progress=False, clip_norm=1.0, grad_accum=2,
                    device="cpu")
tr = Trainer(cfg, model, out, optim=OptimConfig(lr=5e-2, weight_decay=0.01),
             schedule=ScheduleConfig(name="linear", warmup_steps=2),
             make_train_loader=lambda: ToyLoader(num_workers=0, merge=merge, n=60),
             save_final=lambda m, d: (d.mkdir(parents=True),
                                      save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                                                str(d / "model.safetensors"))))
logs = tr.fit()
assert tr.accelerator.num_processes == (2 if merge == 1 else 1), tr.accelerator.num_processes
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _load(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "final" / "model.safetensors"))


def test_ddp_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _env()
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script), str(tmp_path / "ddp"), "1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _load(tmp_path / "ddp"), _load(tmp_path / "single")
    assert a.keys() == b.keys()
    start = {k: v.clone() for k, v in __import__("_train_toys").ToyModel(dropout=0.0, seed=0).state_dict().items()}
    for k in a:
        assert not torch.equal(a[k], start[k]), f"{k} did not train"
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the metrics of both runs report the same global loss
    import json

    la = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == 5
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)
