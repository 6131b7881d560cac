"""features.shards: the stored T5 token encodings (fp16 as-is, fp8 e4m3 + per-token scale)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from features import shards


def _tokens(seed=0, n=37, d=64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 3] *= 40.0  # T5-like outlier channel
    x[5] *= 1e-3  # a row of much smaller magnitude (per-token scale must keep its precision)
    x[7, :10] = 0.0
    return x


def test_fp16_is_the_plain_array():
    x = _tokens()
    arr = np.load(io.BytesIO(shards.encode_tokens(x, "fp16")), allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape == x.shape
    assert np.array_equal(shards.decode_tokens(arr), x.astype(np.float16))


def test_fp8_round_trip_error_and_size():
    import torch

    x = _tokens()
    data = shards.encode_tokens(x, "fp8")
    arr = np.load(io.BytesIO(data), allow_pickle=False)  # a plain structured npy: no pickle needed
    assert arr.shape == (37,) and arr.dtype.names == ("scale", "fp8")
    assert len(data) < x.size + 4 * 37 + 256  # 1 byte per element + a scale per token + npy header
    y = shards.decode_tokens(arr)
    assert y.dtype == np.float32 and y.shape == x.shape
    # Independent reference: the same per-token scaling through torch's own float8 cast.
    scale = np.abs(x).max(1, keepdims=True) / 448.0
    ref = torch.from_numpy(x / scale).to(torch.float8_e4m3fn).float().numpy() * scale
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=0)
    # e4m3: 3 mantissa bits -> |error| <= 2^-4 |x| for normal values; each row's max is exact.
    normal = np.abs(x / scale) >= 2.0 ** -6
    assert (np.abs(y - x)[normal] <= 2.0 ** -4 * np.abs(x)[normal] + 1e-12).all()
    assert np.allclose(np.abs(y).max(1), np.abs(x).max(1), rtol=1e-6)
    assert (y[7, :10] == 0).all()
    rel = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    assert rel.max() < 0.05 and rel[5] < 0.05  # the small row keeps its relative precision


def test_unknown_text_dtype_is_an_error():
    with pytest.raises(ValueError, match="allowed: fp16 | fp8"):
        shards.encode_tokens(_tokens(), "int4")
