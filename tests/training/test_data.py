"""training.data: bucket-pure batches, caption choice, latent sampling, re-padding, disjoint ranks,
resumable position. Also holds the synthetic-shard writer the other training tests import."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from training.data import ShardBatches, ShardError, read_index

SCALE = 0.13025
D = 32  # tiny T5 d_model


def write_synthetic_shards(root: Path, n: int = 24, n_shards: int = 3, resolution: int = 64,
                           buckets=(("1.0", (64, 64)), ("0.5", (32, 64))), seed: int = 0,
                           make=None) -> Path:
    """Shards in the docs/ARCHITECTURE.md format (webdataset tars + index.json).

    `make(i, rng) -> (bucket, latent (8,h,w), t5_long (n_l, D), t5_short (n_s, D), meta)` overrides
    the default random content."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-n // n_shards)
    shards, all_buckets = [], {}
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        counts: dict = {}
        with wds.TarWriter(str(root / name)) as tw:
            for i in range(s * per, min(n, (s + 1) * per)):
                if make is not None:
                    bucket, latent, tl, ts, extra = make(i, rng)
                else:
                    bucket, (h, w) = buckets[i % len(buckets)]
                    latent = np.concatenate([rng.normal(size=(4, h // 8, w // 8)),
                                             rng.uniform(0.01, 0.1, size=(4, h // 8, w // 8))])
                    tl = rng.normal(size=(int(rng.integers(5, 20)), D))
                    ts = rng.normal(size=(int(rng.integers(1, 5)), D))
                    extra = {}
                key = f"00000_{i:06d}"
                meta = {"key": key, "url": f"http://x/{i}", "bucket": bucket,
                        "height": latent.shape[1] * 8, "width": latent.shape[2] * 8,
                        "caption_long": "long", "caption_short": "short", "aesthetic": 5.0,
                        "n_long": len(tl), "n_short": len(ts), "upscaled": False, **extra}
                tw.write({"__key__": key, "latent.npy": latent.astype(np.float16),
                          "t5_long.npy": np.asarray(tl, np.float16), "t5_short.npy": np.asarray(ts, np.float16),
                          "json": meta})
                counts[bucket] = counts.get(bucket, 0) + 1
        size = (root / name).stat().st_size
        sha = hashlib.sha256((root / name).read_bytes()).hexdigest()  # no member sums: checked whole
        shards.append({"name": name, "samples": sum(counts.values()), "bytes": size, "sha256": sha,
                       "buckets": counts})
        for k, v in counts.items():
            all_buckets[k] = all_buckets.get(k, 0) + v
    index = {"format": "sigma-shards/1", "resolution": resolution,
             "vae": {"name": "synthetic", "scale_factor": SCALE, "latent_channels": 4},
             "t5": {"name": "synthetic", "max_length": 300, "dim": D}, "shards": shards,
             "buckets": all_buckets, "samples": n, "bytes": sum(s["bytes"] for s in shards)}
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture()
def shards(tmp_path):
    return write_synthetic_shards(tmp_path / "shards")


def _raw(root: Path) -> dict:
    """Independent reader (webdataset) of every sample: key -> dict of arrays."""
    out = {}
    for s in read_index(root)["shards"]:
        for smp in wds.WebDataset(str(root / s["name"]), shardshuffle=False).decode():
            out[smp["__key__"]] = smp
    return out


def test_bucket_pure_batches_cover_epoch_once(shards):
    d = ShardBatches(shards, batch_size=5, seed=1)
    n_batches = len(d.epoch_order(0))
    seen = []
    for _ in range(n_batches):
        b = next(d)
        buckets = {d.samples[[r.key for r in d.samples].index(k)].bucket for k in b["keys"]}
        assert buckets == {b["bucket"]}
        assert b["x"].shape[0] == len(b["keys"]) <= 5
        seen += b["keys"]
    assert sorted(seen) == sorted(r.key for r in d.samples) and len(seen) == 24
    assert d.epoch == 0 and d.cursor == n_batches
    next(d)
    assert d.epoch == 1 and d.cursor == 1
    # a new epoch is a new order
    assert d.epoch_order(1) != d.epoch_order(0) or n_batches == 1


def test_latents_tokens_and_mask_match_the_stored_arrays(shards):
    raw = _raw(shards)
    d = ShardBatches(shards, batch_size=4, seed=3, long_ratio=0.5, caption_dropout=0.0)
    b = next(d)
    L = b["y"].shape[1]
    for i, k in enumerate(b["keys"]):
        lat = raw[k]["latent.npy"].astype(np.float32)
        mean, std = torch.from_numpy(lat[:4]), torch.from_numpy(lat[4:])
        z = b["x"][i] / SCALE
        # a posterior sample: within a few std of the mean, and not the mean itself
        assert torch.all((z - mean).abs() <= 6 * std + 1e-3)
        assert not torch.allclose(z, mean)
        tok = raw[k]["t5_long.npy" if b["long"][i] else "t5_short.npy"].astype(np.float32)
        n = len(tok)
        assert int(b["mask"][i].sum()) == n and bool(b["mask"][i, :n].all())
        assert torch.equal(b["y"][i, :n], torch.from_numpy(tok)) and float(b["y"][i, n:].abs().sum()) == 0
    assert L == int(b["mask"].sum(1).max())  # padded to the batch max
    dmax = ShardBatches(shards, batch_size=4, seed=3, pad_tokens="max", max_length=300)
    assert next(dmax)["y"].shape[1] == 300


def test_long_ratio_and_dropout_frequencies(tmp_path):
    root = write_synthetic_shards(tmp_path / "s", n=400, n_shards=2)
    d = ShardBatches(root, batch_size=50, seed=0, long_ratio=0.6, caption_dropout=0.1)
    longs, drops = [], []
    for _ in range(len(d.epoch_order(0))):
        b = next(d)
        longs += b["long"].tolist()
        drops += b["drop"].tolist()
    assert len(longs) == 400
    assert 0.52 < np.mean(longs) < 0.68  # 0.6 +- ~3.3 sigma
    assert 0.06 < np.mean(drops) < 0.14
    # the choice is per sample per epoch: another epoch re-draws
    d2 = ShardBatches(root, batch_size=400, seed=0, long_ratio=0.6)
    epochs = []
    for e in range(2):
        got = {}
        for _ in range(len(d2.epoch_order(e))):
            b = next(d2)
            got.update(zip(b["keys"], b["long"].tolist()))
        epochs.append(got)
    e0, e1 = epochs
    assert e0.keys() == e1.keys() and e0 != e1


def test_ranks_read_disjoint_shards(shards):
    r0 = ShardBatches(shards, batch_size=4, rank=0, world_size=2)
    r1 = ShardBatches(shards, batch_size=4, rank=1, world_size=2)
    assert set(r0.shard_names).isdisjoint(r1.shard_names)
    assert set(r0.shard_names) | set(r1.shard_names) == {f"shard-{i:06d}.tar" for i in range(3)}
    k0, k1 = {r.key for r in r0.samples}, {r.key for r in r1.samples}
    assert k0.isdisjoint(k1) and len(k0 | k1) == 24
    # more ranks than shards: disjoint samples instead
    with pytest.warns(UserWarning):
        parts = [ShardBatches(shards, batch_size=4, rank=r, world_size=4) for r in range(4)]
    keys = [{s.key for s in p.samples} for p in parts]
    assert sum(map(len, keys)) == 24 and len(set().union(*keys)) == 24


def test_resume_position_gives_identical_batches(shards):
    a = ShardBatches(shards, batch_size=4, seed=5)
    for _ in range(9):  # crosses an epoch boundary (24/4 = 6+ batches per epoch)
        next(a)
    st = a.state_dict()
    rest_a = [next(a) for _ in range(5)]
    b = ShardBatches(shards, batch_size=4, seed=5)
    b.load_state_dict(st)
    rest_b = [next(b) for _ in range(5)]
    for x, y in zip(rest_a, rest_b):
        assert x["keys"] == y["keys"]
        for k in ("x", "y", "mask", "drop", "long"):
            assert torch.equal(x[k], y[k])


def test_truncated_shard_is_refused_naming_it(shards):
    """A tar cut at a member boundary is a valid shorter tar (the tar reader accepts it): the
    loader must compare with index.json and name the shard, not train on what is left."""
    import tarfile

    victim = shards / "shard-000001.tar"
    with tarfile.open(victim) as tf:
        members = [m for m in tf if m.isfile()]
    starts = [m.offset for i, m in enumerate(members) if i and m.name.split(".")[0] != members[i - 1].name.split(".")[0]]
    cut = starts[4]  # the header of sample 6: a valid tar of the first 5 of its 8 samples
    whole = victim.read_bytes()
    victim.write_bytes(whole[:cut])
    with pytest.raises(ShardError, match=r"shard-000001\.tar: \d+ bytes on disk, the index says"):
        ShardBatches(shards, batch_size=4)
    # an index whose byte count was rewritten too: the sample count still gives it away
    idx = json.loads((shards / "index.json").read_text())
    idx["shards"][1]["bytes"] = cut
    (shards / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match=r"shard-000001\.tar: 5 samples, the index says 8"):
        ShardBatches(shards, batch_size=4)
    # cut between two members of one sample: an incomplete sample, named
    victim.write_bytes(whole[:members[members.index(next(m for m in members if m.offset == cut)) + 1].offset])
    idx["shards"][1]["bytes"] = victim.stat().st_size
    (shards / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sample '00000_000013' is incomplete"):
        ShardBatches(shards, batch_size=4)
    (shards / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="shard-000001.tar: missing, the index lists it"):
        ShardBatches(shards, batch_size=4)


def test_reads_shards_written_by_features_shards(tmp_path):
    """The contract end to end: shards from the features package's own writer."""
    from _sigma import shards as fs

    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        lat = np.concatenate([rng.normal(size=(4, 4, 8)), np.full((4, 4, 8), 0.05)]).astype(np.float16)
        samples.append({"key": f"00001_{i:06d}", "meta": {"key": f"00001_{i:06d}", "bucket": "0.5"},
                        "latent": fs.npy_bytes(lat),
                        "t5_long": None if i == 0 else fs.npy_bytes(rng.normal(size=(7, D)).astype(np.float16)),
                        "t5_short": fs.npy_bytes(rng.normal(size=(2, D)).astype(np.float16))})
    d = tmp_path / "s"
    summ = fs.write_shard(d / fs.shard_name(0), samples, {})
    fs.write_index(d, fs.build_index(64, [summ], {"name": "v", "scale_factor": SCALE, "latent_channels": 4},
                                     {"name": "t", "max_length": 300, "dim": D}))
    b = next(ShardBatches(d, batch_size=6, long_ratio=1.0, caption_dropout=0.0))
    assert b["x"].shape == (6, 4, 4, 8) and b["bucket"] == "0.5"
    lens = dict(zip(b["keys"], b["mask"].sum(1).tolist()))
    assert lens["00001_000000"] == 2 and all(v == 7 for k, v in lens.items() if k != "00001_000000")
    assert not b["long"][b["keys"].index("00001_000000")]  # no long caption: the short one is used


def test_prefetch_yields_the_same_batches_and_consumed_position(shards):
    from training.data import make_batches

    plain = make_batches(shards, 4, 0, 1, 2, 0.6, 0.1, "batch", 300, prefetch=0)
    pre = make_batches(shards, 4, 0, 1, 2, 0.6, 0.1, "batch", 300, prefetch=3)
    for _ in range(8):
        a, b = next(plain), next(pre)
        assert a["keys"] == b["keys"] and torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert pre.state_dict() == plain.state_dict()  # the consumed position, not the thread's
    resumed = make_batches(shards, 4, 0, 1, 2, 0.6, 0.1, "batch", 300, prefetch=2, position=pre.state_dict())
    assert torch.equal(next(resumed)["x"], next(plain)["x"])
    for d in (plain, pre, resumed):
        d.close()
