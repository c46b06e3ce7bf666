"""Featurizer, upstream wrappers (frozen / adapter / LoRA / FBANK / MFCC) and the hidden-state cache."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from speechssl.superb.cache import Example, FeatureSource
from speechssl.superb.featurizer import Featurizer, cut_to_frames
from speechssl.superb.loop import Downstream, _trainable_state, load_trial_state
from speechssl.superb.tasks import HeadConfig, build_task
from speechssl.superb.upstream import (AdaptedLayer, BottleneckAdapter, EncoderUpstream, FbankUpstream, LoRALinear,
                                       MfccUpstream, build_upstream)


class FakeLayer(nn.Module):
    """A transformer layer's contract: ``layer(h, ...) -> (h, attention or None)``."""

    def __init__(self):
        super().__init__()
        self.ff = nn.Linear(8, 8)

    def forward(self, h, key_mask=None):
        return torch.tanh(self.ff(h)), None


class FakeEncoder(nn.Module):
    """The Encoder interface in miniature: strided conv front end, a `layers` stack, dropout, num_frames."""

    num_layers, hidden_size, downsample_rate = 2, 8, 160

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 400, stride=160)
        self.layers = nn.ModuleList([FakeLayer() for _ in range(2)])
        self.drop = nn.Dropout(0.5)

    def num_frames(self, num_samples):
        return torch.div(torch.as_tensor(num_samples).long() - 400, 160, rounding_mode="floor") + 1

    def forward(self, wav, lengths=None):
        h = self.drop(self.conv(wav[:, None]).transpose(1, 2))
        states = [h]
        for layer in self.layers:
            h, _ = layer(h, None)
            states.append(h)
        return SimpleNamespace(hidden_states=states, lengths=None)


def test_featurizer_weights_sum_to_one_and_get_gradients_frozen_upstream_none():
    torch.manual_seed(0)
    up = EncoderUpstream(FakeEncoder(), mode="frozen")
    feat = Featurizer(up.num_states)
    assert torch.equal(feat.weights.detach(), torch.zeros(3))
    assert float(feat.layer_weights().detach().sum()) == pytest.approx(1.0)
    up.train(True)
    wav, lens = torch.randn(2, 8000), torch.tensor([8000, 6001])
    states, frames = up(wav, lens)
    out = feat(states)
    (out ** 2).mean().backward()
    assert feat.weights.grad is not None and float(feat.weights.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in up.encoder.parameters())
    # frozen = eval mode even when the downstream trains: dropout off, identical outputs
    s2, _ = up(wav, lens)
    assert all(torch.equal(a, b) for a, b in zip(states, s2))
    assert up.upstream_params() == sum(p.numel() for p in up.encoder.parameters())


def test_single_layer_option():
    f = Featurizer(3, layer=1)
    states = [torch.full((1, 4, 2), float(i)) for i in range(3)]
    assert torch.equal(f(states), states[1])
    assert f.layer_weights().tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="layer"):
        Featurizer(3, layer=5)


def test_weighted_sum_is_the_average_at_init():
    f = Featurizer(3)
    states = [torch.full((1, 2, 2), float(i)) for i in range(3)]
    assert torch.allclose(f(states), torch.full((1, 2, 2), 1.0))


@pytest.mark.parametrize("lengths", [[16001, 12345], [7777, 3201]])
def test_frame_cutting_odd_lengths_real_encoder(lengths):
    from speechssl.models.encoder import build_encoder

    enc = build_encoder("tiny_hubert").eval()
    up = EncoderUpstream(enc)
    wav = torch.randn(2, max(lengths)) * 0.1
    states, frames = up(wav, torch.tensor(lengths))
    expect = enc.num_frames(torch.tensor(lengths)).tolist()  # the encoder's own count: conv arithmetic
    assert frames.tolist() == expect
    assert enc.num_frames(torch.tensor([16000])).tolist() == [49]  # the receptive field: not 16000 // 320
    assert all(s.shape == (2, max(expect), enc.hidden_size) for s in states)
    assert len(states) == enc.num_layers + 1
    # the longest input's states are what the encoder computed, uncut and unpadded
    full = enc(wav, torch.tensor(lengths)).hidden_states
    assert full[0].shape[1] == max(expect) and torch.equal(states[-1], full[-1])


def test_cut_to_frames_rules():
    h = torch.randn(2, 10, 3)
    (cut,) = cut_to_frames([h], torch.tensor([8, 5]))
    assert cut.shape == (2, 8, 3) and torch.equal(cut, h[:, :8])
    with pytest.raises(ValueError, match="num_frames"):
        cut_to_frames([h], torch.tensor([11, 5]))
    assert FbankUpstream().num_frames(torch.tensor([16001, 159])).tolist() == [100, 0]


