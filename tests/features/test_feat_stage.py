"""The features stage end to end on Ray (plan tasks per part, workers write the shards, the driver
writes index.json): shards + index agree, contents are right, readable by webdataset and ray.data,
resumable (shards verified before reuse), deterministic."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from _sigma import buckets, shards
from features import plan
from features.stage import run_features
from feat_data import features_cfg, make_pipeline_output

NAMES = ["shard-00000-000000.tar", "shard-00000-000001.tar", "shard-00001-000000.tar", "shard-00001-000001.tar"]


@pytest.fixture(scope="module")
def run1(tmp_path_factory, feature_models, ray_local):
    out = tmp_path_factory.mktemp("feat") / "run"
    facts = make_pipeline_output(out)
    summary = run_features(features_cfg(out, feature_models), out, progress=False)
    return out, facts, summary


def _sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _tars(out: Path, res: int) -> dict[str, str]:
    d = Path(shards.shards_dir(out, res))
    return {p.name: _sha(p) for p in sorted(d.glob("shard-*.tar"))}


def _same_samples(a, b) -> None:
    """Same keys, metadata and shapes in the same shards; arrays equal up to float noise (a shard
    recomputed alone sees other batch compositions / padding lengths than in the first run)."""
    ia, ib = shards.read_index(a), shards.read_index(b)
    assert [(s["name"], s["samples"], s["buckets"]) for s in ia["shards"]] == \
        [(s["name"], s["samples"], s["buckets"]) for s in ib["shards"]]
    for x, y in zip(shards.iter_samples(a), shards.iter_samples(b), strict=True):
        assert x["key"] == y["key"] and x["meta"] == y["meta"]
        for k in ("latent", "t5_long", "t5_short"):
            assert (x[k] is None) == (y[k] is None)
            if x[k] is not None:
                assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype
                np.testing.assert_allclose(x[k].astype(np.float32), y[k].astype(np.float32), atol=1e-2)


def _index_on_disk(d) -> None:
    """Every index entry is what is on disk: size, sha256, sample count."""
    for s in shards.read_index(d)["shards"]:
        p = Path(d) / s["name"]
        assert s["bytes"] == p.stat().st_size and s["sha256"] == _sha(p)
        assert len(list(shards.iter_shard(p))) == s["samples"]


def test_index_agrees_with_shards(run1):
    out, facts, summary = run1
    expect = sorted(set(facts["selected"]) - set(facts["missing_image"]))
    for res in (256, 512):
        d = Path(shards.shards_dir(out, res))
        index = shards.read_index(d)
        assert index["format"] == "sigma-shards/2" and index["resolution"] == res
        assert index["vae"]["scale_factor"] == 0.13025 and index["vae"]["latent_channels"] == 4
        assert index["t5"] == {"name": str(Path(index["t5"]["name"])), "max_length": 300, "dim": 32, "dtype": "fp16"}
        # Shards never span parts: part 0 has 5 selected rows (4 + 1), part 1 has 6 (4 + 2).
        assert [s["name"] for s in index["shards"]] == NAMES
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["index.json"] + NAMES
        _index_on_disk(d)
        keys, buckets_seen = [], {}
        for s in index["shards"]:
            got = list(shards.iter_shard(d / s["name"], s))
            per = {}
            for g in got:
                per[g["meta"]["bucket"]] = per.get(g["meta"]["bucket"], 0) + 1
            assert per == s["buckets"]
            for b, n in per.items():
                buckets_seen[b] = buckets_seen.get(b, 0) + n
            keys += [g["key"] for g in got]
        assert keys == expect  # no duplicates, no gaps, sorted: a function of the selected keys
        assert shards.shard_keys(out) == set(expect)
        assert index["samples"] == len(expect) and index["buckets"] == buckets_seen
        assert index["bytes"] == sum(s["bytes"] for s in index["shards"])
        assert index["failed"] == 1 and [f["key"] for f in shards.failed_rows(d)] == facts["missing_image"]
        assert summary["resolutions"][res]["samples"] == len(expect)
    assert summary["shards_written"] == 8 and summary["rows"] == 11 and summary["nodes"]


def test_sample_contents(run1, feature_models):
    from features.t5 import T5Embedder

    out, facts, _ = run1
    emb = T5Embedder(str(feature_models / "t5"), precision="fp32")
    for res in (256, 512):
        for s in shards.iter_samples(shards.shards_dir(out, res)):
            m, row = s["meta"], facts["rows"][s["key"]]
            key, h, w = buckets.assign(row["width"], row["height"], res)
            assert (m["bucket"], m["height"], m["width"]) == (key, h, w)
            assert (m["orig_width"], m["orig_height"], m["url"]) == (row["width"], row["height"], row["url"])
            assert m["upscaled"] == (max(h / row["height"], w / row["width"]) > 1)
            assert m["caption_short"] == row["caption"] and m["caption_long"] == row["caption_long"]
            assert m["aesthetic"] == pytest.approx(row["aesthetic"])
            assert s["latent"].dtype == np.float16 and s["latent"].shape == (8, h // 8, w // 8)
            assert (s["latent"][4:] > 0).all()  # std half
            assert s["t5_short"].dtype == np.float16 and s["t5_short"].shape == (m["n_short"], 32)
            assert m["n_short"] == emb.token_counts([row["caption"]])[0]
            if s["key"] in facts["no_long"]:
                assert s["t5_long"] is None and m["n_long"] == 0 and m["caption_long"] is None
            else:
                assert s["t5_long"].shape == (m["n_long"], 32)
                ref = emb.encode([row["caption_long"]])[0]
                np.testing.assert_allclose(s["t5_long"].astype(np.float32), ref.astype(np.float32), atol=2e-3)


def test_readable_with_webdataset_and_ray_data(run1, ray_local):
    import io

    import ray.data
    import webdataset as wds

    out, facts, _ = run1
    for res in (256, 512):
        d = shards.shards_dir(out, res)
        index = shards.read_index(d)
        n = 0
        for sample in wds.WebDataset([os.path.join(d, s["name"]) for s in index["shards"]], shardshuffle=False,
                                     empty_check=False).decode():
            meta = sample["json"]
            assert sample["__key__"] == meta["key"]
            lat = sample["latent.npy"]
            assert lat.dtype == np.float16 and lat.shape == (8, meta["height"] // 8, meta["width"] // 8)
            assert sample["t5_short.npy"].shape == (meta["n_short"], index["t5"]["dim"])
            assert ("t5_long.npy" in sample) == (meta["n_long"] > 0)
            n += 1
        assert n == index["samples"]
    # Others read the shards with ray.data: one row per sample, members as raw bytes.
    d = shards.shards_dir(out, 512)
    index = shards.read_index(d)
    rows = ray.data.read_webdataset(d, file_extensions=["tar"], decoder=None).take_all()
    assert len(rows) == index["samples"] == len(set(facts["selected"]) - set(facts["missing_image"]))
    per_bucket: dict = {}
    for row in rows:
        meta = json.loads(row["json"])
        t5 = np.load(io.BytesIO(row["t5_short.npy"]))
        assert t5.dtype == np.float16 and t5.shape == (meta["n_short"], index["t5"]["dim"])
        per_bucket[meta["bucket"]] = per_bucket.get(meta["bucket"], 0) + 1
    assert per_bucket == index["buckets"]


def _cut_at_member_boundary(path: Path) -> None:
    """Truncate a tar after its second-to-last sample (a clean member boundary, as a copy cut short)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.split(".")[0]
    first_of_last = next(m for m in members if m.name.split(".")[0] == last_key)
    with open(path, "r+b") as f:
        f.truncate(first_of_last.offset)


