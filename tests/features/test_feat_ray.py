"""The features stage on Ray Data (actor pools for T5 and the VAE), read back with ray.data."""
from __future__ import annotations

import io

import numpy as np
import pytest
from feat_data import features_cfg, make_pipeline_output

from features import shards
from features.stage import run_features

pytestmark = pytest.mark.slow


def test_ray_run_matches_local_and_reads_with_ray_data(tmp_path, feature_models, ray_local):
    out_r, out_l = tmp_path / "ray", tmp_path / "local"
    facts = make_pipeline_output(out_r)
    make_pipeline_output(out_l)
    res = {"batch_size": 4, "actors": 1, "num_cpus": 0.5}  # 2 CPUs: leave room for the read/prepare tasks
    kw = dict(t5_resources=res, vae_resources=res)
    s = run_features(features_cfg(out_r, feature_models, **kw), out_r, progress=False, executor="ray")
    run_features(features_cfg(out_l, feature_models, **kw), out_l, progress=False, executor="local")
    assert s["shards_written"] == 6
    for r in (256, 512):
        a, b = shards.shards_dir(out_r, r), shards.shards_dir(out_l, r)
        ia, ib = shards.read_index(a), shards.read_index(b)
        assert [(x["name"], x["samples"], x["bytes"], x["buckets"]) for x in ia["shards"]] == \
            [(x["name"], x["samples"], x["bytes"], x["buckets"]) for x in ib["shards"]]
        for x, y in zip(shards.iter_samples(a), shards.iter_samples(b), strict=True):
            assert x["key"] == y["key"] and x["meta"] == y["meta"]
            np.testing.assert_allclose(x["latent"].astype(np.float32), y["latent"].astype(np.float32), atol=1e-2)

    # Others read the shards with ray.data: one row per sample, members as raw bytes.
    import ray.data

    d = shards.shards_dir(out_r, 512)
    index = shards.read_index(d)
    rows = ray.data.read_webdataset(str(d), file_extensions=["tar"], decoder=None).take_all()
    assert len(rows) == index["samples"] == len(set(facts["selected"]) - set(facts["missing_image"]))
    per_bucket: dict = {}
    for row in rows:
        import json

        meta = json.loads(row["json"])
        lat = np.load(io.BytesIO(row["latent.npy"]))
        assert lat.dtype == np.float16 and lat.shape == (8, meta["height"] // 8, meta["width"] // 8)
        t5 = np.load(io.BytesIO(row["t5_short.npy"]))
        assert t5.dtype == np.float16 and t5.shape == (meta["n_short"], index["t5"]["dim"])
        per_bucket[meta["bucket"]] = per_bucket.get(meta["bucket"], 0) + 1
    assert per_bucket == index["buckets"]
