"""Every SUPERB head trains on a tiny synthetic set (FBANK upstream) and beats chance by a clear margin."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from speechssl.superb.cache import Example, FeatureSource
from speechssl.superb.tasks import HeadConfig, build_task, make_trials
from speechssl.superb.train import LoopConfig, SuperbConfig, bucket_batches, carve_dev, class_weights, train_trial
from speechssl.superb.upstream import FbankUpstream

SR = 16000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


BANDS = [(200, 500), (700, 1300), (1800, 2800), (3500, 5500), (6000, 7500)]


def band_noise(band, n, rng):
    """White noise band-limited to ``band`` Hz (FFT mask): [n]."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[(f < band[0]) | (f > band[1])] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def bursts(symbols, seed, burst=0.12, gap=0.04, jitter=0.1):
    """One band-noise burst per symbol (an index into BANDS) separated by near-silence: [N] float32."""
    rng = np.random.default_rng(seed)
    parts = []
    for k in symbols:
        n = int(burst * SR * rng.uniform(1 - jitter, 1 + jitter))
        parts.append(0.3 * band_noise(BANDS[k], n, rng))
        parts.append(np.zeros(int(gap * SR)))
    wav = np.concatenate(parts)
    return (wav + 0.01 * rng.standard_normal(len(wav))).astype(np.float32)


def class_examples(n_per_class, classes, seed0, prefix="u"):
    out = []
    for c in range(classes):
        for k in range(n_per_class):
            s = seed0 + 1000 * c + k
            wav = bursts([c] * 3, s)
            out.append(Example(id=f"{prefix}{c}-{k}", num_samples=len(wav), label=f"class{c}", audio=wav))
    return out


def cfg_for(task, steps=60, lr=5e-3, **head):
    cfg = SuperbConfig(task=task, trainer=LoopConfig(progress=False, seed=0))
    cfg.trainer.max_steps, cfg.trainer.eval_every, cfg.trainer.log_every, cfg.optim.lr = steps, steps // 2, 20, lr
    cfg.data.max_duration = 4.0
    cfg.head = HeadConfig(**{"proj_dim": 32, "hidden": 32, "num_layers": 1, "dropout": 0.0, **head})
    return cfg


@pytest.mark.parametrize("name", ["sid", "ks"])
def test_classification_heads_beat_chance(name, tmp_path):
    train, dev = class_examples(8, 4, 0), class_examples(4, 4, 500, "d")
    cfg = cfg_for(name)
    task = build_task(name, cfg.head)
    task.fit(train, tmp_path)
    src = FeatureSource(FbankUpstream(), cache=True, progress=False)
    summary, _ = train_trial(task, src, train, dev, cfg, 5e-3, tmp_path / "t", {"lr": 5e-3})
    assert summary["best_dev"] >= 0.75, summary  # chance: 0.25
    assert (tmp_path / "t" / "best.safetensors").exists() and (tmp_path / "t" / "metrics.jsonl").exists()
    assert task.balanced == (name == "ks")


def test_asv_head_beats_chance(tmp_path):
    train = class_examples(8, 5, 0)
    held = class_examples(3, 5, 700, "h")
    trials = make_trials(held, max_trials=200, seed=0)
    assert {t[0] for t in trials} == {0, 1}
    cfg = cfg_for("asv", steps=60, tdnn_channels=[32, 32, 64], tdnn_kernels=[3, 3, 1], tdnn_dilations=[1, 2, 1],
                  embed_dim=32)
    task = build_task("asv", cfg.head, p_target=0.05)
    task.fit(train, tmp_path)
    src = FeatureSource(FbankUpstream(), cache=True, progress=False)
    summary, _ = train_trial(task, src, train, held, cfg, 5e-3, tmp_path / "t", {"lr": 5e-3},
                             dev_context={"trials": trials})
    assert summary["best_dev"] <= 0.2, summary  # chance: 0.5
    assert 0.0 <= summary["dev"]["min_dcf"] <= 1.0 + 1e-9


SYMS = "abcd"


def seq_examples(n, seed0, prefix):
    rng = np.random.default_rng(seed0)
    out = []
    for k in range(n):
        seq = [int(i) for i in rng.integers(0, 4, size=int(rng.integers(2, 5)))]
        wav = bursts(seq, seed0 + k, burst=0.1, gap=0.05)
        out.append(Example(id=f"{prefix}{k}", num_samples=len(wav), label=" ".join(SYMS[i] for i in seq),
                           audio=wav))
    return out


def plain_fbank():
    # per-utterance variance normalisation blows the flat noise floor of bands a synthetic utterance never
    # uses up to unit variance, which drowns single-frame decisions; the CTC heads are tested without it
    return FeatureSource(FbankUpstream(cmvn=False), cache=True, progress=False)


def test_pr_head_beats_chance(tmp_path):
    train, dev = seq_examples(40, 0, "t"), seq_examples(12, 99, "d")
    cfg = cfg_for("pr", steps=120, lr=1e-2)
    task = build_task("pr", cfg.head)
    task.fit(train, tmp_path)
    src = plain_fbank()
    summary, _ = train_trial(task, src, train, dev, cfg, 1e-2, tmp_path / "t", {"lr": 1e-2})
    assert summary["best_dev"] < 0.2, summary  # an empty output scores 1.0