def test_rerun_verifies_reused_shards_and_redoes_only_bad_ones(run1, tmp_path, feature_models):
    """Missing, truncated and corrupted (same size) finished shards are redone, the others reused;
    the index never claims what is not on disk; readers name a truncated shard."""
    out0, _, _ = run1
    out = Path(shutil.copytree(out0, tmp_path / "run"))
    before = {r: _tars(out0, r) for r in (256, 512)}
    d = Path(shards.shards_dir(out, 256))
    entry = {e["name"]: e for e in shards.read_index(d)["shards"]}
    _cut_at_member_boundary(d / NAMES[2])
    with pytest.raises(shards.ShardError, match=NAMES[2]):  # readers refuse the cut tar
        list(shards.iter_samples(d))
    with pytest.raises(shards.ShardError, match=NAMES[2]):  # the training reader refuses it too
        shards.scan_shard(str(d), entry[NAMES[2]])
    (d / NAMES[1]).unlink()
    with open(d / NAMES[3], "r+b") as f:  # one flipped byte inside a payload, size unchanged
        f.seek(2000)
        b = f.read(1)
        f.seek(2000)
        f.write(bytes([b[0] ^ 0xFF]))
    (d / f".{NAMES[0]}.tmp-1-abc").write_bytes(b"half a tar")  # a killed writer's leftover
    (d / "shard-00007-000000.tar").write_bytes(b"not in the plan")  # e.g. from a bigger earlier run
    s = run_features(features_cfg(out, feature_models), out, progress=False)
    assert s["shards_written"] == 3 and s["redone"] == {"truncated": 1, "corrupt": 1}
    after = {r: _tars(out, r) for r in (256, 512)}
    assert after[512] == before[512] and after[256][NAMES[0]] == before[256][NAMES[0]]  # untouched
    assert set(after[256]) == set(NAMES)  # nothing extra, nothing missing
    assert sorted(p.name for p in d.iterdir()) == sorted(["index.json"] + NAMES + ["." + n[:-4] + ".json" for n in NAMES])
    _same_samples(shards.shards_dir(out0, 256), d)
    _index_on_disk(d)
    # Nothing to do: a rerun writes nothing (plan tasks only) and keeps the same index.
    index = shards.read_index(d)
    again = run_features(features_cfg(out, feature_models), out, progress=False)
    assert again["shards_written"] == 0 and shards.read_index(d) == index


