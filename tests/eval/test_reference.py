"""Reference statistics: computed from the download tars once, cached by (benchmark, extractor, policy)."""
from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import torch
from PIL import Image

from eval import build_benchmark as bb
from eval import fid, reference
from evaldata import pipeline_cfg


def test_reference_stats_are_cached_and_keyed(fake_out):
    out, facts = fake_out
    cfg = pipeline_cfg(out)
    bb.build(cfg)
    rows, info = bb.read_benchmark(out, "v1")
    stats, meta, cached = reference.reference_stats(cfg, progress=False)
    assert not cached and stats["n"] == len(rows) == meta["n_images"] and meta["failed"] == []
    assert meta["resize_policy"] == "resize_center_crop" and meta["resolution"] == 64
    assert meta["benchmark_checksum"] == info["checksum"] and meta["extractor"].startswith("tiny")
    # independent: decode the tar images with Pillow, same preprocess, raw extractor features
    want = {r["key"] for r in rows}
    imgs = {}
    for part in sorted({int(k[:5]) for k in want}):
        with tarfile.open(out / "download" / f"{part:05d}.tar") as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".json"):
                import json

                k = json.loads(data)["sigma_key"]
                if k in want:
                    imgs[k] = Image.open(io.BytesIO(members[name[:-5] + ".jpg"])).convert("RGB")
    batch = torch.from_numpy(np.stack([fid.preprocess(imgs[r["key"]], 64, "resize_center_crop") for r in rows]))
    feats = fid.TinyExtractor()(batch).numpy()
    np.testing.assert_allclose(stats["sum"], feats.sum(0), rtol=1e-9)

    stats2, meta2, cached2 = reference.reference_stats(cfg, progress=False)
    assert cached2 and meta2["cache_id"] == meta["cache_id"]
    np.testing.assert_array_equal(stats2["cov_sum"], stats["cov_sum"])
    # another resize policy is another cache entry
    cfg_sq = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fid_resize="resize"))
    _, meta3, cached3 = reference.reference_stats(cfg_sq, progress=False)
    assert not cached3 and meta3["cache_id"] != meta["cache_id"]
    assert len(list((out / "eval" / "reference").glob("*.npz"))) == 2


def test_missing_images_are_reported_not_fatal(fake_out):
    out, _ = fake_out
    cfg = pipeline_cfg(out, n=10)
    bb.build(cfg)
    rows, _ = bb.read_benchmark(out, "v1")
    victim = rows[0]["key"]
    part = int(victim[:5])
    src = out / "download" / f"{part:05d}.tar"
    with tarfile.open(src) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    import json

    drop = {m.name[:-5] for m, d in members if m.name.endswith(".json") and json.loads(d)["sigma_key"] == victim}
    with tarfile.open(src, "w") as tf:
        for m, d in members:
            if m.name.rsplit(".", 1)[0] not in drop:
                tf.addfile(m, io.BytesIO(d))
    stats, meta, _ = reference.reference_stats(cfg, progress=False)
    assert stats["n"] == 9 and meta["failed"] == [{"key": victim, "reason": "image not found in download tar"}]