def test_fbank_and_mfcc_upstreams(synthetic_wav):
    wavs = [synthetic_wav(16001, seed=1), synthetic_wav(9999, seed=2)]
    wav = torch.zeros(2, 16001)
    wav[0], wav[1, :9999] = torch.from_numpy(wavs[0]), torch.from_numpy(wavs[1])
    lens = torch.tensor([16001, 9999])
    fb = FbankUpstream()
    (x,), frames = fb(wav, lens)
    assert fb.hidden_size == 240 and x.shape == (2, 100, 240) and frames.tolist() == [100, 62]
    assert fb.num_states == 1 and fb.downsample_rate == 160 and fb.upstream_params() == 0
    # CMVN over the valid frames; padding stays zero
    assert x[1, :62].mean(0).abs().max() < 1e-4
    assert x[1, :62].std(0, unbiased=False).mean() == pytest.approx(1.0, abs=0.05)
    assert float(x[1, 62:].abs().sum()) == 0.0
    # batching does not change an item's features
    (x1,), _ = fb(wav[1:, :9999], lens[1:])
    assert torch.allclose(x1[0], x[1, :62], atol=1e-5)
    mf = MfccUpstream()
    (m,), mframes = mf(wav, lens)
    assert m.shape == (2, 100, 39) and mf.hidden_size == 39 and mframes.tolist() == [100, 62]
    assert isinstance(build_upstream("fbank"), FbankUpstream)
    with pytest.raises(FileNotFoundError, match="upstream"):
        build_upstream("/no/such/model")


@pytest.mark.parametrize("mode", ["adapter", "lora"])
def test_parameter_efficient_modes(mode):
    torch.manual_seed(0)
    enc = FakeEncoder()
    ref = EncoderUpstream(FakeEncoder(), mode="frozen")
    ref.encoder.load_state_dict(enc.state_dict())
    up = EncoderUpstream(enc, mode=mode, adapter_dim=4, lora_rank=2)
    wav, lens = torch.randn(2, 4000), torch.tensor([4000, 3000])
    a, _ = ref(wav, lens)
    b, _ = up(wav, lens)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))  # zero-initialised: starts as frozen
    trainable = [n for n, p in up.named_parameters() if p.requires_grad]
    kind = BottleneckAdapter if mode == "adapter" else LoRALinear
    assert trainable and any(isinstance(m, kind) for m in up.modules())
    assert all((".adapter." in n) if mode == "adapter" else ("lora_" in n) for n in trainable)
    if mode == "adapter":  # each encoder.layers[i] is wrapped explicitly
        assert all(isinstance(layer, AdaptedLayer) for layer in up.encoder.layers)
    up.train(True)
    assert not up.encoder.drop.training  # the encoder itself stays in eval mode
    states, _ = up(wav, lens)
    states[-1].pow(2).mean().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in up.parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in up.named_parameters() if not p.requires_grad)


def test_finetune_mode_trains_encoder():
    up = EncoderUpstream(FakeEncoder(), mode="finetune")
    up.train(True)
    assert up.encoder.training and all(p.requires_grad for p in up.encoder.parameters())
    with pytest.raises(ValueError, match="upstream_mode"):
        EncoderUpstream(FakeEncoder(), mode="bogus")


def test_adapter_and_lora_need_the_encoder_layers():
    class NoLayers(FakeEncoder):
        def __init__(self):
            super().__init__()
            self.blocks = self.layers
            del self.layers

    for mode in ("adapter", "lora"):
        with pytest.raises(ValueError, match="`layers` ModuleList of num_layers=2"):
            EncoderUpstream(NoLayers(), mode=mode)


@pytest.mark.parametrize("mode", ["adapter", "lora", "finetune"])
def test_trained_upstream_state_reloads_into_a_fresh_upstream(mode, tmp_path):
    """The best-checkpoint reload of SUPERB test scoring: the trainable upstream tensors saved by a trial load
    into a freshly built upstream of the same config (same keys) and give the same hidden states."""
    from speechssl.models.encoder import build_encoder
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = build_encoder("tiny_hubert", num_layers=2).eval()

    def fresh():  # the loaded model, then wrapped (as build_upstream does)
        enc = build_encoder("tiny_hubert", num_layers=2).eval()
        enc.load_state_dict(base.state_dict())
        return EncoderUpstream(enc, mode=mode, adapter_dim=8, lora_rank=4)

    up, again = fresh(), fresh()
    task = build_task("sid", HeadConfig(proj_dim=8))
    task.classes = ["a", "b"]
    model = Downstream.build(task, up, None, False)
    with torch.no_grad():  # as if trained: every trainable tensor moves
        for p in list(up.parameters()) + list(model.parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    state = _trainable_state(model, up)
    assert any(k.startswith("upstream.encoder.layers.") for k in state)
    save_file(state, str(tmp_path / "best.safetensors"))
    model2 = Downstream.build(task, again, None, False)
    load_trial_state(model2, again, load_file(str(tmp_path / "best.safetensors")))
    wav, lens = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 6500])
    up.eval(), again.eval()
    with torch.no_grad():
        a, b = up(wav, lens)[0], again(wav, lens)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="unknown upstream keys"):
        load_trial_state(model2, again, {**state, "upstream.encoder.nope": torch.zeros(1)})


