"""The features stage end to end (in-process executor; tests/features/test_ray.py runs it on Ray):
shards + index agree, contents are right, readable by webdataset, resumable, deterministic."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from features import buckets, shards
from features.stage import run_features
from feat_data import features_cfg, make_pipeline_output


@pytest.fixture(scope="module")
def run1(tmp_path_factory, feature_models):
    out = tmp_path_factory.mktemp("feat") / "run"
    facts = make_pipeline_output(out)
    summary = run_features(features_cfg(out, feature_models), out, progress=False, executor="local")
    return out, facts, summary


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def _tars(out: Path, res: int) -> dict[str, str]:
    d = shards.shards_dir(out, res)
    return {p.name: _md5(p) for p in sorted(d.glob("shard-*.tar"))}


def _same_samples(a: Path, b: Path) -> None:
    """Same keys, metadata and shapes in the same shards; arrays equal up to float noise (a shard
    recomputed alone sees other batch compositions / padding lengths than in the first run)."""
    ia, ib = shards.read_index(a), shards.read_index(b)
    assert [(s["name"], s["samples"], s["bytes"], s["buckets"]) for s in ia["shards"]] == \
        [(s["name"], s["samples"], s["bytes"], s["buckets"]) for s in ib["shards"]]
    for s in ia["shards"]:
        for x, y in zip(shards.iter_shard(a / s["name"]), shards.iter_shard(b / s["name"]), strict=True):
            assert x["key"] == y["key"] and x["meta"] == y["meta"]
            for k in ("latent", "t5_long", "t5_short"):
                assert (x[k] is None) == (y[k] is None)
                if x[k] is not None:
                    assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype
                    np.testing.assert_allclose(x[k].astype(np.float32), y[k].astype(np.float32), atol=1e-2)


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_index_agrees_with_shards(run1):
    out, facts, summary = run1
    expect = sorted(set(facts["selected"]) - set(facts["missing_image"]))
    for res in (256, 512):
        d = shards.shards_dir(out, res)
        index = shards.read_index(d)
        assert index["format"] == "sigma-shards/1" and index["resolution"] == res
        assert index["vae"]["scale_factor"] == 0.13025 and index["vae"]["latent_channels"] == 4
        assert index["t5"] == {"name": str(Path(index["t5"]["name"])), "max_length": 300, "dim": 32, "dtype": "fp16"}
        # 11 selected rows, keys sorted, 4 per shard -> 4, 4, 3 planned; one image is missing.
        assert [s["name"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == \
            ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
        keys, buckets_seen = [], {}
        for s in index["shards"]:
            path = d / s["name"]
            assert s["bytes"] == path.stat().st_size
            got = list(shards.iter_shard(path))
            assert len(got) == s["samples"]
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
        assert [f["key"] for f in index["failed"]] == facts["missing_image"]
        assert summary["resolutions"][res]["samples"] == len(expect)


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


def test_readable_with_webdataset(run1):
    import webdataset as wds

    out, _, _ = run1
    for res in (256, 512):
        d = shards.shards_dir(out, res)
        index = shards.read_index(d)
        urls = [str(d / s["name"]) for s in index["shards"]]
        n = 0
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
            meta = sample["json"]
            assert sample["__key__"] == meta["key"]
            lat = sample["latent.npy"]
            assert lat.dtype == np.float16 and lat.shape == (8, meta["height"] // 8, meta["width"] // 8)
            assert sample["t5_short.npy"].shape == (meta["n_short"], index["t5"]["dim"])
            assert ("t5_long.npy" in sample) == (meta["n_long"] > 0)
            n += 1
        assert n == index["samples"]


def test_resume_recomputes_only_missing_shards(run1, tmp_path, feature_models):
    out0, _, _ = run1
    out = _copy(out0, tmp_path / "run")
    before = {r: _tars(out0, r) for r in (256, 512)}
    d = shards.shards_dir(out, 256)
    index_before = (d / "index.json").read_text()
    (d / "shard-000001.tar").unlink()
    (d / "index.json").unlink()
    (d / "shard-000002.tar.tmp").write_bytes(b"half a tar")  # a killed writer's leftover
    (d / "shard-000007.tar").write_bytes(b"not in the plan")  # e.g. from a bigger earlier run
    s = run_features(features_cfg(out, feature_models), out, progress=False, executor="local")
    assert s["shards_written"] == 1
    after = {r: _tars(out, r) for r in (256, 512)}
    assert after[512] == before[512]  # untouched
    assert set(after[256]) == set(before[256])  # nothing extra, nothing missing
    assert {k: v for k, v in after[256].items() if k != "shard-000001.tar"} == \
        {k: v for k, v in before[256].items() if k != "shard-000001.tar"}
    _same_samples(shards.shards_dir(out0, 256), d)
    assert json.loads((d / "index.json").read_text()) == json.loads(index_before)
    assert not list(d.glob("*.tmp*"))
    # Nothing to do: a rerun writes nothing and keeps the same index.
    assert run_features(features_cfg(out, feature_models), out, progress=False, executor="local")["shards_written"] == 0


def test_killed_run_resumes_without_duplicates_or_gaps(run1, tmp_path, feature_models, monkeypatch):
    out0, facts, _ = run1
    out = tmp_path / "run"
    make_pipeline_output(out)
    real = shards.write_shard
    calls = []

    def dying(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(shards, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run_features(features_cfg(out, feature_models), out, progress=False, executor="local")
    monkeypatch.setattr(shards, "write_shard", real)
    assert not (shards.shards_dir(out, 256) / "index.json").exists()
    assert sum(len(_tars(out, r)) for r in (256, 512)) == 2
    s = run_features(features_cfg(out, feature_models), out, progress=False, executor="local")
    assert s["shards_written"] == 4
    for r in (256, 512):
        _same_samples(shards.shards_dir(out0, r), shards.shards_dir(out, r))  # = the uninterrupted run


@pytest.mark.parametrize("fmt", ["txt", "parquet", "auto"])
def test_excluded_keys_never_enter_a_shard(run1, tmp_path, feature_models, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out0, facts, _ = run1
    out = _copy(out0, tmp_path / "run")
    drop = [facts["selected"][0], facts["selected"][5]]
    path = tmp_path / f"exclude.{fmt}"
    if fmt == "auto":  # not configured: every eval benchmark version's hold-out list (common.holdout)
        path = out / "eval" / "benchmarks" / "v1-test" / "exclude.parquet"
        path.parent.mkdir(parents=True)
    if fmt == "txt":
        path.write_text("\n".join(drop) + "\n")
    else:
        pq.write_table(pa.table({"key": drop, "reason": ["benchmark", "same_prompt"]}), path)
    s = run_features(features_cfg(out, feature_models, exclude_keys=None if fmt == "auto" else str(path),
                                  resolutions=[256]), out, progress=False, executor="local")
    assert s["excluded"] == 2 and s["exclude_keys"] == (None if fmt == "auto" else str(path))
    index = shards.read_index(shards.shards_dir(out, 256))
    keys = [x["key"] for x in shards.iter_samples(shards.shards_dir(out, 256))]
    assert not set(drop) & set(keys) and index["samples"] == len(keys) == 8 and index["excluded"] == 2


def test_byte_target_cuts_shards(tmp_path, feature_models):
    out = tmp_path / "run"
    make_pipeline_output(out)
    cfg = features_cfg(out, feature_models, resolutions=[256], shard_max_samples=100, shard_max_bytes=40_000)
    run_features(cfg, out, progress=False, executor="local")
    index = shards.read_index(shards.shards_dir(out, 256))
    assert len(index["shards"]) > 2 and index["samples"] == 10
    for s in index["shards"]:
        assert s["samples"] == 1 or s["bytes"] <= 40_000 * 1.05  # estimate is within a few %
    with tarfile.open(shards.shards_dir(out, 256) / index["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert names[:2] == [names[0].split(".")[0] + ".json", names[0].split(".")[0] + ".latent.npy"]


def test_config_validation():
    from common.config import ConfigError, parse
    from features.config import FeaturesConfig

    c = parse(FeaturesConfig, {"resolutions": [512, 2880], "t5_resources": {"batch_size": 2, "num_gpus": 1}})
    assert c.t5_resources.num_gpus == 1.0 and c.vae_resources.batch_size == 8 and c.t5_max_length == 300
    for bad in ({"resolutions": [300]}, {"precision": "int8"}, {"shard_max_samples": 0}, {"nope": 1},
                {"vae_resources": {"actors": 0}}, {"t5_batch_tokens": -1}):
        with pytest.raises(ConfigError):
            parse(FeaturesConfig, bad, "features")
    with pytest.raises(ConfigError, match="text_dtype: got 'fp4', allowed: fp16 | fp8"):
        parse(FeaturesConfig, {"text_dtype": "fp4"}, "features")
    from curation.config import load_pipeline

    demo = load_pipeline("pipelines.yaml", "demo", check=False)
    assert demo.features.resolutions == (256, 512) and demo.features.t5.endswith("models/tiny/t5")


@pytest.mark.slow
def test_sigkilled_run_resumes(run1, tmp_path, feature_models):
    """A real kill -9 of a features run in another process, then the same call again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    make_pipeline_output(out)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from feat_data import features_cfg; from features.stage import run_features; "
            "out = Path(sys.argv[2]); "
            "run_features(features_cfg(out, Path(sys.argv[3]), shard_max_samples=1), out, progress=False, "
            "executor='local')")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(out), str(feature_models)],
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = shards.shards_dir(out, 256)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(d.glob("shard-*.tar"))) < 3:
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = sum(len(list(shards.shards_dir(out, r).glob("shard-*.tar"))) for r in (256, 512))
    s = run_features(features_cfg(out, feature_models, shard_max_samples=1), out, progress=False, executor="local")
    assert s["shards_written"] == 22 - n_before and (not killed or 0 < n_before < 22)
    for r in (256, 512):
        dd = shards.shards_dir(out, r)
        index = shards.read_index(dd)
        assert len(index["shards"]) == 11 and index["samples"] == 10
        keys = [x["key"] for x in shards.iter_samples(dd)]
        assert keys == sorted(set(keys)) == sorted(shards.shard_keys(out))
        assert sorted(p.name for p in dd.glob("shard-*")) == [s["name"] for s in index["shards"]]


