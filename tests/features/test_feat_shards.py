"""_sigma.shards: the stored T5 token encodings (fp16 as-is, fp8 e4m3 + per-token scale)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from _sigma import shards


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
    with pytest.raises(ValueError, match=r"allowed: fp16 \| fp8"):
        shards.encode_tokens(_tokens(), "int4")
    # the config accepts exactly the dtypes the shard format writes
    from typing import get_args, get_type_hints

    from features.config import FeaturesConfig

    assert get_args(get_type_hints(FeaturesConfig)["text_dtype"]) == shards.TEXT_DTYPES


# --- shard integrity: sidecar size + sha256, readers checked against the index -------------------

def _samples(n=5):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        key = f"00003_{i:06d}"
        lat = rng.normal(size=(8, 4, 4)).astype(np.float16)
        out.append({"key": key, "meta": {"key": key, "bucket": "1.0"}, "latent": shards.npy_bytes(lat),
                    "t5_long": None, "t5_short": shards.encode_tokens(rng.normal(size=(3, 8)))})
    return out


def _shard(where):
    """One shard of 5 samples at `where` (local folder or URI) and its index entry."""
    from _sigma import fs

    uri = fs.join(str(where), shards.shard_name(3, 0))
    side = shards.write_shard(uri, _samples(), {"keys_hash": "h", "fingerprint": "f"})
    entry = shards.build_index(64, [side], {}, {})["shards"][0]
    return uri, side, entry


def _sha(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_sidecar_records_size_and_sha256(tmp_path):
    import os

    uri, side, entry = _shard(tmp_path)
    assert side["bytes"] == os.path.getsize(uri) and side["sha256"] == _sha(uri) == entry["sha256"]
    assert shards.read_sidecar(uri) == side and entry["samples"] == 5
    assert shards.check_shard(uri, "h", "f") == (side, None)
    assert shards.check_shard(uri, "other plan", "f") == (None, "stale")
    os.remove(shards.sidecar_uri(uri))  # a tar without its sidecar (killed between the two) is not done
    assert shards.check_shard(uri, "h", "f") == (None, "missing")


def _cut(path, at_boundary: bool):
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = [m for m in members if m.name.startswith(members[-1].name.split(".")[0])]
    with open(path, "r+b") as f:
        f.truncate(last[0].offset if at_boundary else last[0].offset_data + 10)


def test_readers_name_a_tar_cut_at_a_member_boundary(tmp_path):
    uri, _, entry = _shard(tmp_path)
    assert [s["key"] for s in shards.iter_shard(uri, entry)] == [f"00003_{i:06d}" for i in range(5)]
    _cut(uri, at_boundary=True)
    assert len(list(shards.iter_shard(uri))) == 4  # tarfile alone sees a shorter, valid-looking tar
    assert shards.check_shard(uri, "h", "f")[1] == "truncated"
    with pytest.raises(shards.ShardError, match=r"shard-00003-000000\.tar: \d+ bytes on disk, the index says"):
        list(shards.iter_shard(uri, entry))
    # Even an index that agrees with the cut size cannot hide the missing sample.
    import os

    lying = dict(entry, bytes=os.path.getsize(uri))
    with pytest.raises(shards.ShardError, match="4 samples, the index says 5"):
        list(shards.iter_shard(uri, lying))


def test_readers_name_a_tar_that_ends_inside_a_member(tmp_path):
    import os

    uri, _, entry = _shard(tmp_path)
    _cut(uri, at_boundary=False)
    with pytest.raises(shards.ShardError, match="shard-00003-000000.tar: unreadable or ends early"):
        list(shards.iter_shard(uri, dict(entry, bytes=os.path.getsize(uri))))


def test_same_size_corruption_needs_the_checksum(tmp_path):
    uri, side, _ = _shard(tmp_path)
    with open(uri, "r+b") as f:
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0x01]))
    assert shards.check_shard(uri, "h", "f") == (None, "corrupt")
    assert shards.check_shard(uri, "h", "f", verify="size") == (side, None)  # the documented limit of "size"


def test_shards_on_an_object_store(s3_bucket):
    """Writer, sidecar, index and readers through _sigma.fs on S3 (moto server)."""
    from _sigma import fs

    d = s3_bucket + "/shards/64"
    uri, side, _ = _shard(d)
    shards.write_index(d, shards.build_index(64, [side], {}, {}))
    assert fs.listdir(d) == [".shard-00003-000000.json", "index.json", "shard-00003-000000.tar"]
    assert shards.check_shard(uri, "h", "f") == (side, None) and side["sha256"] == shards.file_sha256(uri)
    assert [s["key"] for s in shards.iter_samples(d)] == [f"00003_{i:06d}" for i in range(5)]
    assert shards.shard_keys(s3_bucket) == {f"00003_{i:06d}" for i in range(5)}
    fs.write_bytes(uri, fs.read_bytes(uri)[:-1024])  # a shorter object under the same name
    with pytest.raises(shards.ShardError, match="s3://.*shard-00003-000000.tar"):
        list(shards.iter_samples(d))
