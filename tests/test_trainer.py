"""The generic trainer on a toy model: schedules, weight-decay groups, logging, checkpoints, NaN handling."""
from __future__ import annotations

import json
import math

import pytest
import torch
from _train_toys import ToyLoader, ToyModel

from speechssl.config import ConfigError, from_dict
from speechssl.train import OptimConfig, ScheduleConfig, Trainer, TrainerConfig, TrainingDiverged
from speechssl.train import checkpoint as ckpt_lib
from speechssl.train.optim import build_optimizer, build_scheduler, default_param_groups, lr_factor


def _trainer(tmp_path, model=None, loader_kw=None, **cfg_kw):
    cfg = TrainerConfig(**{"max_steps": 6, "log_every": 1, "ckpt_every": 3, "progress": False, **cfg_kw})
    model = model or ToyModel(dropout=0.0)
    return Trainer(cfg, model, tmp_path / "exp", optim=OptimConfig(lr=1e-2, weight_decay=0.0),
                   schedule=ScheduleConfig(name="constant"),
                   make_train_loader=lambda: ToyLoader(**(loader_kw or {})))


def test_polynomial_warmup_and_decay():
    cfg = ScheduleConfig(name="polynomial", warmup_steps=10, power=1.0, end_lr_ratio=0.0)
    f = [lr_factor(cfg, s, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[59] == pytest.approx(0.5)          # update 60: halfway through the 100 decay updates
    assert f[109] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))


def test_tri_stage_and_constant():
    cfg = ScheduleConfig(name="tri_stage", phase_ratio=[0.1, 0.4, 0.5], init_lr_scale=0.01, final_lr_scale=0.05)
    assert lr_factor(cfg, 0, 100) == pytest.approx(0.01)
    assert lr_factor(cfg, 10, 100) == pytest.approx(1.0) and lr_factor(cfg, 49, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.05)
    assert lr_factor(cfg, 75, 100) == pytest.approx(math.sqrt(0.05))
    const = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(const, s, 10) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([{"params": [p], "lr_scale": 0.5}], OptimConfig(lr=1.0))
    sched = build_scheduler(opt, ScheduleConfig(name="linear", warmup_steps=2), total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.375, 0.25, 0.125, 0.0])


def test_weight_decay_groups():
    model = ToyModel()
    model.mask_emb = torch.nn.Parameter(torch.zeros(4, 4))
    groups = default_param_groups(model, OptimConfig(weight_decay=0.1, lr_scale={"inp.": 0.1}))
    by_name = {n: (g["weight_decay"], g["lr_scale"]) for g in groups for n in g["names"]}
    assert by_name["mid.weight"] == (0.1, 1.0)
    assert by_name["mid.bias"] == (0.0, 1.0)
    assert by_name["mask_emb"] == (0.0, 1.0)
    assert by_name["inp.weight"] == (0.1, 0.1)


def test_config_validation_names_key():
    with pytest.raises(ConfigError, match="trainer.precision"):
        from_dict(TrainerConfig, {"precision": "fp8"}, prefix="trainer.")
    with pytest.raises(ConfigError, match="trainer.precision"):
        from_dict(TrainerConfig, {"precision": "no"}, prefix="trainer.")  # accelerate's name is not ours
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        from_dict(TrainerConfig, {"max_step": 3})
    with pytest.raises(ConfigError, match="schedule.name"):
        from_dict(ScheduleConfig, {"name": "poly"}, prefix="schedule.")


def test_fit_logs_checkpoints_and_learns(tmp_path):
    tr = _trainer(tmp_path, max_steps=30, ckpt_every=10, keep_last=2, log_every=5)
    finals = []
    tr.save_final = lambda m, d: (d.mkdir(parents=True), (d / "w.txt").write_text("ok"), finals.append(d))
    out = tr.fit()
    exp = tmp_path / "exp"
    recs = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]
    for k in ("loss", "lr", "grad_norm", "acc", "audio_sec_per_sec"):
        assert k in recs[0]
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    assert recs[0]["audio_sec_per_sec"] > 0
    assert [s for s, _ in ckpt_lib.list_checkpoints(exp / "checkpoints")] == [20, 30]
    ck = exp / "checkpoints" / "step-30"
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "loader-0.pt", "rng-0.pt", "trainer_state.json"):
        assert (ck / f).is_file(), f
    assert ckpt_lib.load_trainer_state(ck)["step"] == 30
    assert (exp / "final" / "w.txt").read_text() == "ok"
    assert out["step"] == 30 and out["loss"] == pytest.approx(recs[-1]["loss"])