def test_fp8_text_dtype_halves_text_bytes_and_decodes_close(run1, tmp_path, feature_models):
    """text_dtype fp8: same shards, keys and metadata as fp16; T5 tokens decode within e4m3's
    error; webdataset sees a plain structured npy; the training loader decodes it."""
    import torch
    import webdataset as wds

    from training.data import ShardBatches

    out0, _, _ = run1
    out = tmp_path / "run"
    make_pipeline_output(out)
    run_features(features_cfg(out, feature_models, text_dtype="fp8"), out, progress=False, executor="local")
    a, b = shards.shards_dir(out0, 256), shards.shards_dir(out, 256)
    ia, ib = shards.read_index(a), shards.read_index(b)
    assert ib["t5"]["dtype"] == "fp8" and ib["fingerprint"] != ia["fingerprint"]
    assert [s["name"] for s in ia["shards"]] == [s["name"] for s in ib["shards"]]
    text_a = text_b = 0
    for x, y in zip(shards.iter_samples(a), shards.iter_samples(b), strict=True):
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
    ba = next(ShardBatches(a, batch_size=3, seed=0))
    bb = next(ShardBatches(b, batch_size=3, seed=0))
    assert ba["keys"] == bb["keys"] and ba["y"].shape == bb["y"].shape
    assert torch.equal(ba["mask"], bb["mask"]) and torch.allclose(ba["x"], bb["x"], atol=1e-2)
    err = (bb["y"] - ba["y"]).norm() / ba["y"].norm()
    assert 0 < float(err) < 0.05
