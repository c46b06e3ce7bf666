"""Exact resume: N steps straight == K steps, crash, resume, N-K steps (workers, dropout and layer-drop on);
a crash while a checkpoint is written leaves the previous one loadable."""
from __future__ import annotations

import json

import pytest
import torch
from _train_toys import ToyLoader, ToyModel

from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig
from speechssl.train import checkpoint as ckpt_lib

N_STEPS = 14


class Crash(Exception):
    pass


def kill_at_call(model, call: int, exc: type[Exception] = Crash) -> None:
    """Make training forward call number ``call`` (0-based, counted by ``model.calls``) of ``model`` raise ``exc``:
    a simulated kill. The DDP workers of test_ddp.py use it too."""
    orig = model.forward

    def forward(batch):
        if model.training and model.calls == call:
            raise exc("simulated kill")
        return orig(batch)

    model.forward = forward


def _run(out, *, resume=False, crash_at_call=None, model_seed=0, workers=2, **cfg_kw):
    model = ToyModel(dropout=0.2, layerdrop=0.3, seed=model_seed)
    if crash_at_call is not None:
        kill_at_call(model, crash_at_call)
    cfg = TrainerConfig(**{"max_steps": N_STEPS, "log_every": 1, "ckpt_every": 5, "keep_last": 5,
                           "progress": False, "grad_accum": 2, "clip_norm": 1.0, **cfg_kw})
    tr = Trainer(cfg, model, out, optim=OptimConfig(lr=2e-2, weight_decay=0.01),
                 schedule=ScheduleConfig(name="polynomial", warmup_steps=3, power=2.0),
                 make_train_loader=lambda: ToyLoader(num_workers=workers, n=48))
    tr.fit(resume=resume)
    return tr


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    tr = _run(out)
    return out, tr


def test_resume_after_crash_is_exact(straight, tmp_path):
    ref_out, ref = straight
    out = tmp_path / "exp"
    with pytest.raises(Crash):
        _run(out, crash_at_call=2 * 7 + 1)  # dies inside step 8; the last checkpoint is step 5
    assert [s for s, _ in ckpt_lib.list_checkpoints(out / "checkpoints")] == [5]
    tr = _run(out, resume=True, model_seed=123)  # a different init: everything must come from the checkpoint
    ref_losses, losses = _losses(ref_out), _losses(out)
    assert sorted(losses) == list(range(1, N_STEPS + 1))  # steps 6-7 of the crashed run were dropped
    assert ref_losses == losses  # bit-identical
    for (n, p), q in zip(ref.model.named_parameters(), tr.model.parameters()):
        assert torch.equal(p, q), n
    # the loader crossed an epoch boundary: 48 items in ~9 batches / epoch, 28 micro-batches
    assert json.loads((out / "checkpoints" / f"step-{N_STEPS}" / "trainer_state.json").read_text())["epoch"] >= 2


def test_resume_without_workers_matches_workers(straight, tmp_path):
    ref_out, _ = straight
    out = tmp_path / "exp"
    with pytest.raises(Crash):
        _run(out, crash_at_call=2 * 11, workers=0)
    _run(out, resume=True, workers=0)
    assert _losses(ref_out) == _losses(out)


