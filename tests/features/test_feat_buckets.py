"""Bucket tables and the one preprocessing policy (no models)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from features import buckets, preprocess


@pytest.mark.parametrize("res", [256, 512, 1024, 2048, 2880])
def test_tables_have_40_distinct_buckets_sized_for_the_dit(res):
    t = buckets.table(res)
    assert len(t) == 40 and len({float(k) for k in t}) == 40
    step = 16 if res == 256 else 32  # the official 256 table is 1024/4: multiples of 16 px
    for k, (h, w) in t.items():
        assert h % step == 0 and w % step == 0
        assert (h // 8) % 2 == 0 and (w // 8) % 2 == 0  # latent sides even: patch size 2
        assert abs(h * w / res**2 - 1) < 0.11  # about res^2 pixels
        assert abs(float(k) - h / w) < 0.035  # key ~ h/w


def test_scaled_tables_are_exact_multiples_of_1024():
    for res, f in ((256, 0.25), (512, 0.5), (2048, 2.0)):
        for k, (h, w) in buckets.ASPECT_RATIO_1024.items():
            assert buckets.table(res)[k] == (int(h * f), int(w * f))


def test_2880_table_derivation():
    # Every side of the 1024 table x 2.8125, rounded to a multiple of 32, keyed by round(h/w, 2).
    expect = {}
    for h, w in buckets.ASPECT_RATIO_1024.values():
        H, W = round(h * 2880 / 1024 / 32) * 32, round(w * 2880 / 1024 / 32) * 32
        expect[str(round(H / W, 2))] = (H, W)
    assert {float(k): v for k, v in expect.items()} == {float(k): v for k, v in buckets.ASPECT_RATIO_2880.items()}


def test_nearest_ratio_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    keys = np.array([float(k) for k in buckets.ASPECT_RATIO_1024])
    for _ in range(500):
        w, h = int(rng.integers(64, 5000)), int(rng.integers(64, 5000))
        k, bh, bw = buckets.assign(w, h, 1024)
        d = np.abs(keys - h / w)
        assert abs(float(k) - h / w) == d.min()
        assert (bh, bw) == buckets.ASPECT_RATIO_1024[k]
    assert buckets.assign(100, 1000, 512)[0] == "4.0"  # beyond the table: the extreme bucket
    assert buckets.assign(1000, 100, 512)[0] == "0.25"
    assert buckets.assign(1000, 1000, 256) == ("1.0", 256, 256)


def test_resize_covers_then_center_crops_without_squashing():
    # 600x200 (w x h) image: left third red, middle green, right blue. Bucket 256 for h/w = 0.333.
    arr = np.zeros((200, 600, 3), np.uint8)
    arr[:, :200, 0] = 255
    arr[:, 200:400, 1] = 255
    arr[:, 400:, 2] = 255
    out = preprocess.preprocess(Image.fromarray(arr), 256)
    k, bh, bw = buckets.assign(600, 200, 256)
    assert (out["bucket"], out["height"], out["width"]) == (k, bh, bw) == ("0.33", 144, 432)
    px = out["pixels"]
    assert px.shape == (144, 432, 3) and px.dtype == np.uint8
    # Cover: scale = max(144/200, 432/600) = 0.72 -> 432x144 exactly: nothing cropped, the three
    # colour bands keep equal widths (a squash would also give this; the next case would not).
    assert out["upscaled"] is False
    # Center crop, independent of the tables: 600x200 into 200x200 keeps exactly the green band.
    sq, up = preprocess.resize_crop(Image.fromarray(arr), 200, 200, 256)
    assert not up and (sq[..., 1] == 255).all() and (sq[..., 0] == 0).all() and (sq[..., 2] == 0).all()
    # Cover, not squash: 600x200 into 100x100 -> resized to 300x100, then the middle 100 columns.
    sm, _ = preprocess.resize_crop(Image.fromarray(arr), 100, 100, 256)
    assert sm.shape == (100, 100, 3) and (sm[:, 5:95, 1] > 200).all() and (sm[:, 5:95, 0] < 50).all()


def test_upscale_recorded_and_range():
    img = Image.fromarray(np.full((50, 60, 3), 255, np.uint8))
    out = preprocess.preprocess(img, 512)
    assert out["upscaled"] is True
    x = preprocess.to_model_input(out["pixels"])
    assert x.shape == (3, out["height"], out["width"]) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and np.allclose(x, 1.0)
    assert preprocess.resample_for(1024) == Image.Resampling.BICUBIC
    assert preprocess.resample_for(2048) == Image.Resampling.LANCZOS == preprocess.resample_for(2880)