@pytest.mark.parametrize("frame_ms", [0.0, 20.0])  # 20 ms: pairs of 10 ms FBANK frames stacked
def test_asr_head_beats_chance(tmp_path, frame_ms):
    train, dev = seq_examples(40, 0, "t"), seq_examples(12, 99, "d")
    for e in train + dev:  # characters without spaces: "A B" -> "AB"
        e.label = e.label.replace(" ", "").upper()
    cfg = cfg_for("asr", steps=200, lr=1e-2, hidden=64, frame_ms=frame_ms)
    task = build_task("asr", cfg.head, specaug=cfg.specaug)
    task.fit(train, tmp_path)
    assert task.tokenizer.vocab_size == 2 + 4
    src = plain_fbank()
    summary, _ = train_trial(task, src, train, dev, cfg, 1e-2, tmp_path / "t", {"lr": 1e-2})
    # word = whole symbol string, so WER is strict; CER shows the per-symbol skill
    assert summary["dev"]["cer"] < 0.6, summary  # an empty output scores 1.0
    assert summary["best_dev"] < 1.0


def test_bucket_batches_respect_budget_and_cover_everything():
    lengths = [1000, 5000, 3000, 8000, 2000, 7000, 4000, 6000]
    rng = np.random.default_rng(0)
    batches = bucket_batches(lengths, 12000, num_buckets=2, rng=rng)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) * len(b) <= 12000 or len(b) == 1 for b in batches)
    assert bucket_batches(lengths, 12000) == bucket_batches(lengths, 12000)  # eval order is deterministic


def test_class_balanced_sampling():
    ex = [Example(id=str(i), num_samples=1000, label="a" if i < 90 else "b") for i in range(100)]
    rng = np.random.default_rng(0)
    counts = {"a": 0, "b": 0}
    for _ in range(20):
        for b in bucket_batches([e.num_samples for e in ex], 10000, 2, rng, class_weights(ex)):
            for i in b:
                counts[ex[i].label] += 1
    frac_b = counts["b"] / sum(counts.values())
    assert 0.4 < frac_b < 0.6  # balanced, although b is only 10% of the data


def test_carve_dev():
    ex = [Example(id=f"{s}-{i}", num_samples=1000, label=f"spk{s}") for s in range(10) for i in range(4)]
    train, dev = carve_dev(ex, 0.2, seed=0, by_label=True)
    assert len({e.label for e in dev}) == 2 and not ({e.label for e in dev} & {e.label for e in train})
    assert len(train) + len(dev) == len(ex)
    train, dev = carve_dev(ex, 0.25, seed=0)
    assert len(dev) == 10 and not ({e.id for e in dev} & {e.id for e in train})
    with pytest.raises(ValueError, match="dev_fraction"):
        carve_dev(ex[:12], 0.5, seed=0, by_label=True)


def test_ctc_head_frame_stacking():
    from speechssl.superb.heads import CTCHead

    torch.manual_seed(0)
    head = CTCHead(5, 7, proj_dim=8, hidden=8, num_layers=1, dropout=0.0, stack=4).eval()
    x = torch.randn(2, 10, 5)
    x[1, 7:] = 0  # padding is zero past each utterance's end (cache / featurizer)
    lengths = torch.tensor([10, 7])
    out = head(x, lengths)
    assert out.shape == (2, 3, 7) and head.output_lengths(lengths).tolist() == [3, 2]
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 3))
    # an utterance gives the same output alone as padded in a batch
    alone = head(x[1:2, :7], lengths[1:])
    torch.testing.assert_close(alone[0, :2], out[1, :2])
    with pytest.raises(ValueError, match="stack"):
        CTCHead(5, 7, stack=0)


def test_asr_frame_ms_gives_the_same_shift_for_every_upstream(tmp_path):
    task = build_task("asr", HeadConfig(proj_dim=8, hidden=8, num_layers=1, frame_ms=40.0))
    task.fit([Example(id="a", num_samples=1, label="AB C")], tmp_path)
    assert task.tokenizer.vocab_size == 2 + 4
    stacks = {rate: task.build_head(6, rate).body.stack for rate in (160, 320, 640)}
    assert stacks == {160: 4, 320: 2, 640: 1}  # FBANK 10 ms, CNN encoders 20 ms, fbank encoders 40 ms
    assert task.build_head(6).body.stack == 1
    task.head_cfg.frame_ms = 0.0
    assert task.build_head(6, 160).body.stack == 1


def test_clip_norm_zero_means_no_clipping(tmp_path):
    """trainer.clip_norm as in the pretraining trainer: 0 leaves gradients alone (the norm is still logged)."""
    import json

    train, dev = class_examples(3, 2, 0), class_examples(1, 2, 500, "d")
    states = {}
    for clip in (0.0, 1e9, 1e-3):
        cfg = cfg_for("sid", steps=3)
        cfg.trainer.clip_norm, cfg.trainer.log_every = clip, 1
        task = build_task("sid", cfg.head)
        task.fit(train, tmp_path)
        src = FeatureSource(FbankUpstream(), cache=True, progress=False)
        _, states[clip] = train_trial(task, src, train, dev, cfg, 5e-3, tmp_path / f"t{clip}", {"lr": 5e-3})
        norms = [x["grad_norm"] for x in map(json.loads, (tmp_path / f"t{clip}" / "metrics.jsonl").open())
                 if "grad_norm" in x]
        assert len(norms) == 3 and min(norms) > 1e-3
    assert all(torch.equal(states[0.0][k], states[1e9][k]) for k in states[0.0])
    assert not all(torch.equal(states[0.0][k], states[1e-3][k]) for k in states[0.0])
