"""Profiling: params, analytic MACs (cross-checked by hooks), RTF protocol, table, PNG, CLI; the bench's student."""
from __future__ import annotations

import json

import pytest
import torch

from speechssl.compress.materialize import materialize
from speechssl.compress.profile import (
    analytic_macs, count_params, counted_macs, format_table, measure_rtf, plot_structure, profile_models,
)
from speechssl.compress.prune import PruningGates
from speechssl.models import build_encoder

MICRO_CONV = [[32, 10, 5], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 2, 2], [32, 2, 2]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def micro(model_type="hubert", **kw):
    base = dict(model_type=model_type, num_layers=3, hidden_size=64, num_heads=4, ffn_dim=128,
                conv_layers=[list(c) for c in MICRO_CONV], conv_pos=16, conv_pos_groups=4,
                relative_position=model_type == "wavlm", num_buckets=32, max_distance=64)
    base.update(kw)
    torch.manual_seed(0)
    return build_encoder(base).eval()


def pruned_micro(model_type="hubert", **kw):
    enc = micro(model_type, **kw)
    g = PruningGates(enc)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in g.log_alpha_parameters():
            p.normal_(0.0, 3.0)
    return materialize(enc, g.eval()())


@pytest.mark.parametrize("make", [
    lambda: micro("hubert"), lambda: micro("wavlm"), lambda: pruned_micro("hubert"), lambda: pruned_micro("wavlm"),
    lambda: micro("bestrq", frontend="fbank", conv_layers=[[48, 3, 2], [48, 3, 2]]),
])
def test_analytic_macs_match_hook_count(make):
    enc = make()
    assert analytic_macs(enc, 1.5) == counted_macs(enc, 1.5)


def test_macs_scale_with_pruning_and_hubert_base_size():
    enc = micro("hubert")
    small = pruned_micro("hubert")
    assert analytic_macs(small, 2.0) < analytic_macs(enc, 2.0)
    base = build_encoder("hubert_base")
    assert abs(count_params(base) - 94.37e6) < 0.2e6
    # HuBERT Base on 10 s: CNN ~24.5 G + 12 layers x ~3.9 G + positional conv ~2.4 G = ~74 GMACs
    assert 60e9 < analytic_macs(base, 10.0) < 80e9


def test_profile_table_png_and_cli(tmp_path):
    from speechssl.cli.main import main
    from speechssl.models.io import export_pretrained

    enc, small = micro("hubert"), pruned_micro("hubert")
    rtf = measure_rtf(small, seconds=1.0, threads=1, warmup=1, repeats=2)
    assert 0 < rtf < 10
    res = profile_models({"teacher": enc, "pruned": small}, seconds=1.0, threads=1, warmup=0, repeats=1)
    assert res[1].params == count_params(small) and res[1].heads == small.prunable_units()["heads"]
    table = format_table(res)
    assert "| teacher |" in table and "| pruned |" in table and "1 threads" in table
    png = plot_structure(res, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export_pretrained(small, tmp_path / "m", format="speechssl")
    rc = main(["profile", "preset:tiny_hubert", str(tmp_path / "m"), "--names", "t", "p", "--seconds", "1",
               "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "prof")])
    assert rc == 0
    rows = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert rows[1]["params"] == count_params(small) and rows[0]["rtf"] > 0
    assert (tmp_path / "prof" / "structure.png").is_file()


def test_bench_student_is_exactly_counted_and_sparse():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_compress", Path(__file__).parents[1] / "bench" / "compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    teacher = micro("hubert")
    student = bench.sparse_student(teacher, 0.6)
    s = 1 - count_params(student) / count_params(teacher)
    assert 0.6 <= s < 0.65


def test_analytic_macs_of_attention_reusing_layers():
    """A layer reusing an earlier attention map saves its q and k projections and its scores: 2 T D^2 + T^2 D MACs
    per layer (all heads kept), checked against the same encoder computing every map."""
    from speechssl.compress.profile import analytic_macs
    from speechssl.models.frames import num_frames

    kw = dict(num_layers=4, hidden_size=64, num_heads=4, ffn_dim=128, conv_pos=16, conv_pos_groups=4)
    plain = build_encoder("tiny_hubert", **kw)
    reuse = build_encoder("tiny_hubert", **kw, attn_reuse=[-1, 0, -1, 2])
    T = int(num_frames(plain.config, 16000))
    saved = 2 * (2 * T * 64 * 64 + T * T * 64)
    assert analytic_macs(plain, 1.0) - analytic_macs(reuse, 1.0) == saved