def _examples(synthetic_wav, n=5):
    return [Example(id=f"u{i}", num_samples=4000 + 997 * i, audio=synthetic_wav(4000 + 997 * i, seed=i))
            for i in range(n)]


def test_cache_identical_to_no_cache(synthetic_wav, tmp_path):
    ex = _examples(synthetic_wav)
    up = FbankUpstream()
    direct = FeatureSource(up, cache=False)
    mem = FeatureSource(up, cache=True, batch_seconds=0.6)
    disk = FeatureSource(up, cache=True, memory=False, cache_dir=tmp_path / "c")
    mem.prepare(ex)
    disk.prepare(ex)
    batch = [ex[3], ex[0], ex[4]]
    s0, f0 = direct.states(batch)
    for src in (mem, disk):
        s, f = src.states(batch)
        assert torch.equal(f, f0) and torch.equal(s, s0)
    # a fresh source over the same directory reads the stored states back without the upstream
    again = FeatureSource(up, cache=True, memory=False, cache_dir=tmp_path / "c")
    assert torch.equal(again.states(batch)[0], s0) and again.frames_cached == 0
    for _ in range(3):
        mem.states(ex)
    stats = mem.cache_stats()
    assert stats["enabled"] and stats["passes"] > 3 and stats["frames_cached"] == sum(
        int(e.num_samples // 160) for e in ex)


def test_cache_training_crop(synthetic_wav):
    ex = _examples(synthetic_wav, 2)
    src = FeatureSource(FbankUpstream(), cache=True)
    s, f = src.states(ex, crop_frames=20, rng=np.random.default_rng(0))
    assert f.tolist() == [20, 20] and s.shape[2] == 20
    nc = FeatureSource(FbankUpstream(), cache=False)
    s2, f2 = nc.states(ex, crop_frames=20, rng=np.random.default_rng(0))
    assert f2.tolist() == [20, 20]


def test_cache_disabled_for_trainable_upstream():
    src = FeatureSource(EncoderUpstream(FakeEncoder(), mode="finetune"), cache=True)
    assert not src.cache


@pytest.mark.parametrize("mode", ["adapter", "lora"])
def test_parameter_efficient_modes_real_encoder(mode):
    from speechssl.models.encoder import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny_hubert").eval()
    ref = build_encoder("tiny_hubert").eval()
    ref.load_state_dict(enc.state_dict())
    up = EncoderUpstream(enc, mode=mode, adapter_dim=8, lora_rank=4)
    wav, lens = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 6500])
    with torch.no_grad():
        a = ref(wav, lens).hidden_states
    b, frames = up(wav, lens)
    assert all(torch.allclose(x, y[:, : x.shape[1]], atol=1e-5) for x, y in zip(a, b))
    up.train(True)
    feat = Featurizer(up.num_states)
    b, _ = up(wav, lens)
    feat(b).pow(2).mean().backward()
    trainable = {n for n, p in up.named_parameters() if p.requires_grad}
    assert trainable and all((".adapter." in n) or ("lora_" in n) for n in trainable)
    assert sum(1 for n, p in up.named_parameters() if p.requires_grad and p.grad is not None) > 0
    assert all(p.grad is None for n, p in up.named_parameters() if not p.requires_grad)
    assert up.upstream_params() == sum(p.numel() for p in ref.parameters())


# ---------------------------------------------------------------------------------- random-init control upstream
def _saved_tiny_model(tmp_path):
    """A 2-layer tiny HuBERT written as a speechssl model dir ``tmp/exp/hub/final``: (path, loaded encoder)."""
    from speechssl.models import build_encoder, export_pretrained

    torch.manual_seed(123)
    enc = build_encoder("tiny_hubert", num_layers=2)
    with torch.no_grad():  # weights unlike any fresh init, so "different weights" cannot pass by luck
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "exp" / "hub" / "final"
    export_pretrained(enc, path)
    return str(path)


