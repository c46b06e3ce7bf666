"""UniSpeech: labeled cuts mixed into training by ``data.labeled`` (flags, CTC targets, no crop, exact resume),
the CTC + contrastive loss learning, CTC gradients reaching the codebook only through the replacement of context
vectors by quantized latents, the replacement count by hand, and exact resume through ``speechssl pretrain``."""
from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch
from _objective_checks import assert_resume_exact
from conftest import make_wav
from test_pretrain import CNN_SMALL, _cfg, manifest  # noqa: F401  (manifest is a fixture)

from speechssl.config import ConfigError
from speechssl.data.loader import DataConfig, build_dataset, build_loader
from speechssl.models import build_encoder
from speechssl.models.objectives import build_objective

PHONES = ["a b c", "b c d e", "a a d", "e d c b a", "c", "d e"]
ENC = {**CNN_SMALL, "dropout": 0.0, "attention_dropout": 0.0, "feature_dropout": 0.0}


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    """6 cuts of 1.0-1.5 s with phone transcripts (vocabulary a..e -> ids 1..5)."""
    from lhotse import CutSet, Recording, SupervisionSegment

    d = tmp_path_factory.mktemp("labeled")
    cuts = []
    for i, ph in enumerate(PHONES):
        n = 16000 + 1600 * i
        sf.write(d / f"lab{i}.wav", make_wav(n, seed=100 + i), 16000)
        cut = Recording.from_file(d / f"lab{i}.wav", recording_id=f"lab{i}").to_cut()
        cut.supervisions = [SupervisionSegment(f"lab{i}", f"lab{i}", 0.0, cut.duration, text="x",
                                               custom={"phones": ph})]
        cuts.append(cut)
    path = d / "cuts_labeled.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def _loader(manifest, labeled, **kw):  # noqa: F811
    cfg = DataConfig(train=[str(manifest)], labeled=[str(labeled)], max_duration=4.0, num_buckets=2, **kw)
    cfg.validate()
    enc = build_encoder("tiny_wav2vec2", **CNN_SMALL)
    ds = build_dataset(cfg, num_frames=enc.num_frames, downsample_rate=enc.downsample_rate, seed=0, train=True)
    return build_loader(cfg, ds, seed=0, rank=0, world_size=1)


def test_loader_mixes_labeled_cuts_with_flags_and_whole_transcripts(manifest, labeled):  # noqa: F811
    batches = list(_loader(manifest, labeled, labeled_ratio=0.5))
    ids = [i for b in batches for i in b["cut_ids"]]
    assert sum(i.startswith("utt") for i in ids) == 12  # one pass over the unlabeled cuts is the epoch
    n_lab = sum(i.startswith("lab") for i in ids)
    assert n_lab >= 4  # ratio 0.5: about one labeled cut per unlabeled one, drawn until the unlabeled end
    for b in batches:
        for j, cid in enumerate(b["cut_ids"]):
            is_lab = cid.startswith("lab")
            assert bool(b["labeled"][j]) == is_lab
            if is_lab:
                k = int(cid[3])
                want = [" abcde".index(s) for s in PHONES[k].split()]
                assert b["ctc_targets"][j, : b["ctc_lens"][j]].tolist() == want
                assert int(b["audio_lens"][j]) == 16000 + 1600 * k  # never cropped
            else:
                assert int(b["ctc_lens"][j]) == 0


def test_labeled_loader_resumes_exactly(manifest, labeled):  # noqa: F811
    ld = _loader(manifest, labeled)
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    rest = [b["cut_ids"] for b in it]
    ld2 = _loader(manifest, labeled)
    ld2.load_state_dict(state)
    assert [b["cut_ids"] for b in ld2] == rest and rest


def test_labeled_config_errors_name_the_key(manifest, labeled):  # noqa: F811
    with pytest.raises(ConfigError, match="data.labeled_ratio"):
        DataConfig(train=[str(manifest)], labeled=[str(labeled)], labeled_ratio=1.0).validate()
    with pytest.raises(ConfigError, match="data.labeled"):
        DataConfig(shar_dir="x", labeled=[str(labeled)]).validate()


def _objective(**kw):
    torch.manual_seed(0)
    enc = build_encoder("tiny_wav2vec2", **ENC)
    args = dict(vocab_size=6, final_dim=32, num_negatives=10, latent_vars=16, mask_length=3, seed=0)
    return build_objective("unispeech", enc, **{**args, **kw})


