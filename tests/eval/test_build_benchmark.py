"""Benchmark selection: deterministic checksum, eligibility, no duplicates, honest sizes, versions."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from _sigma import fs, holdout, manifest
from eval import build_benchmark as bb
from eval import stratify
from evaldata import make_output, pipeline_cfg, write_shard


def _build(out, **kw):
    cfg = pipeline_cfg(out, **kw)
    info = bb.build(cfg)
    rows, _ = bb.read_benchmark(str(out), info["version"])
    return info, rows


def test_building_twice_gives_the_same_checksum(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_output(a)
    make_output(b)
    ia, _ = _build(a)
    ib, _ = _build(b)
    assert ia["checksum"] == ib["checksum"] and ia["version"] == ib["version"] and ia["n"] == 24
    again = bb.build(pipeline_cfg(a))  # existing version: verified, not redrawn
    assert again["unchanged"] and again["checksum"] == ia["checksum"]
    rows, info = bb.read_benchmark(str(a), ia["version"])
    assert bb.checksum(rows) == info["checksum"] == ia["checksum"]


def test_a_changed_config_builds_a_new_version_and_keeps_the_old_one_held_out(fake_out):
    out, _ = fake_out
    v1, rows1 = _build(out)
    v2, rows2 = _build(out, seed=1)
    assert v2["version"] != v1["version"] and v2["checksum"] != v1["checksum"] and not v2.get("unchanged")
    assert v1["version"].startswith("v1-") and sorted(holdout.versions(str(out))) == sorted([v1["version"], v2["version"]])
    # building v2 never returns v1's keys to training: features excludes the union
    held = holdout.excluded_keys(str(out))
    assert {r["key"] for r in rows1} | {r["key"] for r in rows2} <= held
    assert held == holdout.version_keys(str(out), v1["version"]) | holdout.version_keys(str(out), v2["version"])
    # the same config again finds v2 (nothing redrawn) and the first one is still intact
    assert bb.build(pipeline_cfg(out, seed=1))["unchanged"]
    assert bb.read_benchmark(str(out), v1["version"])[1]["checksum"] == v1["checksum"]
    # a tampered benchmark is refused
    d = bb.benchmark_dir(str(out), v1["version"])
    t = fs.read_parquet(fs.join(d, "benchmark.parquet"))
    fs.write_parquet(fs.join(d, "benchmark.parquet"), t.slice(1))
    with pytest.raises(ValueError, match="checksum"):
        bb.build(pipeline_cfg(out))


def test_selection_rules(fake_out):
    out, facts = fake_out
    info, rows = _build(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == info["n"] == 24
    assert not set(keys) & facts["bad"]  # failed, unselected, caption-less rows never enter
    prompts = [stratify.normalise_prompt(r["prompt"]) for r in rows]
    assert len(prompts) == len(set(prompts))
    assert all(r["prompt_long"] and r["prompt_short"] and r["prompt"] == r["prompt_long"] for r in rows)
    assert min(r["aesthetic"] for r in rows) >= info["selection"]["aesthetic_cut"]
    # no near duplicates: the max cosine between chosen CLIP embeddings is below the threshold
    ek, emb = manifest.read_embeddings(str(out))
    idx = {k: i for i, k in enumerate(ek.tolist())}
    e = emb[[idx[k] for k in keys]].astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert (e @ e.T - 2 * np.eye(len(keys))).max() < 0.9
    for r in rows:
        assert r["image"] == f"download/{int(r['key'][:5]):05d}.tar" and len(r["sha256"]) == 64
    assert set(keys) <= holdout.version_keys(str(out), info["version"])
    assert sum(info["buckets"].values()) == 24


def test_near_duplicates_and_duplicate_prompts_are_rejected(tmp_path):
    out = tmp_path / "run"
    make_output(out)
    # take every eligible row: then both members of a near-duplicate pair / prompt pair compete
    info, rows = _build(out, n=1000, aesthetic_quantile=0.0, allow_smaller=True)
    keys = {r["key"] for r in rows}
    assert not {"00000_000010", "00000_000011"} <= keys
    assert not {"00000_000020", "00000_000021"} <= keys
    assert not {"00000_000030", "00000_000031"} <= keys and not {"00001_000012", "00001_000013"} <= keys
    rej = info["selection"]["rejected"]
    assert rej["near_duplicate"] >= 2 and rej["duplicate_prompt"] >= 2
    assert info["n"] == info["counts"]["eligible"] - rej["near_duplicate"] - rej["duplicate_prompt"]


def test_fewer_eligible_rows_than_asked_is_an_error_unless_allowed(fake_out):
    out, _ = fake_out
    with pytest.raises(bb.BenchmarkError, match="only 68 eligible rows for n = 1000.*--allow-smaller"):
        bb.build(pipeline_cfg(out, n=1000))
    assert not holdout.versions(str(out))  # nothing half-built is left behind
    # enough eligible rows, but prompt / near duplicates make the draw short: also an error
    with pytest.raises(bb.BenchmarkError, match="62 of 68 pairs.*4 repeat a prompt and 2 are within cosine"):
        bb.build(pipeline_cfg(out, n=68, aesthetic_quantile=0.0))
    info, rows = _build(out, n=1000, allow_smaller=True)
    assert info["short"] and info["n"] == len(rows) == 62 < info["n_requested"] == 1000
    assert "62 of 1000 pairs: 68 eligible rows" in info["selection"]["short_because"]
    assert "SMALLER" in bb.summary_text(info)


def test_size_target_comes_before_the_aesthetic_cut(fake_out):
    out, _ = fake_out
    # the preferred cut (median) leaves ~34 rows: n = 24 fits, the cut is not relaxed
    info, rows = _build(out, n=24, aesthetic_quantile=0.5)
    aes = [r["aesthetic"] for r in manifest.read_manifest(str(out)).to_pylist()
           if r["status"] == "ok" and r["selected"] and r["caption_long"]]
    assert not info["selection"]["aesthetic_relaxed"]
    assert info["selection"]["aesthetic_cut"] == pytest.approx(np.quantile(aes, 0.5))
    # n = 50 cannot be met at the median: relaxed step by step until it is, and reported
    info, rows = _build(out, n=50, aesthetic_quantile=0.5)
    sel = info["selection"]
    assert info["n"] == 50 and sel["aesthetic_relaxed"] and sel["attempts"][0]["chosen"] < 50 <= sel["attempts"][-1]["chosen"]
    assert sel["aesthetic_cut"] < np.quantile(aes, 0.5) and min(r["aesthetic"] for r in rows) >= sel["aesthetic_cut"]
    # a hard floor is never relaxed: then the report says why it is short
    with pytest.raises(bb.BenchmarkError, match="floor aesthetic_min = 6.0"):
        bb.build(pipeline_cfg(out, n=50, aesthetic_min=6.0))


def test_rows_in_training_shards_are_never_eligible(fake_out):
    out, facts = fake_out
    eligible = [k for k in facts["keys"] if k not in facts["bad"]]
    in_shards = eligible[::2]
    write_shard(out, in_shards)
    info, rows = _build(out, n=1000, aesthetic_quantile=0.0, allow_smaller=True)
    assert rows and not {r["key"] for r in rows} & set(in_shards)
    assert info["counts"]["ineligible"]["in_training_shards"] == len(in_shards)
    # copies of the new rows that are already in the shards are reported (rerun features)
    assert info["hold_out"]["already_in_training_shards"] == len(holdout.version_keys(str(out), info["version"])
                                                                  & set(in_shards))


def test_no_benchmark_when_everything_is_already_in_training_shards(fake_out):
    out, facts = fake_out
    write_shard(out, facts["keys"])
    with pytest.raises(bb.BenchmarkError, match="BEFORE features"):
        bb.build(pipeline_cfg(out))
    assert not holdout.versions(str(out))


def test_quotas_are_proportional_and_exact():
    sizes = {"a": 50, "b": 30, "c": 15, "d": 5}
    q = stratify.quotas(sizes, 17)
    assert sum(q.values()) == 17
    for s, c in sizes.items():
        assert abs(q[s] - 17 * c / 100) < 1
    assert stratify.quotas(sizes, 500) == sizes


def test_strata_follow_the_candidate_mix(tmp_path):
    out = tmp_path / "run"
    make_output(out, n_rows=160, parts=2)
    info, rows = _build(out, n=40, aesthetic_quantile=0.0, leak_threshold=1.0, length_bins=2)
    elig = [r for r in manifest.read_manifest(str(out)).to_pylist()
            if r["status"] == "ok" and r["selected"] and r["caption_long"]]
    by_bucket = {}
    for r in elig:  # independent count of the eligible mix per bucket
        b = stratify.nearest_bucket(r["height"] / r["width"])
        by_bucket[b] = by_bucket.get(b, 0) + 1
    for b, c in by_bucket.items():
        got = sum(1 for r in rows if r["bucket"] == b)
        assert abs(got - 40 * c / len(elig)) <= 2, (b, got, c)  # 2 length bins: +-1 rounding each
    assert info["selection"]["quota_filled"] == info["n"] - info["selection"]["filled_after"]


def test_prompt_length_report_matches_open_clip(fake_out):
    import open_clip

    out, _ = fake_out
    info, rows = _build(out)
    toks = open_clip.tokenize([r["prompt"] for r in rows], context_length=1000)  # independent count
    lengths = (toks != 0).sum(dim=1).numpy()
    s = info["prompt_clip_tokens"]["prompt"]
    assert s["over_context"] == int((lengths > 77).sum()) > 0
    assert s["frac_over_context"] == pytest.approx((lengths > 77).mean())
    assert [r["clip_tokens"] for r in rows] == lengths.tolist()
    assert "over 77 tokens" in bb.summary_text(info)


def test_cli(tmp_path):
    out = tmp_path / "run"
    make_output(out)
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text(json.dumps({"pipelines": {"x": {"output": str(out), "eval": {"n": 10, "fid_extractor": "tiny"}}}}))
    info = bb.main(["--config", str(yaml_path), "--pipeline", "x"])
    assert info["n"] == 10 and (out / "config.resolved.yaml").exists()
    info2 = bb.main(["--config", str(yaml_path), "--pipeline", "x", "--set", "eval.seed=3"])
    assert info2["checksum"] != info["checksum"] and info2["version"] != info["version"]
    with pytest.raises(bb.BenchmarkError):
        bb.main(["--config", str(yaml_path), "--pipeline", "x", "--set", "eval.n=500"])
    small = bb.main(["--config", str(yaml_path), "--pipeline", "x", "--set", "eval.n=500", "--allow-smaller"])
    assert small["short"] and small["allow_smaller"]
    assert dataclasses.is_dataclass(pipeline_cfg(out).eval)


def test_pooled_selection_equals_the_full_greedy(tmp_path, monkeypatch):
    """The O(N) pool (grown on demand) picks exactly what a greedy over every candidate picks,
    also when most candidates are near duplicates (forcing the pool to grow)."""
    out = tmp_path / "run"
    make_output(out, n_rows=300, parts=3, dim=4)  # 4-d embeddings: many pairs above the threshold
    cfg = pipeline_cfg(out, n=30, aesthetic_quantile=0.0, leak_threshold=0.8, length_bins=2)
    cand, _ = stratify.load_candidates(str(out), cfg.eval, set())
    small, s1 = stratify.select(str(out), cand, cfg.eval, float("-inf"))
    assert s1["rejected"]["near_duplicate"] > 10
    monkeypatch.setattr(stratify, "POOL_FACTOR", 1e9)  # pool = every candidate
    full, s2 = stratify.select(str(out), cand, cfg.eval, float("-inf"))
    assert bb.checksum(small) == bb.checksum(full) and s2["pool"] >= s1["pool"]


def test_vectorised_buckets_match_features_buckets():
    from _sigma.buckets import nearest_key, table

    keys = np.array([float(k) for k in table(1024)])
    ratios = np.concatenate([np.linspace(0.05, 6, 997), keys, (keys[1:] + keys[:-1]) / 2])  # incl. exact ties
    got = stratify.nearest_buckets(ratios)
    assert got.tolist() == [nearest_key(r, 1024) for r in ratios]


def test_eval_split_is_a_pipeline_stage_between_caption_and_features(tmp_path, fake_out):
    from curation import run as crun
    from curation.config import STAGES

    assert STAGES.index("caption") < STAGES.index("eval_split") < STAGES.index("features")
    assert crun._stage_fn("eval_split") is bb.run_eval_split
    out, _ = fake_out
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text(json.dumps({"pipelines": {"x": {"output": str(out), "eval": {"n": 6, "fid_extractor": "tiny"}}}}))
    cfg, stages = crun.resolve(crun.parse_args(["--config", str(yaml_path), "--pipeline", "x",
                                                "--stages", "features,eval_split,caption"]))
    assert stages == ["caption", "eval_split", "features"]  # run in pipeline order, whatever the order given
    res = bb.run_eval_split(cfg, str(out), progress=False)  # what curation.run calls
    assert res["n"] == 6 and not res["unchanged"] and res["held_out"] >= 6
    assert holdout.versions(str(out)) == [res["version"]]
    assert bb.run_eval_split(cfg, str(out), progress=False)["unchanged"]
