"""Span and block masking: expected masked fraction, never on padding, seeded, fairseq's span-count rule."""
import pytest
import torch

from speechssl.models.masking import compute_block_mask, compute_span_mask, expand_mask


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("prob,expected", [(0.65, 0.49), (0.8, 0.55)])
def test_span_mask_fraction_matches_reference(prob, expected):
    # long utterances: the masked fraction tends to 1 - exp(-prob) ~ 0.48 / 0.55 (+ the U[0,1) span)
    lens = torch.full((400,), 500)
    m = compute_span_mask((400, 500), lens, prob, 10, generator=_gen())
    frac = m.float().mean().item()
    assert abs(frac - expected) < 0.02, frac


def test_span_count_rule_and_no_padding():
    T = 300
    lens = torch.tensor([300, 250, 120, 37, 12, 3, 1, 0])
    m = compute_span_mask((8, T), lens, 0.65, 10, generator=_gen(1))
    pad = torch.arange(T)[None] >= lens[:, None]
    assert not (m & pad).any()
    assert m[-1].sum() == 0  # empty utterance: nothing masked
    # a single span of 10 frames with distinct starts -> at least n*10 - overlap; with 2 spans minimum
    n_spans_min = (0.65 * lens[0] / 10).floor()
    assert m[0].sum() >= 10 and m[0].sum() <= (n_spans_min + 1) * 10
    # min 2 spans: a 37-frame utterance has int(0.65*3.7 + u) = 2 or 3 spans, >= 11 masked frames
    assert m[3].sum() >= 11


def test_span_mask_is_seeded_and_varies():
    lens = torch.tensor([100, 80, 60])
    a = compute_span_mask((3, 100), lens, 0.8, 10, generator=_gen(7))
    b = compute_span_mask((3, 100), lens, 0.8, 10, generator=_gen(7))
    c = compute_span_mask((3, 100), lens, 0.8, 10, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_span_mask_spans_are_contiguous_runs_of_length():
    # one span per utterance (prob tiny, min_masks=1): exactly 10 contiguous frames
    m = compute_span_mask((50, 200), None, 0.0001, 10, min_masks=1, generator=_gen(3))
    assert (m.sum(1) == 10).all()
    first = m.float().argmax(1)
    idx = first[:, None] + torch.arange(10)[None]
    assert m.gather(1, idx).all()


def test_span_mask_rejects_bad_args():
    with pytest.raises(ValueError, match="mask_prob"):
        compute_span_mask((2, 10), None, 1.5, 10)
    with pytest.raises(ValueError, match="lengths"):
        compute_span_mask((2, 10), torch.tensor([11, 3]), 0.5, 10)


def test_block_mask_blocks_and_padding():
    lens = torch.tensor([400, 300, 30, 0])
    m = compute_block_mask((4, 400), lens, 0.01, 40, generator=_gen(0))
    pad = torch.arange(400)[None] >= lens[:, None]
    assert not (m & pad).any()
    assert m[:3].sum(1).min() >= 30  # at least one block each (clipped at the 30-frame utterance)
    assert m[3].sum() == 0
    # density: 1 - 0.99^40 ~ 0.33 of frames on long utterances
    long = compute_block_mask((200, 1000), None, 0.01, 40, generator=_gen(1))
    assert abs(long.float().mean().item() - (1 - 0.99 ** 40)) < 0.04
    # runs are multiples of whole blocks: every run of masked frames is >= 40 long (except at utterance end)
    row = long[0].int()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int32), row, torch.zeros(1, dtype=torch.int32)]))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    runs = ends - starts
    assert (runs[ends < 1000] >= 40).all()


def test_expand_mask():
    m = torch.tensor([[True, False, True]])
    assert expand_mask(m, 2).tolist() == [[True, True, False, False, True, True]]
    assert expand_mask(m, 2, 5).shape == (1, 5)
    assert expand_mask(m, 2, 8)[0, 6:].tolist() == [False, False]
