"""T5 embeddings: valid tokens only, length-sorted batches, and the proof that it is lossless."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _sigma.shards import load_npy, repad

CAPTIONS = [
    "A dog.",
    "A red car parked on a city street at sunset. The lighting is soft and warm.",
    "",
    "Two children running on a beach with a kite, waves in the background, golden hour, "
    "high resolution photograph with shallow depth of field. " * 3,
    "zebra giraffe elephant",
    "A bowl of fruit on a wooden table, painted in the style of an oil painting. " * 12,  # > 300 tokens
]


@pytest.fixture(scope="module")
def embedder(feature_models):
    from features.t5 import T5Embedder

    return T5Embedder(str(feature_models / "t5"), max_length=300, precision="fp32", chunk=3)


def test_tiny_t5_round_trips_offline(feature_models):
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(feature_models / "t5")
    model = T5EncoderModel.from_pretrained(feature_models / "t5")
    assert model.config.d_model == 32 and model.config.num_layers == 2
    assert 400 <= len(tok) <= 1100 and model.config.vocab_size >= len(tok)
    ids = tok("A giraffe near a waterfall at dusk.")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids


def _official(embedder, texts):
    """Padded-to-300 features, one caption at a time, as the official extractor stores them."""
    y, m = embedder.encode_padded(texts)  # (N, 300, D) fp16, (N, 300) int16
    assert y.shape == (len(texts), 300, 32) and m.shape == (len(texts), 300)
    return y, m


def test_trimmed_features_rebuild_the_padded_dit_input_exactly(embedder):
    y300, m300 = _official(embedder, CAPTIONS)
    n = m300.sum(1)
    assert n[2] == 1 and n[5] == 300  # empty caption = EOS only; the long one is truncated at 300
    trimmed = [y300[i, : n[i]] for i in range(len(CAPTIONS))]  # what a shard stores
    y_re, m_re = repad(trimmed, 300)
    assert np.array_equal(m_re, m300.astype(np.int64))
    valid = m300.astype(bool)
    assert np.array_equal(y_re[valid], y300[valid].astype(np.float32))  # bit-exact at valid positions
    # The DiT only sees the caption through masked cross-attention: padded positions (garbage in
    # the official arrays, zeros after re-padding) get weight exactly 0, so the output is identical.
    torch.manual_seed(0)
    q = torch.randn(len(CAPTIONS), 7, 32)
    wk, wv = torch.randn(32, 32), torch.randn(32, 32)

    def cross_attn(y, m):
        y, m = torch.from_numpy(np.asarray(y, np.float32)), torch.from_numpy(np.asarray(m)).bool()
        s = q @ (y @ wk).transpose(1, 2) / 32**0.5  # (B, 7, 300)
        s = s.masked_fill(~m[:, None, :], float("-inf"))
        return s.softmax(-1) @ (y @ wv)

    assert torch.equal(cross_attn(y300, m300), cross_attn(y_re, m_re))


def test_length_sorted_batches_match_one_at_a_time(embedder):
    y300, m300 = _official(embedder, CAPTIONS)
    got = embedder.encode(CAPTIONS)  # chunks of 3, sorted by length, padded to the chunk max
    for i, e in enumerate(got):
        n = int(m300[i].sum())
        assert e.dtype == np.float16 and e.shape == (n, 32)
        # Same math, different padding: equal up to float rounding of the attention sums.
        np.testing.assert_allclose(e.astype(np.float32), y300[i, :n].astype(np.float32), rtol=0, atol=2e-3)


def test_stage_call_adds_columns(embedder):
    import pyarrow as pa

    batch = pa.table({"key": ["a", "b", "c"], "text_long": ["A long caption about a cat.", None, "x"],
                      "text_short": ["cat", "dog on grass", None]})
    out = embedder(batch)
    assert out.column("n_long").to_pylist()[1] == 0 and out.column("t5_long").to_pylist()[1] is None
    assert out.column("t5_short").to_pylist()[2] is None
    a = load_npy(out.column("t5_long").to_pylist()[0])
    assert a.dtype == np.float16 and a.shape == (out.column("n_long").to_pylist()[0], 32)
    assert out.column("n_short").to_pylist()[:2] == embedder.token_counts(["cat", "dog on grass"])
    assert out.column("t5_error").null_count == 3


def test_chunks_respect_caption_and_token_budgets():
    from types import SimpleNamespace

    from features.t5 import T5Embedder

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 301, size=200).tolist()
    for chunk, budget in ((32, 0), (32, 1200), (4, 1200), (1000, 600), (8, 10)):
        got = T5Embedder.chunks(SimpleNamespace(chunk=chunk, batch_tokens=budget), lengths)
        flat = [i for c in got for i in c]
        assert sorted(flat) == list(range(200))  # every caption exactly once
        assert [lengths[i] for i in flat] == sorted(lengths)  # length-sorted
        for c in got:
            assert 1 <= len(c) <= chunk
            if budget and len(c) > 1:  # a single caption longer than the budget still runs alone
                assert len(c) * max(lengths[i] for i in c) <= budget
        if budget:  # greedy: the next caption would have broken a limit
            for c, nxt in zip(got, got[1:]):
                assert len(c) == chunk or (len(c) + 1) * lengths[nxt[0]] > budget
        else:
            assert [len(c) for c in got] == [chunk] * (200 // chunk) + [200 % chunk] * bool(200 % chunk)


def test_token_budget_gives_the_same_embeddings(embedder):
    y300, m300 = _official(embedder, CAPTIONS)
    embedder.batch_tokens = 3 * int(m300.sum(1).min()) + 1  # forces several chunk sizes
    try:
        got = embedder.encode(CAPTIONS)
    finally:
        embedder.batch_tokens = 0
    for i, e in enumerate(got):
        n = int(m300[i].sum())
        assert e.shape == (n, 32)
        np.testing.assert_allclose(e.astype(np.float32), y300[i, :n].astype(np.float32), rtol=0, atol=2e-3)


def test_identical_texts_are_encoded_once(embedder):
    rows = []
    hook = embedder.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                                    with_kwargs=True)
    try:
        texts = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[0], CAPTIONS[2]]
        got = embedder.encode(texts)
    finally:
        hook.remove()
    assert sum(rows) == 3  # three distinct texts reached the model
    assert got[0] is got[2] and got[0] is got[3]
    ref = embedder.encode(CAPTIONS[:3])
    for g, r in zip([got[0], got[1], got[4]], ref):
        np.testing.assert_array_equal(g, r)
