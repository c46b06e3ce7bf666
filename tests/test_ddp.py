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
from test_resume import kill_at_call
from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig

out, merge = Path(sys.argv[1]), int(sys.argv[2])
crash_at, resume = (int(sys.argv[3]), sys.argv[4] == "1") if len(sys.argv) > 3 else (-1, False)
torch.set_num_threads(1)
model = ToyModel(dropout=0.0, layerdrop=0.0, seed=0)
if crash_at >= 0:
    kill_at_call(model, crash_at, RuntimeError)
cfg = TrainerConfig(max_steps=5, log_every=1, ckpt_every=3, progress=False, clip_norm=1.0, grad_accum=2,
                    device="cpu")
tr = Trainer(cfg, model, out, optim=OptimConfig(lr=5e-2, weight_decay=0.01),
             schedule=ScheduleConfig(name="linear", warmup_steps=2),
             make_train_loader=lambda: ToyLoader(num_workers=0, merge=merge, n=60),
             save_final=lambda m, d: (d.mkdir(parents=True),
                                      save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                                                str(d / "model.safetensors"))))
logs = tr.fit(resume=resume)
assert tr.runtime.world == (2 if merge == 1 else 1), tr.runtime.world
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
    """... and a DDP run killed inside step 5 and resumed from its step-3 checkpoint still matches."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _env()
    for crash_at, resume in ((8, 0), (-1, 1)):  # micro-batch 8 = step 5 (grad_accum 2)
        two = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(_free_port()), str(script), str(tmp_path / "ddp"), "1", str(crash_at),
             str(resume)], env=env, capture_output=True, text=True, timeout=300)
        if crash_at >= 0:
            assert two.returncode != 0 and "simulated kill" in two.stderr, two.stderr[-3000:]
            assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-3"]
        else:
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


LAYERDROP_WORKER = r'''
import json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective
from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig

out, steps = Path(sys.argv[1]), int(sys.argv[2])
strategy = sys.argv[3] if len(sys.argv) > 3 else "ddp"
torch.set_num_threads(1)
torch.manual_seed(0)
enc = build_encoder("tiny_hubert", hidden_size=32, num_layers=4, num_heads=2, ffn_dim=64, conv_pos=8,
                    conv_pos_groups=4, conv_layers=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
                    layerdrop=0.5, dropout=0.0, attention_dropout=0.0, feature_dropout=0.0)
model = build_objective("hubert", enc, num_classes=7, final_dim=16, mask_prob=0.5, mask_length=2)
init = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
ran = []  # per training forward: the indices of the layers that ran (not dropped)
orig_forward = model.forward


def forward(batch):
    ran.append([])
    return orig_forward(batch)


model.forward = forward
for i, layer in enumerate(enc.layers):
    layer.register_forward_hook(lambda m, a, o, i=i: ran[-1].append(i) if m.training else None)


class Loader:
    """Fixed synthetic batches per rank (2 utterances of 0.25-0.3 s, units aligned to encoder frames)."""

    def __init__(self):
        import torch.distributed as dist
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        while True:
            lens = torch.tensor([4800, 4000])
            audio = torch.randn(2, 4800, generator=g) * (torch.arange(4800)[None] < lens[:, None])
            frames = enc.num_frames(lens)
            units = torch.randint(0, 7, (2, int(frames.max())), generator=g)
            units[1, int(frames[1]):] = -100
            yield {"audio": audio, "audio_lens": lens, "units": {"kmeans": units}, "cut_ids": ["a", "b"]}


cfg = TrainerConfig(max_steps=steps, log_every=1, ckpt_every=100, ckpt_at_end=False, progress=False,
                    grad_accum=2, clip_norm=10.0, device="cpu", distributed_strategy=strategy)
tr = Trainer(cfg, model, out, optim=OptimConfig(lr=1e-2), schedule=ScheduleConfig(name="linear", warmup_steps=1),
             make_train_loader=Loader)
tr.fit()
rank = tr.runtime.rank
if strategy == "ddp":
    ddp = tr.model
    assert ddp.find_unused_parameters, "layer-drop must turn on find_unused_parameters"
    assert not getattr(ddp, "static_graph", False), "static_graph must stay off with layer-drop"
    sd = {k: v.detach().contiguous() for k, v in tr.runtime.acc.unwrap_model(tr.model).state_dict().items()}
    save_file(sd, str(out / f"rank{rank}.safetensors"))
else:
    assert tr.fsdp
    from speechssl.train.fsdp import full_model_state
    sd = full_model_state(tr.model)  # a gather on every rank; rank 0 gets the full state
    if rank == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "rank0.safetensors"))
save_file(init, str(out / f"init{rank}.safetensors"))
(out / f"ran{rank}.json").write_text(json.dumps(ran))
'''


def test_ddp_layerdrop_hubert(tmp_path):
    """Layer-drop 0.5 drawn independently per rank (different layers unused on each rank, and in the no_sync
    micro-batch vs the synced one): no DDP error, ranks stay identical, the loss stays finite."""
    script = tmp_path / "worker_ld.py"
    script.write_text(LAYERDROP_WORKER)
    out = tmp_path / "ld"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script), str(out), "6"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    from safetensors.torch import load_file

    import json

    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    init = load_file(str(out / "init0.safetensors"))
    assert r0.keys() == r1.keys() == init.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged on {k}"
    # the drops really differed: some micro-batch ran a layer on one rank that the other rank skipped
    ran = [json.loads((out / f"ran{r}.json").read_text()) for r in (0, 1)]
    assert len(ran[0]) == len(ran[1]) == 12  # 6 steps x 2 micro-batches
    assert any(set(a) != set(b) for a, b in zip(*ran))
    assert any(len(a) < 4 for a in ran[0]) and any(len(a) < 4 for a in ran[1])

    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in recs)
    # every layer that ran somewhere was trained (a layer dropped on one rank still gets the other's gradient)
    used = set().union(*map(set, ran[0] + ran[1]))
    for i in used:
        keys = [k for k in r0 if k.startswith(f"encoder.layers.{i}.") and k.endswith("weight")]
        assert keys and any(not torch.equal(r0[k], init[k]) for k in keys), f"layer {i} did not train"


def test_fsdp_layerdrop_same_layers_on_every_rank(tmp_path):
    """Under FSDP the trainer seeds each micro-batch's layer-drop identically on all ranks: both ranks skip the
    same layers (so the per-layer gathers match), some layers are skipped, the loss stays finite and the layers
    that ran were trained."""
    import json

    from safetensors.torch import load_file

    script = tmp_path / "worker_ld.py"
    script.write_text(LAYERDROP_WORKER)
    out = tmp_path / "ld_fsdp"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script), str(out), "5", "fsdp"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    ran = [json.loads((out / f"ran{r}.json").read_text()) for r in (0, 1)]
    assert len(ran[0]) == 10 and ran[0] == ran[1]  # 5 steps x 2 micro-batches, identical on both ranks
    assert any(len(a) < 4 for a in ran[0]) and len({tuple(a) for a in ran[0]}) > 1  # drops, varying per step
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 6))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    final, init = load_file(str(out / "rank0.safetensors")), load_file(str(out / "init0.safetensors"))
    assert final.keys() == init.keys()
    for i in set().union(*map(set, ran[0])):
        keys = [k for k in final if k.startswith(f"encoder.layers.{i}.") and k.endswith("weight")]
        assert keys and any(not torch.equal(final[k], init[k]) for k in keys), f"layer {i} did not train"


FSDP_WORKER = r'''
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from _train_toys import ToyDataset, ToyLoader, ToyStack
from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig

out, merge, strategy, crash_at, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    sys.argv[5] == "1"
torch.set_num_threads(1)
model = ToyStack(seed=0)
model.crash_at = crash_at if crash_at >= 0 else None
data = ToyDataset(n=60)
valid = {"x": data.x[:20], "y": data.y[:20]}
cfg = TrainerConfig(max_steps=6, log_every=1, ckpt_every=3, eval_every=3, progress=False, clip_norm=1.0,
                    grad_accum=2, device="cpu", distributed_strategy=strategy)
tr = Trainer(cfg, model, out, optim=OptimConfig(lr=5e-2, weight_decay=0.01),
             schedule=ScheduleConfig(name="linear", warmup_steps=2),
             make_train_loader=lambda: ToyLoader(num_workers=0, merge=merge, n=60),
             evaluate=lambda m: {"mse": float(m(valid).loss)}, best_metric="mse",
             save_final=lambda m, d: (d.mkdir(parents=True),
                                      save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()},
                                                str(d / "model.safetensors"))))
tr.fit(resume=resume)
assert tr.fsdp == (strategy == "fsdp" and merge == 1), (tr.fsdp, strategy, merge)
if tr.fsdp:
    from torch.distributed.tensor import DTensor
    w = tr.model.layers[0][0].weight
    assert isinstance(w, DTensor) and w.to_local().shape[0] == 8, "layer weights must be sharded over 2 ranks"
'''


def _launch(script, out, *args, nproc=2):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port())] if nproc > 1 else [sys.executable])
    return subprocess.run(cmd + [str(script), str(out), *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300)


def _metrics(d: Path, split: str) -> list[float]:
    import json

    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [r["loss" if split == "train" else "mse"] for r in recs if r["split"] == split]


def test_fsdp_matches_single_process_and_resumes(tmp_path):
    """FSDP2 over 2 gloo processes (per-layer shards, gradient accumulation), killed inside step 5 and resumed from
    its step-3 full-state checkpoint, ends where 1 process on the same global batch ends; EXP/final holds the
    full weights."""
    script = tmp_path / "worker_fsdp.py"
    script.write_text(FSDP_WORKER)
    res = _launch(script, tmp_path / "single", 2, "ddp", -1, 0, nproc=1)
    assert res.returncode == 0, res.stderr[-4000:]
    out = tmp_path / "fsdp"
    res = _launch(script, out, 1, "fsdp", 9, 0)  # micro-batch 9 = step 5
    assert res.returncode != 0 and "simulated kill" in res.stderr, res.stderr[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    assert not (out / "final").exists()
    import json

    assert json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())[
        "distributed_strategy"] == "fsdp"
    res = _launch(script, out, 1, "fsdp", -1, 1)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = _load(out), _load(tmp_path / "single")
    start = __import__("_train_toys").ToyStack(seed=0).state_dict()
    assert a.keys() == b.keys() == start.keys()
    for k in a:
        assert a[k].shape == start[k].shape, k  # full, not sharded
        assert not torch.equal(a[k], start[k]), f"{k} did not train"
        # reduce-scatter sums in another order than one process: float32 round-off, amplified a little by Adam;
        # a resume that lost the optimiser or scheduler state would be off by orders of magnitude more
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
    la, lb = _metrics(out, "train"), _metrics(tmp_path / "single", "train")
    assert len(la) == 6
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(_metrics(out, "valid")),
                               torch.tensor(_metrics(tmp_path / "single", "valid")), rtol=1e-5, atol=1e-6)