def test_random_upstream_of_model_dir_same_architecture_fresh_weights(tmp_path):
    path = _saved_tiny_model(tmp_path)
    trained = build_upstream(path)
    rand = build_upstream("random:" + path)
    assert rand.name == "random_hub" and rand.frozen and not rand.encoder.training
    for attr in ("num_states", "hidden_size", "downsample_rate"):
        assert getattr(rand, attr) == getattr(trained, attr)
    assert rand.upstream_params() == trained.upstream_params()
    assert rand.encoder.config.to_dict() == trained.encoder.config.to_dict()
    a, b = trained.encoder.state_dict(), rand.encoder.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    differ = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert len(differ) > len(a) // 2
    wav, lens = torch.randn(2, 6400) * 0.1, torch.tensor([6400, 4800])
    (s1, f1), (s2, f2) = trained(wav, lens), rand(wav, lens)
    assert torch.equal(f1, f2) and [s.shape for s in s1] == [s.shape for s in s2]
    assert not torch.allclose(s1[-1], s2[-1])


def test_random_upstream_keeps_input_statistics_redraws_parameters(tmp_path):
    """The control of an fbank model with corpus input statistics sees its input as the model does."""
    from speechssl.models import build_encoder, export_pretrained
    from speechssl.superb.cache import upstream_fingerprint

    torch.manual_seed(5)
    enc = build_encoder("small_hubert", num_layers=2)
    enc.feature_extractor.set_input_stats(torch.linspace(-5, 1, 80), torch.linspace(1, 3, 80))
    path = tmp_path / "small" / "final"
    export_pretrained(enc, path)
    rand = build_upstream(f"random:{path}").encoder
    assert torch.equal(rand.feature_extractor.input_mean, torch.linspace(-5, 1, 80))
    assert torch.equal(rand.feature_extractor.input_std, torch.linspace(1, 3, 80))
    assert not torch.equal(rand.feature_projection.projection.weight, enc.feature_projection.projection.weight)
    key = upstream_fingerprint(f"random:{path}")
    assert upstream_fingerprint(f"random:{path}") == key
    enc.feature_extractor.set_input_stats(torch.zeros(80), torch.ones(80))  # new statistics: a new cache key
    import shutil

    shutil.rmtree(path)
    export_pretrained(enc, path)
    assert upstream_fingerprint(f"random:{path}") != key


def test_random_upstream_is_deterministic_and_leaves_global_rng(tmp_path):
    path = _saved_tiny_model(tmp_path)
    wav, lens = torch.randn(2, 4000) * 0.1, torch.tensor([4000, 3000])
    torch.manual_seed(7)
    before = torch.get_rng_state()
    one = build_upstream("random:" + path)
    assert torch.equal(torch.get_rng_state(), before)  # head init and crops downstream are not shifted
    two = build_upstream("random:" + path)
    other = build_upstream("random:" + path, seed=1)
    (s1, _), (s2, _), (s3, _) = one(wav, lens), two(wav, lens), other(wav, lens)
    assert all(torch.equal(x, y) for x, y in zip(s1, s2))
    assert not torch.allclose(s1[-1], s3[-1])


def test_random_upstream_from_preset_and_yaml():
    from pathlib import Path

    up = build_upstream("random:tiny_hubert")
    assert up.name == "random_tiny_hubert" and up.num_states == 5 and up.hidden_size == 256
    yaml_path = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny_hubert.yaml"
    same = build_upstream(f"random:{yaml_path}")
    assert same.name == "random_tiny_hubert"
    base = up.encoder.state_dict()
    assert all(torch.equal(base[k], v) for k, v in same.encoder.state_dict().items())  # same config + seed
    lora = build_upstream("random:tiny_hubert", mode="lora", lora_rank=2)  # the modes apply as to any encoder
    assert lora.mode == "lora" and any(isinstance(m, LoRALinear) for m in lora.modules())


@pytest.mark.parametrize("spec", ["random:no_such_preset", "random:", "random:/no/such/dir/final"])
def test_random_upstream_bad_spec(spec):
    from speechssl.config import ConfigError

    with pytest.raises(ConfigError, match="config key upstream") as e:
        build_upstream(spec)
    assert spec in str(e.value) and e.value.__cause__ is None


def test_random_upstream_names_and_cache_keys(tmp_path):
    from speechssl.superb.cache import upstream_fingerprint
    from speechssl.superb.report import upstream_label

    assert upstream_label("random:exp/hubert/final") == "random_hubert"
    assert upstream_label("random:exp/hubert/final/") == "random_hubert"
    assert upstream_label("random:conf/model/tiny_wavlm.yaml") == "random_tiny_wavlm"
    assert upstream_label("random:tiny_hubert") == "random_tiny_hubert"
    path = _saved_tiny_model(tmp_path)
    keys = {upstream_fingerprint(path), upstream_fingerprint("random:" + path),
            upstream_fingerprint("random:" + path, seed=1), upstream_fingerprint("random:tiny_hubert")}
    assert len(keys) == 4  # never a pretrained model's states, nor another seed's or architecture's
    assert upstream_fingerprint("random:" + path) == upstream_fingerprint("random:" + path, seed=0)
