"""VAE stage: posterior mean + std fp16, decode/bucket/crop rows per target resolution."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from _sigma import buckets
from features.preprocess import to_model_input
from _sigma.shards import load_npy


@pytest.fixture(scope="module")
def encoder(feature_models):
    from features.vae import VaeEncoder

    return VaeEncoder(str(feature_models / "vae"), precision="fp32")


def test_tiny_vae_layout(feature_models):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(feature_models / "vae")
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.13025
    assert len(vae.config.down_block_types) == 4
    assert vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean.shape == (1, 4, 8, 12)


def test_encode_is_mean_then_std(encoder, feature_models):
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (2, 64, 96, 3), dtype=np.uint8)
    got = encoder.encode(imgs)
    assert got.shape == (2, 8, 8, 12) and got.dtype == np.float16
    vae = AutoencoderKL.from_pretrained(feature_models / "vae").eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([a.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1 for a in imgs]))
        d = vae.encode(x).latent_dist
    np.testing.assert_allclose(got[:, :4].astype(np.float32), d.mean.numpy(), atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(got[:, 4:].astype(np.float32), d.std.numpy(), atol=2e-3, rtol=1e-3)
    assert (got[:, 4:] > 0).all()
    assert np.array_equal(to_model_input(imgs[0]), x[0].numpy())


def _jpeg(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(w).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_prepare_then_encode_rows_per_target(encoder):
    from features.vae import prepare_batch

    batch = pa.table({"key": ["a", "b", "c"], "image": [_jpeg(800, 600), b"<html>no</html>", _jpeg(64, 256)],
                      "targets": [json.dumps([[256, 0], [512, 5]]), json.dumps([[256, 1]]), json.dumps([[512, 5]])],
                      "n_long": pa.array([1, 2, 3], pa.int32())})
    prep = prepare_batch(batch)
    assert prep.num_rows == 4 and "image" not in prep.column_names
    rows = prep.to_pylist()
    assert [(r["key"], r["resolution"], r["_part"]) for r in rows] == [("a", 256, 0), ("a", 512, 5), ("b", 256, 1), ("c", 512, 5)]
    assert rows[0]["bucket"] == buckets.assign(800, 600, 256)[0] and rows[0]["n_long"] == 1
    assert rows[2]["prep_error"].startswith("not an image") and rows[2]["pixels"] is None
    assert rows[3]["upscaled"] is True and rows[0]["upscaled"] is False and rows[1]["upscaled"] is False
    out = encoder(prep).to_pylist()
    for r in out:
        if r["key"] == "b":
            assert r["latent"] is None and r["prep_error"]
            continue
        lat = load_npy(r["latent"])
        assert lat.dtype == np.float16 and lat.shape == (8, r["bucket_h"] // 8, r["bucket_w"] // 8)