def test_exclusions_replan_only_their_part(run1, tmp_path, feature_models):
    """features.exclude_keys and the output's eval hold-out (_sigma.holdout: every benchmark
    version's exclude.parquet) are both held out; only the part that lost rows gets new shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out0, facts, _ = run1
    out = Path(shutil.copytree(out0, tmp_path / "run"))
    part0 = [k for k in facts["selected"] if k.startswith("00000_")]
    (tmp_path / "exclude.txt").write_text(f"# held out\n{part0[0]}\n")
    hold = out / "eval" / "benchmarks" / "v1-test" / "exclude.parquet"  # written by eval_split
    hold.parent.mkdir(parents=True)
    from _sigma import holdout  # the list records the parts it covers (features refuses a stale one)

    searched = json.dumps({p: holdout.part_state(str(out), p) for p in (0, 1)}).encode()
    pq.write_table(pa.table({"key": [part0[1]], "reason": ["benchmark"]}).replace_schema_metadata(
        {holdout.STATE_KEY: searched}), hold)
    before = _tars(out0, 256)
    s = run_features(features_cfg(out, feature_models, exclude_keys=str(tmp_path / "exclude.txt"),
                                  resolutions=[256]), out, progress=False)
    assert s["excluded"] == 2 and s["exclude_keys"] == [str(tmp_path / "exclude.txt"), plan.HOLDOUT]
    assert s["shards_written"] == 1
    d = shards.shards_dir(out, 256)
    index = shards.read_index(d)
    keys = [x["key"] for x in shards.iter_samples(d)]
    assert not {part0[0], part0[1]} & set(keys) and index["samples"] == len(keys) == 8 and index["excluded"] == 2
    after = _tars(out, 256)
    assert [s["name"] for s in index["shards"]] == [NAMES[0]] + NAMES[2:]  # part 0: 3 rows, one shard
    assert {n: after[n] for n in NAMES[2:]} == {n: before[n] for n in NAMES[2:]}  # part 1 reused


def test_features_alone_on_a_grown_manifest_leaks_nothing(run1, tmp_path, feature_models):
    """Rows added after the benchmark was built (a new part with a prompt twin of a benchmark row):
    features run alone refuses the stale hold-out and writes nothing; once eval_split's search has
    covered the new part, the twin stays out of every shard."""
    import pyarrow as pa

    from _sigma import holdout, manifest
    from _sigma.holdout import StaleHoldoutError
    from eval.leaks import update_exclusions

    out0, facts, _ = run1
    out = Path(shutil.copytree(out0, tmp_path / "run"))
    bench = facts["rows"]["00000_000000"]
    brow = {"key": bench["key"], "prompt": bench["caption_long"], "prompt_long": bench["caption_long"],
            "prompt_short": bench["caption"], "sha256": None}
    update_exclusions(str(out), "v1-test", [brow], lambda: None, 0.9)  # eval_split over parts 0 and 1
    grown = tmp_path / "grown"
    make_pipeline_output(grown, n_parts=3)  # its part 2 arrives after the benchmark
    shutil.copy(grown / "download" / "00002.tar", out / "download" / "00002.tar")
    t = manifest.read_part(str(grown), 2)
    caps = t.column("caption_long").to_pylist()
    caps[0] = "  " + bench["caption_long"].upper()  # the prompt twin
    manifest.write_part(str(out), 2, t.set_column(t.column_names.index("caption_long"), "caption_long",
                                                  pa.array(caps)), "select", "test")
    before = _tars(out, 256)
    cfg = features_cfg(out, feature_models, resolutions=[256])
    with pytest.raises(StaleHoldoutError, match=r"v1-test: parts \[2\]"):
        run_features(cfg, out, progress=False)
    assert _tars(out, 256) == before  # nothing written
    s = update_exclusions(str(out), "v1-test", [brow], lambda: None, 0.9)  # eval_split again
    assert s["parts_searched"] == 1 and s["by_reason"]["same_prompt"] == 1
    res = run_features(cfg, out, progress=False)
    keys = {x["key"] for x in shards.iter_samples(shards.shards_dir(out, 256))}
    assert res["holdout_parts_covered"] == {"v1-test": 3}
    assert "00002_000000" not in keys and bench["key"] not in keys
    assert holdout.excluded_keys(str(out)) == {"00002_000000", bench["key"]}
    assert {"00002_000001", "00002_000003"} <= keys  # the other new rows are trained on


def test_key_lists_text_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "k.txt").write_text("# comment\n00000_000001\n\n00001_000002\n")
    pq.write_table(pa.table({"key": ["00000_000001", None], "prompt": ["a", "b"]}), tmp_path / "k.parquet")
    assert plan.read_key_list(str(tmp_path / "k.txt")) == {"00000_000001", "00001_000002"}
    assert plan.read_key_list(str(tmp_path / "k.parquet")) == {"00000_000001"}


def test_config_validation():
    from _sigma.config import ConfigError, parse
    from features.config import FeaturesConfig

    c = parse(FeaturesConfig, {"resolutions": [512, 2880], "t5_resources": {"batch_size": 2, "num_gpus": 1}})
    assert c.t5_resources.num_gpus == 1.0 and c.vae_resources.batch_size == 8 and c.t5_max_length == 300
    assert c.verify_shards == "sha256"
    for bad in ({"resolutions": [300]}, {"precision": "int8"}, {"shard_max_samples": 0}, {"nope": 1},
                {"vae_resources": {"actors": 0}}, {"t5_batch_tokens": -1}, {"verify_shards": "md5"}):
        with pytest.raises(ConfigError):
            parse(FeaturesConfig, bad, "features")
    with pytest.raises(ConfigError, match=r"text_dtype: got 'fp4', allowed: 'fp16' \| 'fp8'"):
        parse(FeaturesConfig, {"text_dtype": "fp4"}, "features")
    from curation.config import load_pipeline

    demo = load_pipeline("pipelines.yaml", "demo", check=False)
    assert demo.features.resolutions == (256, 512) and demo.features.t5.endswith("models/tiny/t5")


@pytest.mark.slow
def test_fp8_text_dtype_and_byte_target(run1, tmp_path, feature_models):
    """text_dtype fp8 with a byte target: shards cut at ~40 kB by the estimate (fp8 token sizes);
    same keys and metadata as fp16; T5 tokens decode within e4m3's error; webdataset sees a plain
    structured npy; the training loader decodes it."""
    import webdataset as wds

    from training.data import ShardBatches

    out0, _, _ = run1
    out = tmp_path / "run"
    make_pipeline_output(out)
    run_features(features_cfg(out, feature_models, text_dtype="fp8", resolutions=[256], shard_max_samples=100,
                              shard_max_bytes=40_000), out, progress=False)
    a, b = Path(shards.shards_dir(out0, 256)), Path(shards.shards_dir(out, 256))
    ia, ib = shards.read_index(a), shards.read_index(b)
    assert ib["t5"]["dtype"] == "fp8" and ib["fingerprint"] != ia["fingerprint"]
    # Byte target: more shards than the sample cut alone gives (1 per part), each within the target.
    assert len(ib["shards"]) > 2 and ib["samples"] == 10
    for s in ib["shards"]:
        assert s["samples"] == 1 or s["bytes"] <= 40_000 * 1.05  # estimate is within a few %
    with tarfile.open(b / ib["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert names[:2] == [names[0].split(".")[0] + ".json", names[0].split(".")[0] + ".latent.npy"]
    text_a = text_b = 0
    for x, y in zip(shards.iter_samples(a), shards.iter_samples(b), strict=True):  # both in key order
        assert x["key"] == y["key"] and x["meta"] == y["meta"]
        np.testing.assert_allclose(x["latent"].astype(np.float32), y["latent"].astype(np.float32), atol=1e-2)
        for k in ("t5_long", "t5_short"):
            if x[k] is None:
                assert y[k] is None
                continue
            ref = x[k].astype(np.float32)
            assert y[k].dtype == np.float32 and y[k].shape == ref.shape
            rel = np.linalg.norm(y[k] - ref) / np.linalg.norm(ref)
            assert 0 < rel < 0.05  # lossy, but only by e4m3 rounding (~2-3 % RMS)
            text_a += ref.size * 2
            text_b += ref.size + 4 * ref.shape[0]
    # Stored T5 member sizes (tar totals round to 10 KiB records at these tiny dims): the npy
    # payload is 1 byte per element + 4 per token instead of 2 per element (headers aside).
    members = {}
    for d, idx in ((a, ia), (b, ib)):
        with_t5 = [m for s in idx["shards"] for m in tarfile.open(d / s["name"]) if ".t5_" in m.name]
        members[d] = (len(with_t5), sum(m.size for m in with_t5))
    n_members = members[a][0]
    assert members[b][0] == n_members
    assert abs((members[b][1] - members[a][1]) - (text_b - text_a)) <= 128 * n_members
    for sample in wds.WebDataset([str(b / s["name"]) for s in ib["shards"]], shardshuffle=False,
                                 empty_check=False).decode():
        raw = sample["t5_short.npy"]
        assert raw.dtype.names == ("scale", "fp8") and raw.shape == (sample["json"]["n_short"],)
        assert shards.decode_tokens(raw).shape == (sample["json"]["n_short"], ib["t5"]["dim"])
    # The training loader decodes fp8: each caption it yields is the fp16 reference within e4m3's error.
    ref = {x["key"]: x for x in shards.iter_samples(a)}
    batch = next(ShardBatches(b, batch_size=3, seed=0, caption_dropout=0.0))
    for i, key in enumerate(batch["keys"]):
        want = ref[key]["t5_long" if batch["long"][i] else "t5_short"].astype(np.float32)  # (n, D)
        n = int(batch["mask"][i].sum())
        assert n == want.shape[0]
        got = batch["y"][i, :n].numpy()
        assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