def test_crash_while_writing_checkpoint_keeps_previous(straight, tmp_path, monkeypatch):
    ref_out, ref = straight
    out = tmp_path / "exp"
    real = ckpt_lib.save_checkpoint_dir
    calls = []

    def flaky(tmp, **kw):
        calls.append(tmp)
        if len(calls) == 2:  # the step-10 checkpoint: write part of it, then die
            (tmp / "model.safetensors").write_bytes(b"half")
            raise Crash("killed while writing")
        real(tmp, **kw)

    monkeypatch.setattr(ckpt_lib, "save_checkpoint_dir", flaky)
    with pytest.raises(Crash):
        _run(out)
    monkeypatch.setattr(ckpt_lib, "save_checkpoint_dir", real)
    root = out / "checkpoints"
    assert (root / ".tmp-step-10").is_dir()
    latest = ckpt_lib.latest_checkpoint(root)
    assert latest == root / "step-5"
    m = ToyModel()
    ckpt_lib.load_model_weights(m, latest)  # loadable, complete
    assert ckpt_lib.load_torch(latest / "optimizer.pt")["state"]
    tr = _run(out, resume=True)
    assert not (root / ".tmp-step-10").exists()
    assert _losses(ref_out) == _losses(out)
    for p, q in zip(ref.model.parameters(), tr.model.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------- Shar input: resume is exact as well
SHAR_STEPS = 8


@pytest.fixture(scope="module")
def shar_dir(tmp_path_factory):
    from speechssl.data.shar import export_shar
    from speechssl.data.synthetic import write_synthetic_cuts

    d = tmp_path_factory.mktemp("shar")
    cuts = write_synthetic_cuts(d / "src", 12, 0.3, 0.5, seed=3, units={"kmeans": 0.02})
    export_shar(cuts, d / "shar", shard_size=2)
    return d / "shar"


def _run_shar(shar, out, *, resume=False, crash_at_call=None, workers=2):
    from speechssl.config import from_dict
    from speechssl.train.pretrain import PretrainConfig, build_model, build_train_loader

    small = {"num_layers": 2, "hidden_size": 16, "num_heads": 2, "ffn_dim": 32, "conv_pos": 8, "conv_pos_groups": 4,
             "conv_layers": [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2, "layerdrop": 0.2}
    cfg = from_dict(PretrainConfig, {
        "data": {"shar_dir": str(shar), "max_duration": 1.2, "units": ["kmeans"], "num_buckets": 2},
        "model": {"preset": "tiny_hubert", "overrides": small},
        "objective": {"name": "hubert", "kwargs": {"num_classes": 97, "final_dim": 16, "mask_length": 2}},
        "optim": {"lr": 1e-3}, "schedule": {"name": "linear", "warmup_steps": 2},
        "trainer": {"max_steps": SHAR_STEPS, "log_every": 1, "ckpt_every": 3, "keep_last": 5, "num_workers": workers,
                    "progress": False}})
    torch.manual_seed(0)
    model = build_model(cfg)
    if crash_at_call is not None:
        orig, calls = model.forward, [0]

        def forward(batch):
            if model.training:
                if calls[0] == crash_at_call:
                    raise Crash("simulated kill")
                calls[0] += 1
            return orig(batch)

        model.forward = forward
    tr = Trainer(cfg.trainer, model, out, optim=cfg.optim, schedule=cfg.schedule,
                 make_train_loader=lambda: build_train_loader(cfg, model.encoder))
    tr.fit(resume=resume)
    return tr


def test_resume_on_shar_is_exact(shar_dir, tmp_path):
    ref = _run_shar(shar_dir, tmp_path / "straight")
    out = tmp_path / "exp"
    with pytest.raises(Crash):
        _run_shar(shar_dir, out, crash_at_call=4)  # dies inside step 5; the last checkpoint is step 3
    assert [s for s, _ in ckpt_lib.list_checkpoints(out / "checkpoints")] == [3]
    state = ckpt_lib.load_torch(out / "checkpoints" / "step-3" / "loader-0.pt")
    assert state["kind"] == "shar" and sum(state["consumed"]) == 3
    tr = _run_shar(shar_dir, out, resume=True)
    ref_losses, losses = _losses(tmp_path / "straight"), _losses(out)
    assert sorted(losses) == list(range(1, SHAR_STEPS + 1))
    assert ref_losses == losses  # bit-identical, across an epoch boundary
    assert json.loads((out / "checkpoints" / f"step-{SHAR_STEPS}" / "trainer_state.json").read_text())["epoch"] >= 1
    for (n, p), q in zip(ref.model.named_parameters(), tr.model.parameters()):
        assert torch.equal(p, q), n
