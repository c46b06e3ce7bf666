"""SUPERB metrics, CTC decoders and tokenizers against hand-computed values and jiwer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from speechssl.superb import metrics
from speechssl.superb.decoding import GreedyCTCDecoder, PrefixBeamSearchDecoder, build_decoder
from speechssl.superb.tokenizer import BPETokenizer, CharTokenizer, PhoneTokenizer, load_tokenizer


def test_edit_distance_and_error_rates():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance([], [1, 2]) == 2
    assert metrics.edit_distance([1, 2, 3], [1, 3]) == 1
    # corpus level: (1 + 0) / (3 + 2), not the mean of per-utterance rates
    assert metrics.wer(["A B C", "D E"], ["A X C", "D E"]) == pytest.approx(1 / 5)
    assert metrics.per(["p a t", "k"], ["p a", "k"]) == pytest.approx(1 / 4)
    assert metrics.cer(["AB CD"], ["AB CE"]) == pytest.approx(1 / 5)


def test_wer_agrees_with_jiwer():
    refs = ["THE CAT SAT ON THE MAT", "HELLO WORLD", "A B C D E F"]
    hyps = ["THE CAT SAT THE MAT TOO", "HELO WORLD", "A C D X E F G"]
    ours = metrics.wer(refs, hyps)
    assert ours == pytest.approx(metrics.wer_jiwer(refs, hyps), abs=1e-12)
    assert ours == pytest.approx((2 + 1 + 3) / (6 + 2 + 6))


def test_eer_exact_crossing():
    # targets 0.9 0.8 0.3, non-targets 0.7 0.2 0.1: at threshold 0.7 one target is missed and one
    # non-target accepted: P_miss = P_fa = 1/3
    scores = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1]
    labels = [1, 1, 1, 0, 0, 0]
    assert metrics.eer(scores, labels) == pytest.approx(1 / 3)


def test_eer_interpolated():
    # thresholds 0.6 -> (P_miss 1/3, P_fa 1/2), 0.8 -> (1/3, 0): the curves cross at 1/3 between them
    scores = [0.9, 0.8, 0.4, 0.6, 0.1]
    labels = [1, 1, 1, 0, 0]
    assert metrics.eer(scores, labels) == pytest.approx(1 / 3)
    assert metrics.eer([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 0.0
    assert metrics.eer([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 1.0


def test_min_dcf_by_hand():
    scores = [0.9, 0.5, 0.3, 0.6, 0.2, 0.1]
    labels = [1, 1, 1, 0, 0, 0]
    # p_target 0.5, unit costs: normalised DCF = P_miss + P_fa, best at threshold 0.3 (0 + 1/3)
    assert metrics.min_dcf(scores, labels, p_target=0.5) == pytest.approx(1 / 3)
    # p_target 0.01: DCF = P_miss + 99 P_fa, best with no false alarm (threshold 0.9): P_miss = 2/3
    assert metrics.min_dcf(scores, labels, p_target=0.01) == pytest.approx(2 / 3)
    # c_fa 2, p_target 0.25: (0.25 P_miss + 1.5 P_fa) / 0.25 -> threshold 0.9 gives 2/3, 0.3 gives 2
    assert metrics.min_dcf(scores, labels, p_target=0.25, c_fa=2.0) == pytest.approx(2 / 3)


def test_metric_errors_are_clear():
    with pytest.raises(ValueError, match="target"):
        metrics.eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="hypotheses"):
        metrics.wer(["A"], [])


def _peaked(seq, V, T_per=3, blank=0):
    """Log-probs [1, T, V] strongly peaked on ``seq`` with blanks between tokens."""
    frames = []
    for tok in seq:
        frames += [tok] * T_per + [blank]
    lp = torch.full((len(frames), V), -8.0)
    for t, tok in enumerate(frames):
        lp[t, tok] = 0.0
    return F.log_softmax(lp, -1)[None]


def test_beam_equals_greedy_on_peaked():
    for seq in ([1, 2, 2, 3], [4, 4, 4], [2, 1, 3, 1, 2]):
        lp = _peaked(seq, V=5)
        lens = torch.tensor([lp.shape[1]])
        g = GreedyCTCDecoder()(lp, lens)
        b = PrefixBeamSearchDecoder(beam_size=4)(lp, lens)
        assert g == b == [seq]


def _sequence_logprob(lp, seq):
    T = lp.shape[1]
    return -float(F.ctc_loss(lp.transpose(0, 1), torch.tensor([seq]), torch.tensor([T]), torch.tensor([len(seq)]),
                             reduction="sum")) if seq else float(lp[0, :, 0].sum())


def test_beam_beats_greedy_on_constructed_case():
    # two frames, each blank 0.5 / 'a' 0.4 / 'b' 0.1: the best path is blank-blank ('', p = 0.25) but the
    # label 'a' collects three paths (0.2 + 0.2 + 0.16 = 0.56)
    p = torch.tensor([[0.5, 0.4, 0.1], [0.5, 0.4, 0.1]])
    lp = p.log()[None]
    lens = torch.tensor([2])
    greedy = GreedyCTCDecoder()(lp, lens)[0]
    beam = build_decoder("beam", beam_size=3)(lp, lens)[0]
    assert greedy == [] and beam == [1]
    assert math.exp(_sequence_logprob(lp, beam)) == pytest.approx(0.56, abs=1e-5)
    assert _sequence_logprob(lp, beam) > _sequence_logprob(lp, greedy)


def test_beam_handles_repeats_through_blank():
    # 'a blank a' must decode to [1, 1], 'a a' (no blank) to [1]
    lp = torch.log(torch.tensor([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]]))[None]
    assert PrefixBeamSearchDecoder(beam_size=5)(lp, torch.tensor([3])) == [[1, 1]]
    assert PrefixBeamSearchDecoder(beam_size=5)(lp[:, [0, 2]], torch.tensor([2])) == [[1]]


def test_unknown_decoder():
    with pytest.raises(ValueError, match="decoding.name"):
        build_decoder("k2")


def test_tokenizers_round_trip(tmp_path):
    texts = ["HELLO WORLD", "GOOD  MORNING"]
    ch = CharTokenizer.from_texts(texts)
    ids = ch.encode("HELLO WORLD")
    assert 0 not in ids and ch.decode(ids) == "HELLO WORLD"
    assert ch.decode(ch.encode("GOOD MORNING")) == "GOOD MORNING"
    assert ch.encode("Z") == [1]  # unknown
    ch.save(tmp_path / "c.json")
    assert load_tokenizer(tmp_path / "c.json").encode("HELLO") == ch.encode("HELLO")
    ph = PhoneTokenizer.from_texts(["h @ l oU", "w 3 l d"])
    assert ph.decode(ph.encode("h @ l d")) == "h @ l d"
    assert ph.vocab_size == 2 + 7


def test_bpe_tokenizer(tmp_path):
    words = ["THE", "CAT", "SAT", "ON", "MAT", "DOG", "RAN", "FAST", "SLOW", "RED"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(5)) for i in range(40)]
    tok = BPETokenizer.train(texts, tmp_path / "bpe", vocab_size=40)
    ids = tok.encode("THE CAT SAT")
    assert ids and min(ids) >= 1 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "THE CAT SAT"
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encode("THE CAT") == tok.encode("THE CAT")