def test_best_checkpoint_is_kept(tmp_path):
    values = iter([3.0, 1.0, 2.0, 2.5, 2.7, 2.9])
    tr = _trainer(tmp_path, max_steps=6, ckpt_every=100, eval_every=1, keep_last=1)
    tr.evaluate = lambda m: {"err": next(values)}
    tr.best_metric = "err"
    out = tr.fit()
    steps = [s for s, _ in ckpt_lib.list_checkpoints(tmp_path / "exp" / "checkpoints")]
    assert steps == [2, 6]  # best (step 2) kept beside the last one
    assert out["best_step"] == 2 and out["best_value"] == 1.0
    valid = [json.loads(x) for x in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "valid"]
    assert [v["err"] for v in valid] == [3.0, 1.0, 2.0, 2.5, 2.7, 2.9]


def test_nan_step_is_skipped_then_training_continues(tmp_path, caplog):
    model = ToyModel(dropout=0.0)
    model.poison_calls = {2}
    tr = _trainer(tmp_path, model=model, max_steps=5, max_bad_steps=3)
    out = tr.fit()
    assert out["bad_steps_total"] == 1
    assert out["step"] == 5 and math.isfinite(out["loss"])
    assert any("non-finite" in r.message for r in caplog.records)
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_too_many_bad_steps_stop(tmp_path):
    model = ToyModel(dropout=0.0)
    model.poison_calls = {1, 2, 3}
    tr = _trainer(tmp_path, model=model, max_steps=5, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        tr.fit()


def test_grad_accum_equals_big_batch(tmp_path):
    """2 micro-batches with sample-size normalisation == one batch holding both."""
    a = _trainer(tmp_path / "a", max_steps=4, grad_accum=2)
    a.fit()
    b = _trainer(tmp_path / "b", max_steps=4, loader_kw={"merge": 2})
    b.fit()
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_cpu_runs_and_fp16_needs_a_gpu(tmp_path):
    out = _trainer(tmp_path / "bf16", max_steps=3, precision="bf16").fit()
    assert math.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="trainer.precision.*fp16 needs a GPU"):
        _trainer(tmp_path / "fp16", max_steps=3, precision="fp16", device="cpu").fit()


