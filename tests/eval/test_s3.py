"""Eval on an object store: benchmark + hold-out list, generation and scoring with --output
s3://... against a real S3 HTTP endpoint (moto server), with Ray tasks and actors doing the work."""
from __future__ import annotations

import os

import numpy as np
import pytest

from _sigma import fs, holdout
from eval import build_benchmark as bb
from eval import generate as g
from eval import report, score
from evaldata import gen_cfg, make_output


def _upload(local: str, uri: str) -> int:
    n = 0
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local)
            fs.write_bytes(fs.join(uri, *rel.split(os.sep)), open(os.path.join(root, f), "rb").read())
            n += 1
    return n


@pytest.mark.slow
def test_benchmark_generate_score_on_s3(tmp_path, s3_bucket, ray_local, tiny_models):
    local = tmp_path / "local"
    make_output(local, n_rows=40)
    out = f"{s3_bucket}/run"
    assert _upload(str(local), out) > 4
    cfg = gen_cfg(out, tiny_models, n=4)
    info = bb.build(cfg)  # candidate, pool and hold-out tasks run on Ray workers
    assert info["n"] == 4 and fs.isfile(holdout.exclude_uri(out, info["version"]))
    assert {r["key"] for r in bb.current(cfg)[1]} <= holdout.excluded_keys(out)
    assert bb.build(cfg)["unchanged"]
    s = g.generate(cfg, str(tiny_models / "dit"), name="s3run", use_ray=True, progress=False)  # actors write PNGs
    assert s["ok"] == 4 and s["complete"] and s["dir"].startswith("s3://")
    res = score.score_run(cfg, "s3run", progress=False)
    assert res["n_scored"] == 4 and res["comparable"] and np.isfinite(res["fid"])
    md = report.write_report(out)
    assert md.startswith("s3://") and "s3run" in fs.read_text(md)
    names = {p for p, _ in fs.list_files(fs.join(out, "eval"), recursive=True)}
    version = info["version"]
    for p in (f"benchmarks/{version}/exclude.parquet", f"benchmarks/{version}/benchmark.json",
              "generations/s3run/generation.json", "scores/s3run.json", "report.md"):
        assert p in names, (p, sorted(names))
    assert len([p for p in names if p.startswith("generations/s3run/") and p.endswith(".png")]) == 4
    refs = sorted(p for p in names if p.startswith("reference/"))
    # one cached reference of each kind: Inception features (FID/KID) and CLIP embeddings (CMMD)
    assert len(refs) == 2 and sum(p.startswith("reference/cmmd-") for p in refs) == 1, refs
    assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:")  # nothing landed on local disk