def _batch():
    g = torch.Generator().manual_seed(1)
    tg = torch.full((4, 5), -100)
    tg[0] = torch.tensor([1, 2, 3, 4, 5])
    tg[2, :3] = torch.tensor([5, 4, 1])
    return {"audio": torch.randn(4, 16000, generator=g), "audio_lens": torch.tensor([16000, 16000, 8000, 12345]),
            "labeled": torch.tensor([True, False, True, False]), "ctc_targets": tg,
            "ctc_lens": torch.tensor([5, 0, 3, 0])}


def test_replacement_count_by_hand():
    b = _batch()
    # CTC input frames of the labeled utterances: 16000 samples -> 49 frames, 8000 -> 24 (the CNN arithmetic)
    out = _objective(replace_prob=1.0).train()(b)
    assert out.logs["replaced_frames"] == 49 + 24 and out.logs["replaced_fraction"] == 1.0
    assert out.logs["labeled_utts"] == 2
    assert _objective(replace_prob=0.0).train()(b).logs["replaced_fraction"] == 0.0
    assert _objective(replace_prob=1.0).eval()(b).logs["replaced_fraction"] == 0.0  # training only
    # r = 0.5 over the 49 + 24 = 73 labeled frames, seeded: within 4 standard deviations (sd = 4.3) of 36.5
    assert 19 <= _objective(replace_prob=0.5).train()(b).logs["replaced_frames"] <= 54


def test_ctc_reaches_the_codebook_only_through_the_replacement():
    for prob, reaches in ((0.5, True), (0.0, False)):
        obj = _objective(replace_prob=prob, ctc_weight=1.0, diversity_weight=0.0, feature_pen_weight=0.0).train()
        b = _batch()
        b["labeled"][:] = True  # alpha = 1: every utterance's contrastive weight 1 - alpha = 0, only CTC is left
        b["ctc_targets"][1, :2] = torch.tensor([1, 2])
        b["ctc_targets"][3, :1] = torch.tensor([3])
        b["ctc_lens"] = torch.tensor([5, 2, 3, 1])
        obj(b).loss.backward()
        g = obj.quantizer.codevectors.grad
        assert (g is not None and g.abs().sum() > 0) == reaches, prob
        assert obj.ctc_proj.weight.grad.abs().sum() > 0 and obj.encoder.layers[0].attention.qkv.weight.grad is not None
        assert (obj.q2h_proj.weight.grad is not None and obj.q2h_proj.weight.grad.abs().sum() > 0) == reaches


def test_loss_falls_and_both_tasks_learn():
    obj = _objective().train()
    b = _batch()
    opt = torch.optim.Adam(obj.parameters(), lr=2e-3)
    logs = []
    for _ in range(25):
        out = obj(b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        logs.append(out.logs)
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"]
    assert logs[-1]["ctc"] < 0.5 * logs[0]["ctc"]
    assert min(x["contrastive"] for x in logs[-5:]) < logs[0]["contrastive"]


def test_unlabeled_batches_and_bad_vocab():
    obj = _objective().train()
    b = _batch()
    for k in ("labeled", "ctc_targets", "ctc_lens"):
        b.pop(k)
    out = obj(b)  # validation / diagnostics batches carry no labels
    assert out.logs["ctc"] == 0.0 and out.logs["labeled_utts"] == 0
    out.loss.backward()  # the CTC side still gets a (zero) gradient: DDP ranks must reduce the same parameters
    for m in (obj.ctc_proj, obj.q2h_proj):
        assert m.weight.grad is not None and m.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="vocab_size"):
        _objective(vocab_size=3).train()(_batch())


def test_pretrain_with_labeled_data_resumes_exactly(manifest, labeled, tmp_path):  # noqa: F811
    cfg = _cfg(manifest, "wav2vec2", steps=4, data={"max_duration": 3.0, "labeled": [str(labeled)],
                                                    "labeled_ratio": 0.4}, trainer={"ckpt_every": 2})
    cfg.objective.name = "unispeech"
    cfg.objective.kwargs = {**cfg.objective.kwargs, "vocab_size": 6, "mask_length": 3}
    out = tmp_path / "uni"
    assert_resume_exact(cfg, out)
    from speechssl import load_pretrained

    assert load_pretrained(out / "final").num_layers == 2  # a plain encoder: SUPERB and export take it


@pytest.mark.slow
def test_two_processes_train_identically(tmp_path):
    """DDP over 2 gloo processes through the shared trainer on unlabeled batches: the CTC layer stays in the graph
    with a zero gradient, so both ranks reduce the same parameters and end with the same weights."""
    from _objective_checks import assert_ddp_ranks_agree

    kw = {"vocab_size": 8, "final_dim": 32, "num_negatives": 5, "latent_vars": 16, "mask_prob": 0.5, "mask_length": 3}
    assert_ddp_ranks_agree(tmp_path, "unispeech", "tiny_wav2vec2", CNN_SMALL, kw, find_unused=False)
