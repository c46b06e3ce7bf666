"""Structured pruning: HardConcrete gates, expected parameter count, materialisation, Lagrangian sparsity."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from speechssl.compress.hardconcrete import HardConcrete
from speechssl.compress.materialize import materialize
from speechssl.compress.prune import PruneDistiller, PruneSettings, PruningGates, prune_param_groups
from speechssl.models import build_encoder
from speechssl.train.optim import OptimConfig, build_optimizer

MICRO_CONV = [[32, 10, 5], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 2, 2], [32, 2, 2]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def micro(model_type: str = "hubert", **kw):
    """A ~100k-parameter encoder of the given family (fast enough for training loops in tests)."""
    base = dict(model_type=model_type, num_layers=3, hidden_size=64, num_heads=4, ffn_dim=128,
                conv_layers=[list(c) for c in MICRO_CONV], conv_pos=16, conv_pos_groups=4, dropout=0.0,
                attention_dropout=0.0, relative_position=model_type == "wavlm", num_buckets=32, max_distance=64)
    base.update(kw)
    torch.manual_seed(0)
    return build_encoder(base).eval()


def random_hard_gates(enc, seed=0):
    g = PruningGates(enc)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in g.log_alpha_parameters():
            p.normal_(0.0, 3.0)
    g.eval()
    return g, g()


FAMILIES = [
    ("hubert", {}),
    ("wav2vec2", {}),
    ("wavlm", {}),
    ("wav2vec2", {"extractor_mode": "layer_norm", "layer_norm_first": True, "conv_bias": True}),
    ("hubert", {"feature_proj_layer_norm": False}),
    ("bestrq", {"frontend": "fbank", "conv_layers": [[48, 3, 2], [48, 3, 2]]}),
]


# ----------------------------------------------------------------------------------------------- HardConcrete
def test_hardconcrete_sampling_and_l0():
    torch.manual_seed(0)
    hc = HardConcrete(400, init_drop=0.5)
    with torch.no_grad():
        hc.log_alpha.normal_(0.0, 2.0)
    samples = torch.stack([hc.sample() for _ in range(2000)])
    assert samples.min() == 0.0 and samples.max() == 1.0  # stretched + clipped: exact zeros and ones occur
    mc = (samples > 0).float().mean(0)
    assert torch.allclose(mc, hc.prob_nonzero().detach(), atol=0.05)  # closed form P(z > 0)
    assert abs(float(hc.l0_norm().detach()) - float(mc.sum())) < 4.0


def test_hardconcrete_init_and_deterministic():
    torch.manual_seed(0)
    hc = HardConcrete(1000, init_drop=0.01)
    # log_alpha ~ log((1-p)/p): P(z > 0) = sigmoid(log_alpha - beta log(-l/r))
    expected = torch.sigmoid(torch.tensor(math.log(0.99 / 0.01) + 2.0 / 3.0 * math.log(1.1 / 0.1)))
    assert abs(float(hc.l0_norm().detach()) / 1000 - float(expected)) < 1e-3
    hc = HardConcrete(10, init_drop=0.5)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.linspace(-6, 6, 10))
    hc.eval()
    z = hc()
    k = round(float(hc.l0_norm().detach()))
    assert int((z > 0).sum()) == k
    assert torch.all(z[-k:] > 0) and torch.all(z[:-k] == 0)  # the most probable ones are kept
    assert torch.equal(z, hc())  # deterministic at eval


def test_hardconcrete_gradient_reaches_log_alpha():
    hc = HardConcrete(8, init_drop=0.5)
    (hc.sample().sum() + hc.l0_norm()).backward()
    assert hc.log_alpha.grad is not None and hc.log_alpha.grad.abs().sum() > 0


# -------------------------------------------------------------------------- expected params == materialised
@pytest.mark.parametrize("family,kw", FAMILIES)
def test_hard_gates_param_count_and_outputs_match_materialised(family, kw):
    enc = micro(family, **kw)
    gates_mod, gates = random_hard_gates(enc, seed=1)
    pruned = materialize(enc, gates)
    n_mat = sum(p.numel() for p in pruned.parameters())
    assert PruningGates.count_from_gates(gates_mod.structure, gates) == n_mat
    assert n_mat < sum(p.numel() for p in enc.parameters())
    torch.manual_seed(3)
    wav = 0.1 * torch.randn(2, 12000)
    lens = torch.tensor([12000, 9000])
    with torch.no_grad():
        a = enc(wav, lens, gates=gates)
        b = pruned(wav, lens)
    assert torch.equal(a.lengths, b.lengths)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", ["tiny_hubert", "tiny_wav2vec2", "tiny_wavlm"])
def test_tiny_presets_prune_and_materialise(preset):
    torch.manual_seed(0)
    enc = build_encoder(preset).eval()
    gates_mod, gates = random_hard_gates(enc, seed=7)
    pruned = materialize(enc, gates)
    assert PruningGates.count_from_gates(gates_mod.structure, gates) == sum(p.numel() for p in pruned.parameters())
    wav = 0.1 * torch.randn(2, 6000)
    lens = torch.tensor([6000, 4000])
    with torch.no_grad():
        a, b = enc(wav, lens, gates=gates), pruned(wav, lens)
    assert max((x - y).abs().max().item() for x, y in zip(a.hidden_states, b.hidden_states)) < 1e-5


def test_expected_params_all_kept_equals_teacher_and_is_differentiable():
    enc = micro("wavlm")
    g = PruningGates(enc)
    with torch.no_grad():
        for p in g.log_alpha_parameters():
            p.fill_(30.0)  # P(keep) = 1 up to float precision
    n = sum(p.numel() for p in enc.parameters())
    assert abs(float(g.expected_num_params().detach()) - n) < 1e-3 * n
    assert g.structure.total_params == n
    with torch.no_grad():
        for p in g.log_alpha_parameters():
            p.fill_(0.0)
    g.expected_num_params().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.log_alpha_parameters())


def test_all_units_dropped_removes_blocks():
    enc = micro("hubert")
    g = PruningGates(enc).eval()
    with torch.no_grad():
        g.heads["1"].log_alpha.fill_(-20.0)   # every head of layer 1 dropped -> attention block removed
        g.ffn["2"].log_alpha.fill_(-20.0)     # FFN block of layer 2 dropped
    gates = g()
    assert float(gates.attn[1]) == 0.0  # mirrored on the block gate so gated == materialised
    pruned = materialize(enc, gates)
    assert pruned.config.layer_heads[1] == [] and pruned.config.layer_ffn_dims[2] == 0
    assert pruned.layers[1].attention is None and pruned.layers[2].feed_forward is None
    assert PruningGates.count_from_gates(g.structure, gates) == sum(p.numel() for p in pruned.parameters())


def test_wavlm_keeps_original_head_indices_and_reloads(tmp_path):
    from speechssl.models.io import export_pretrained, load_pretrained

    enc = micro("wavlm")
    g = PruningGates(enc, groups=["heads"]).eval()
    with torch.no_grad():
        for l in range(3):
            g.heads[str(l)].log_alpha.copy_(torch.tensor([8.0, -20.0, 8.0, -20.0]))
    gates = g()
    pruned = materialize(enc, gates)
    assert pruned.config.layer_heads == [[0, 2]] * 3
    export_pretrained(pruned, tmp_path / "m", format="speechssl")
    again = load_pretrained(tmp_path / "m")
    assert again.config.layer_heads == [[0, 2]] * 3
    # second round: prune the pruned model, indices stay ORIGINAL
    g2 = PruningGates(again, groups=["heads"]).eval()
    with torch.no_grad():
        for l in range(3):
            g2.heads[str(l)].log_alpha.copy_(torch.tensor([-20.0, 8.0]))
    twice = materialize(again, g2())
    assert twice.config.layer_heads == [[2]] * 3
    wav = 0.1 * torch.randn(1, 8000)
    with torch.no_grad():
        x = again(wav, gates=g2()).hidden_states[-1]
        y = twice(wav).hidden_states[-1]
    assert (x - y).abs().max().item() < 1e-5


def test_materialised_layer_norm_model_is_batch_invariant():
    enc = micro("wav2vec2", extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True)
    _, gates = random_hard_gates(enc, seed=2)
    pruned = materialize(enc, gates)
    torch.manual_seed(5)
    w1, w2 = 0.1 * torch.randn(11000), 0.1 * torch.randn(16000)
    batch = torch.zeros(2, 16000)
    batch[0, :11000], batch[1] = w1, w2
    with torch.no_grad():
        both = pruned(batch, torch.tensor([11000, 16000]))
        alone = pruned(w1[None], torch.tensor([11000]))
    n = int(alone.lengths[0])
    assert int(both.lengths[0]) == n
    for x, y in zip(both.hidden_states, alone.hidden_states):
        assert (x[0, :n] - y[0, :n]).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------ sparsity control
def test_lagrangian_drives_expected_sparsity_to_target():
    """The sparsity term alone (no distillation) settles at the target: the multipliers do gradient ascent."""
    teacher = micro("hubert", num_layers=2)
    st = PruneSettings(target=0.4, warmup_steps=100, gate_lr=0.02, lambda_lr=0.02)
    m = PruneDistiller(copy.deepcopy(teacher), teacher, student_layers=[0, 2], target=st.target,
                       warmup_steps=st.warmup_steps)
    oc = OptimConfig(lr=1e-3, weight_decay=0.0)
    opt = build_optimizer(prune_param_groups(m, oc, st), oc)
    lam = []
    for step in range(600):
        m.set_step(step)
        loss, logs = m.sparsity_term()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lam.append(logs["lambda1"])
    assert abs(logs["sparsity"] - 0.4) < 0.02
    assert min(lam) < -0.1  # lambda1 went negative while sparsity lagged (ascent on s - t < 0)


def test_prune_distiller_reaches_target_and_materialises():
    teacher = micro("hubert", num_layers=2)
    st = PruneSettings(target=0.45, warmup_steps=40, gate_lr=0.05, lambda_lr=0.05)
    torch.manual_seed(0)
    m = PruneDistiller(copy.deepcopy(teacher).train(), teacher, student_layers=[0, 1, 2], target=st.target,
                       warmup_steps=st.warmup_steps)
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen
    oc = OptimConfig(lr=1e-3, weight_decay=0.0)
    opt = build_optimizer(prune_param_groups(m, oc, st), oc)
    wav = 0.1 * torch.randn(2, 8000)
    lens = torch.tensor([8000, 6000])
    best = 0.0
    for step in range(130):
        m.set_step(step)
        out = m({"audio": wav, "audio_lens": lens})
        loss, logs = out.loss, out.logs
        opt.zero_grad()
        loss.backward()
        opt.step()
        best = max(best, logs["sparsity"])
    assert best >= 0.45 - 0.02  # the expected sparsity reached the target
    assert all(p.grad is None for p in teacher.parameters())
    m.eval()
    pruned = materialize(m.student, m.gates())
    n = sum(p.numel() for p in pruned.parameters())
    assert 1 - n / m.teacher_params > 0.3
    assert PruningGates.count_from_gates(m.gates.structure, m.gates()) == n
