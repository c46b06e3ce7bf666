"""Checks every pretraining objective's tests share: exact resume through ``run_pretrain`` after a simulated
crash, and two DDP processes ending with identical weights."""
from __future__ import annotations

import json
import shutil

import torch
from test_resume import _losses


def assert_resume_exact(cfg, out):
    """Train ``cfg`` for its 4 steps (checkpoints at 2 and 4), roll back to step 2 as a crash would (drop step-4
    and final/), resume: the per-step losses must be identical. Returns the losses {step: loss}."""
    from speechssl.train.pretrain import run_pretrain

    run_pretrain(cfg, out)
    ref = _losses(out)
    shutil.rmtree(out / "checkpoints" / "step-4")
    shutil.rmtree(out / "final")
    run_pretrain(cfg, out, resume=True)
    assert sorted(ref) == [1, 2, 3, 4] and _losses(out) == ref
    return ref


def metrics(out):
    """All records of ``out/metrics.jsonl``, in order."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# Run by 2 gloo processes: the objective built from SETUP (written above this text), trained 3 steps on fixed
# synthetic batches that differ per rank; each rank saves its final weights.
DDP_WORKER = r'''
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from conftest import make_wav
from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective
from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig

out, name = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
PRESET, ENC, KW = SETUP[name]
model = build_objective(name, build_encoder(PRESET, **ENC), **KW)


class Loader:
    """Fixed synthetic batches, different on each rank."""

    def __init__(self):
        import torch.distributed as dist
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def __iter__(self):
        i = 0
        while True:
            lens = torch.tensor([8000, 6400])
            audio = torch.zeros(2, 8000)
            for j, n in enumerate(lens.tolist()):
                audio[j, :n] = torch.from_numpy(make_wav(n, seed=10 * self.rank + j + i))
            i += 1
            yield {"audio": audio, "audio_lens": lens, "cut_ids": ["a", "b"]}


cfg = TrainerConfig(max_steps=3, log_every=1, ckpt_every=100, ckpt_at_end=False, progress=False, grad_accum=1,
                    clip_norm=10.0, device="cpu", ddp_find_unused=FIND_UNUSED)
tr = Trainer(cfg, model, out, optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(name="linear", warmup_steps=1),
             make_train_loader=Loader)
tr.fit()
sd = {k: v.detach().contiguous() for k, v in tr.runtime.acc.unwrap_model(tr.model).state_dict().items()}
save_file(sd, str(out / f"rank{tr.runtime.rank}.safetensors"))
'''


def assert_ddp_ranks_agree(tmp_path, name, preset, enc, kw, find_unused):
    """DDP over 2 gloo processes through the shared trainer with objective ``name`` on encoder ``preset``
    (overrides ``enc``, objective kwargs ``kw``, ``trainer.ddp_find_unused`` = ``find_unused``): no error, both
    ranks end with the same weights, steps 1-3 logged, finite losses."""
    from safetensors.torch import load_file
    from test_ddp import _launch

    script = tmp_path / "worker.py"
    script.write_text(f"SETUP = {{{name!r}: ({preset!r}, {enc!r}, {kw!r})}}\nFIND_UNUSED = {find_unused!r}\n"
                      + DDP_WORKER)
    out = tmp_path / "ddp"
    res = _launch(script, out, name)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    # batch-norm running statistics are per-rank buffers that DDP broadcasts from rank 0 before each forward:
    # after the last update they hold each rank's own batch, by design
    local = ("running_mean", "running_var", "num_batches_tracked")
    for k in r0:
        if not k.endswith(local):
            assert torch.equal(r0[k], r1[k]), f"ranks diverged on {k}"
    recs = metrics(out)
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