def test_report_draws_curves(tmp_path, capsys):
    from speechssl.cli.main import main
    from speechssl.train.plots import summarize

    tr = _trainer(tmp_path, max_steps=4, eval_every=2)
    tr.evaluate = lambda m: {"loss": 1.0, "acc": 0.5}
    tr.fit()
    exp = tmp_path / "exp"
    with open(exp / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "los')  # a line cut short by a kill is ignored
    assert main(["report", str(exp)]) == 0
    png = exp / "curves.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    s = summarize(exp)
    assert s["step"] == 4 and s["valid_loss"] == 1.0 and "acc" in s
    assert "curves:" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_oom_names_the_batch(tmp_path):
    from speechssl.train.trainer import _describe_batch

    model = ToyModel(dropout=0.0)

    def oom(batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    model.forward = oom
    with pytest.raises(RuntimeError, match=r"out of memory at step 0 .*data.max_duration"):
        _trainer(tmp_path, model=model).fit()
    batch = {"audio": torch.zeros(3, 32000), "audio_lens": torch.tensor([32000, 16000, 8000]), "cut_ids": ["a"]}
    assert _describe_batch(batch, 16000) == ("3 utterances, padded shape (3, 32000) = 6.0 s, 3.5 s of speech, "
                                             "first cut a")


def test_fsdp_config_and_refusals(tmp_path, caplog):
    """fsdp is validated, refuses layer-drop and fp16 with the reason, finds the transformer layers, and with one
    process trains unwrapped (what EXP/final and resume see is the same as with ddp)."""
    from _train_toys import ToyStack

    from speechssl.train.fsdp import fsdp_units

    with pytest.raises(ConfigError, match="distributed_strategy"):
        from_dict(TrainerConfig, {"distributed_strategy": "zero3"}, prefix="trainer.")
    with pytest.raises(ConfigError, match="use bf16"):
        from_dict(TrainerConfig, {"distributed_strategy": "fsdp", "precision": "fp16"})
    stack = ToyStack(num_layers=3)
    assert fsdp_units(stack) == list(stack.layers)
    with pytest.raises(ConfigError, match="layer-drop of ToyModel.*shared_layerdrop"):
        Trainer(TrainerConfig(max_steps=2, distributed_strategy="fsdp", progress=False), ToyModel(layerdrop=0.3),
                tmp_path / "ld", optim=OptimConfig(), schedule=ScheduleConfig(), make_train_loader=ToyLoader)
    caplog.set_level("INFO")
    tr = Trainer(TrainerConfig(max_steps=2, distributed_strategy="fsdp", progress=False, device="cpu"),
                 ToyStack(), tmp_path / "one", optim=OptimConfig(), schedule=ScheduleConfig(),
                 make_train_loader=ToyLoader)
    assert tr.fit()["step"] == 2 and not tr.fsdp
    assert "nothing to shard" in caplog.text
    st = json.loads((tmp_path / "one" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert st["distributed_strategy"] == "ddp"


def test_accelerate_state_conflicts_on_precision_or_device_change():
    from speechssl.train.runtime import accelerate_state_conflicts

    cuda_bf16 = {"_mixed_precision": "bf16", "device": torch.device("cuda", 0)}
    assert not accelerate_state_conflicts({}, "no", cpu=True)
    assert not accelerate_state_conflicts(cuda_bf16, "bf16", cpu=False)
    assert accelerate_state_conflicts(cuda_bf16, "bf16", cpu=True)       # CUDA trainer, then a CPU one
    assert accelerate_state_conflicts(cuda_bf16, "no", cpu=False)        # another precision
    assert accelerate_state_conflicts({"_mixed_precision": "no", "device": torch.device("cpu")}, "no", cpu=False)


# ------------------------------------------------------------------------- the model-to-trainer contract
class FrameEnergy(torch.nn.Module):
    """A new objective written against speechssl.train.contract alone: regress each valid encoder frame's log
    energy from the encoder output, per frame (the frame count is the sample size)."""

    trainer_capabilities = ("step", "shared_layerdrop")

    def __init__(self, encoder, hidden: int = 8):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Sequential(torch.nn.Linear(encoder.hidden_size, hidden), torch.nn.Tanh(),
                                        torch.nn.Linear(hidden, 1))
        self.steps: list[int] = []

    def set_step(self, step: int) -> None:
        self.steps.append(step)

    def set_layerdrop_seed(self, seed: int) -> None:
        self.encoder.layerdrop_seed = seed

    def forward(self, batch):
        from speechssl.train.contract import StepOutput

        audio, lens = batch["audio"], batch["audio_lens"]  # [B, S], [B]
        out = self.encoder(audio, lens)
        h = out.last_hidden_state  # [B, T, D]
        B, T = h.shape[:2]
        hop = self.encoder.downsample_rate
        frames = torch.nn.functional.pad(audio, (0, max(0, T * hop - audio.shape[1])))[:, : T * hop]
        target = frames.reshape(B, T, hop).pow(2).mean(-1).add(1e-6).log()  # [B, T]
        valid = ~out.padding_mask
        err = (self.head(h[valid]).squeeze(-1) - target[valid]).pow(2)
        return StepOutput(err.mean(), {"mse": err.mean()}, sample_size=int(valid.sum()))


FRAME_ENERGY_CONFIG = {"name": "frame_energy", "kwargs": {"hidden": 8}}


def test_a_new_objective_trains_through_the_contract(tmp_path):
    from speechssl.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert", num_layers=1, hidden_size=16, num_heads=2, ffn_dim=32, conv_pos=8,
                        conv_pos_groups=4, conv_layers=[[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2)
    model = FrameEnergy(enc, **FRAME_ENERGY_CONFIG["kwargs"])

    def loader():
        g = torch.Generator().manual_seed(1)
        lens = torch.tensor([4800, 3200])
        audio = torch.randn(2, 4800, generator=g) * torch.linspace(0.01, 1.0, 4800)  # energy rises with time
        audio = audio * (torch.arange(4800)[None] < lens[:, None])
        return [{"audio": audio, "audio_lens": lens}] * 4

    cfg = TrainerConfig(max_steps=12, log_every=4, ckpt_every=100, ckpt_at_end=False, progress=False, grad_accum=2)
    tr = Trainer(cfg, model, tmp_path / "fe", optim=OptimConfig(lr=1e-2, weight_decay=0.0),
                 schedule=ScheduleConfig(name="constant"), make_train_loader=loader)
    tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "fe" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [4, 8, 12]
    assert recs[-1]["mse"] < 0.5 * recs[0]["mse"] and recs[-1]["loss"] == pytest.approx(recs[-1]["mse"])
    assert model.steps == list(range(12))  # the declared step hook, once before every update


class _Tuple(ToyModel):
    def forward(self, batch):
        out = super().forward(batch)
        return out.loss, out.logs


class _NoSetStep(torch.nn.Module):
    trainer_capabilities = ("shared_layerdrop",)


class _Unknown(torch.nn.Module):
    trainer_capabilities = ("epochs",)


class _SometimesSized(ToyModel):
    def forward(self, batch):
        out = super().forward(batch)
        out.sample_size = None if self.calls % 2 else out.sample_size
        return out


def test_contract_violations_name_the_model_class(tmp_path):
    def build(model, **kw):
        return _trainer(tmp_path / type(model).__name__, model=model, **kw)

    with pytest.raises(TypeError, match=r"_Tuple.forward\(batch\) returned tuple.*StepOutput"):
        build(_Tuple(dropout=0.0)).fit()
    with pytest.raises(TypeError, match=r"_NoSetStep declares trainer capability 'shared_layerdrop' but has no "
                                        r"method set_layerdrop_seed\(\)"):
        build(_NoSetStep())
    with pytest.raises(TypeError, match="_Unknown.trainer_capabilities names unknown capability 'epochs'"):
        build(_Unknown())
    with pytest.raises(TypeError, match="_SometimesSized.forward returned a sample_size for some micro-batches"):
        build(_SometimesSized(dropout=0.0), grad_accum=2).fit()


def test_unsized_steps_weigh_micro_batches_equally(tmp_path):
    """Without a sample size the update is the gradient of the mean of the micro-batch losses: 2 accumulated
    micro-batches of the same size equal one batch holding both (whose loss is the mean of the two)."""

    class Unsized(ToyModel):
        def forward(self, batch):
            out = super().forward(batch)
            out.sample_size = None
            return out

    class Equal(ToyLoader):  # batches of 4: the mean of two batch means is the mean of their union
        def __init__(self, merge=1):
            super().__init__(merge=merge)
            self.sampler.batches = lambda: [list(range(i, i + 4 * merge)) for i in range(0, 48, 4 * merge)]

    def run(name, accum, merge):
        cfg = TrainerConfig(max_steps=4, log_every=1, ckpt_every=100, progress=False, grad_accum=accum)
        tr = Trainer(cfg, Unsized(dropout=0.0), tmp_path / name, optim=OptimConfig(lr=1e-2, weight_decay=0.0),
                     schedule=ScheduleConfig(name="constant"), make_train_loader=lambda: Equal(merge))
        tr.fit()
        return tr.model

    a, b = run("a", 2, 1), run("b", 1, 2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_tensorboard_without_the_package_names_the_key(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError, match="trainer.tensorboard.*pip install tensorboard"):
        _trainer(tmp_path, tensorboard=True).fit()
    assert not (tmp_path / "exp").exists()  # refused before anything was written
