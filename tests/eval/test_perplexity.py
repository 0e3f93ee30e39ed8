import math

import pytest
import torch

from finegrain.data import brown_paragraphs, wikitext2_test
from finegrain.eval.perplexity import calibration_batches, perplexity


class _ByteTokenizer:
    """Bytes as tokens: an independent, trivially checkable tokenizer."""

    def __call__(self, text):
        class R:
            input_ids = list(text.encode("utf-8"))

        return R()


def test_vendored_text_is_the_real_corpus():
    text = wikitext2_test()
    assert text.startswith(" = Robert Boulter = ") and len(text) > 1_200_000 and "\r" not in text
    assert len(brown_paragraphs()) == 9557


def test_uniform_logits_give_vocab_perplexity():
    vocab = 256
    res = perplexity(lambda ids: torch.zeros(1, ids.shape[1], vocab), _ByteTokenizer(), seq_len=128, max_windows=3,
                     progress=False)
    assert res.ppl == pytest.approx(vocab, rel=1e-5) and res.windows == 3 and res.tokens == 3 * 127


def test_perfect_predictor_has_perplexity_one():
    def oracle(ids):
        logits = torch.full((1, ids.shape[1], 256), -1e4)
        logits[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 0.0
        return logits

    res = perplexity(oracle, _ByteTokenizer(), seq_len=64, max_windows=2, progress=False)
    assert res.ppl == pytest.approx(1.0, abs=1e-6)


def test_calibration_batches_are_seeded_and_shaped():
    a = calibration_batches(_ByteTokenizer(), samples=4, seq_len=32, seed=0)
    b = calibration_batches(_ByteTokenizer(), samples=4, seq_len=32, seed=0)
    c = calibration_batches(_ByteTokenizer(), samples=4, seq_len=32, seed=1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b)) and not torch.equal(a[0][0], c[0][0])
    assert a[0][0].shape == (1, 32)


def test_first_window_reads_later_windows():
    seen = []

    def record(ids):
        seen.append(ids[0].clone())
        return torch.zeros(1, ids.shape[1], 256)

    tok = _ByteTokenizer()
    perplexity(record, tok, seq_len=64, max_windows=2, progress=False, first_window=5)
    stream = torch.tensor(tok(wikitext2_test()).input_ids)
    assert len(seen) == 2 and torch.equal(seen[0], stream[5 * 64:6 * 64]) and torch.equal(seen[1], stream[6 * 64:7 * 64])
    from finegrain.errors import InputError

    with pytest.raises(InputError, match="first_window"):
        perplexity(record, tok, seq_len=64, first_window=10 ** 9, progress=False)
