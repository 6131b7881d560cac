"""Training shards read back (issue 22, items 1-2): every member is checked against the checksum
(XXH3-128) written with it before anything uses it; shards without per-member sums are checked whole against
index.json; a broken index.json or a shard name leading out of its folder is refused naming it."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile

import numpy as np
import pytest
import xxhash

from _sigma import shards

D = 16


def _samples(n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"00002_{i:06d}"
        lat = rng.normal(size=(8, 4, 4)).astype(np.float16)
        out.append({"key": key, "meta": {"key": key, "bucket": "1.0", "n_long": 0, "n_short": 3},
                    "latent": shards.npy_bytes(lat), "t5_long": None,
                    "t5_short": shards.encode_tokens(rng.normal(size=(3, D)))})
    return out


def _write(d, samples=None) -> tuple[str, dict]:
    """One shard + index.json in folder d; returns (tar path, index entry)."""
    uri = os.path.join(str(d), shards.shard_name(2, 0))
    side = shards.write_shard(uri, samples or _samples(), {"keys_hash": "h", "fingerprint": "f"})
    shards.write_index(str(d), shards.build_index(32, [side], {"name": "v", "scale_factor": 0.13, "latent_channels": 4},
                                                  {"name": "t", "max_length": 300, "dim": D}))
    return uri, shards.read_index(str(d))["shards"][0]


def _flip(path, member_suffix: str, key: str = "00002_000001", at: int = 100) -> None:
    """Flip one byte inside the data of member `<key>.<suffix>`: the tar keeps its size."""
    with tarfile.open(path) as tar:
        m = next(m for m in tar.getmembers() if m.name == f"{key}.{member_suffix}")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(m.offset_data + min(at, m.size - 1))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    assert os.path.getsize(path) == size


def test_every_member_carries_its_sha256(tmp_path):
    uri, _ = _write(tmp_path)
    with tarfile.open(uri) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:  # independent recount with tarfile + the xxhash package
            assert m.pax_headers[shards.PAX_SUM] == xxhash.xxh3_128_hexdigest(tar.extractfile(m).read())
    assert len(members) == 4 * 3  # json, latent, t5_short per sample
    got = list(shards.iter_samples(str(tmp_path)))
    assert [s["key"] for s in got] == [s["key"] for s in _samples()]
    assert np.array_equal(got[1]["latent"], shards.load_npy(_samples()[1]["latent"]))


def test_a_flipped_byte_in_a_latent_is_refused_by_the_sequential_reader(tmp_path):
    uri, _ = _write(tmp_path)
    _flip(uri, "latent.npy")
    with pytest.raises(shards.ShardError,
                       match=r"shard-00002-000000\.tar: member 00002_000001\.latent\.npy: checksum differs"):
        list(shards.iter_samples(str(tmp_path)))
    # the samples before it were yielded verified; the corrupt one never is
    seen = []
    with pytest.raises(shards.ShardError):
        for s in shards.iter_samples(str(tmp_path)):
            seen.append(s["key"])
    assert seen == ["00002_000000"]


def test_a_flipped_byte_is_refused_by_training_before_a_step(tmp_path):
    from training.data import ShardBatches, ShardError

    uri, entry = _write(tmp_path)
    _flip(uri, "latent.npy")
    b = ShardBatches(str(tmp_path), batch_size=4, long_ratio=0.0, caption_dropout=0.0)  # headers + json only
    with pytest.raises(ShardError, match=r"shard-00002-000000\.tar: member 00002_000001\.latent\.npy"):
        next(b)
    uri, entry = _write(tmp_path)
    _flip(uri, "json", at=5)  # the json member is read by the header scan
    from training.data import scan_shard

    with pytest.raises(ShardError, match=r"member 00002_000001\.json"):
        scan_shard(str(tmp_path), entry)


def _legacy(d, flip: bool) -> str:
    """A shard without per-member sums (USTAR, as written before issue 22) + index with its sha256."""
    d.mkdir(exist_ok=True)
    name = shards.shard_name(2, 0)
    path = d / name
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in _samples():
            for suffix, data in (("json", json.dumps(s["meta"]).encode()), ("latent.npy", s["latent"]),
                                 ("t5_short.npy", s["t5_short"])):
                info = tarfile.TarInfo(f"{s['key']}.{suffix}")
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    entry = {"name": name, "samples": 4, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "buckets": {"1.0": 4}, "failed": 0}
    (d / "index.json").write_text(json.dumps({"format": "sigma-shards/2", "resolution": 32, "shards": [entry],
                                              "vae": {"scale_factor": 0.13}, "t5": {"dim": D}}))
    if flip:
        _flip(str(path), "latent.npy")
    return str(d)


def test_a_shard_without_member_sums_is_checked_whole_against_the_index(tmp_path):
    from training.data import scan_shard

    good = _legacy(tmp_path / "good", flip=False)
    assert len(list(shards.iter_samples(good))) == 4
    bad = _legacy(tmp_path / "bad", flip=True)
    with pytest.raises(shards.ShardError, match=r"bad/shard-00002-000000\.tar: sha256 differs from index\.json"):
        list(shards.iter_samples(bad))
    with pytest.raises(shards.ShardError, match=r"bad/shard-00002-000000\.tar: sha256 differs from index\.json"):
        scan_shard(bad, shards.read_index(bad)["shards"][0])


def test_a_truncated_index_is_named(tmp_path):
    _write(tmp_path)
    p = tmp_path / "index.json"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(shards.ShardError, match=rf"{tmp_path}/index\.json: not valid JSON"):
        shards.read_index(str(tmp_path))
    p.write_text("[1, 2]")
    with pytest.raises(shards.ShardError, match=r"index\.json: not a shard index"):
        shards.read_index(str(tmp_path))


@pytest.mark.parametrize("name", ["../../outside.tar", "/etc/outside.tar", "sub/shard.tar", "..", ".hidden.tar",
                                  "shard-00002-000000.json"])
def test_shard_names_stay_inside_their_folder(tmp_path, name):
    from training.data import ShardBatches

    d = tmp_path / "a" / "b" / "shards"
    _write(d)
    outside = tmp_path / "outside.tar"  # a valid shard where ../../outside.tar points
    os.replace(d / shards.shard_name(2, 0), outside)
    idx = json.loads((d / "index.json").read_text())
    idx["shards"][0]["name"] = name
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(shards.ShardError, match="index.json: shard name .* is not a file name in its folder"):
        list(shards.iter_samples(str(d)))
    with pytest.raises(shards.ShardError, match="not a file name in its folder"):
        ShardBatches(str(d), batch_size=2)
    with pytest.raises(shards.ShardError, match="not a file name in its folder"):
        shards.scan_shard(str(d), idx["shards"][0])
