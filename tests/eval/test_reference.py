"""Reference features: from the download tars once, one row per key, cached by (benchmark,
protocol, extractor); unusable images reported, not fatal."""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
from PIL import Image

from _sigma import fs
from eval import build_benchmark as bb
from eval import fid, reference
from evaldata import pipeline_cfg


def _tar_images(out, keys):
    """Independent reader: the tar members by hand, decoded by Pillow."""
    imgs = {}
    for part in sorted({int(k[:5]) for k in keys}):
        with tarfile.open(out / "download" / f"{part:05d}.tar") as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".json") and json.loads(data)["sigma_key"] in keys:
                imgs[json.loads(data)["sigma_key"]] = Image.open(io.BytesIO(members[name[:-5] + ".jpg"])).convert("RGB")
    return imgs


def test_reference_features_are_cached_and_keyed(fake_out):
    out, _ = fake_out
    cfg = pipeline_cfg(out)
    version, rows, info = bb.build(cfg)["version"], *bb.read_benchmark(str(out), bb.version_id(cfg.eval))
    ref, meta, cached = reference.reference_features(cfg, rows, info, progress=False)
    assert not cached and len(ref) == len(rows) == meta["n_images"] and meta["failed"] == []
    assert meta["protocol"] == "pytorch-fid" and meta["extractor_extractor"].startswith("tiny")
    assert meta["benchmark_checksum"] == info["checksum"] and meta["benchmark_version"] == version
    imgs = _tar_images(out, {r["key"] for r in rows})
    want = fid.features(fid.TinyExtractor(), [imgs[r["key"]] for r in rows], "pytorch-fid")
    np.testing.assert_allclose(np.stack([ref[r["key"]] for r in rows]), want, rtol=1e-6)
    ref2, meta2, cached2 = reference.reference_features(cfg, rows, info, progress=False)
    assert cached2 and meta2["cache_id"] == meta["cache_id"]
    assert all(np.array_equal(ref2[k], ref[k]) for k in ref)
    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fid_protocol="clean-fid"))
    _, meta3, cached3 = reference.reference_features(other, rows, info, progress=False)
    assert not cached3 and meta3["cache_id"] != meta["cache_id"]
    assert len(fs.listdir(fs.join(str(out), "eval", "reference"))) == 2


def test_missing_images_are_reported_not_fatal(fake_out):
    out, _ = fake_out
    cfg = pipeline_cfg(out, n=10)
    bb.build(cfg)
    _, rows, info = bb.current(cfg)
    victim = rows[0]["key"]
    src = out / "download" / f"{int(victim[:5]):05d}.tar"
    with tarfile.open(src) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    drop = {m.name[:-5] for m, d in members if m.name.endswith(".json") and json.loads(d)["sigma_key"] == victim}
    with tarfile.open(src, "w") as tf:
        for m, d in members:
            if m.name.rsplit(".", 1)[0] not in drop:
                tf.addfile(m, io.BytesIO(d))
    ref, meta, _ = reference.reference_features(cfg, rows, info, progress=False)
    assert len(ref) == 9 and meta["failed"] == [{"key": victim, "reason": "image not found in download tar"}]
