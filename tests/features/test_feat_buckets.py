"""Bucket tables and the one preprocessing policy (no models)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _sigma import buckets
from features import preprocess


@pytest.mark.parametrize("res", [256, 512, 1024, 2048, 2880])
def test_tables_have_40_distinct_buckets_sized_for_the_dit(res):
    t = buckets.table(res)
    assert len(t) == 40 and len({float(k) for k in t}) == 40
    step = 16 if res == 256 else 32  # the official 256 table is 1024/4: multiples of 16 px
    for k, (h, w) in t.items():
        assert h % step == 0 and w % step == 0
        assert (h // 8) % 2 == 0 and (w // 8) % 2 == 0  # latent sides even: patch size 2
        assert abs(h * w / res**2 - 1) < 0.13  # about res^2 pixels (the official 2880 table: up to 12 %)
        assert abs(float(k) - h / w) < (0.1 if res == 2880 else 0.035)  # key ~ h/w (official 2880 "4.0" is 4.09)


# The official PixArt-Sigma tables (diffusion/data/datasets/utils.py, ASPECT_RATIO_<res>), restated
# here as data ("key:HxW", h/w keys): every table of _sigma.buckets must equal them exactly.
OFFICIAL = {
    256: (
        "0.25:128x512 0.26:128x496 0.27:128x480 0.28:128x464 0.32:144x448 0.33:144x432 0.35:144x416 0.4:160x400 "
        "0.42:160x384 0.48:176x368 0.5:176x352 0.52:176x336 0.57:192x336 0.6:192x320 0.68:208x304 0.72:208x288 "
        "0.78:224x288 0.82:224x272 0.88:240x272 0.94:240x256 1.0:256x256 1.07:256x240 1.13:272x240 1.21:272x224 "
        "1.29:288x224 1.38:288x208 1.46:304x208 1.67:320x192 1.75:336x192 2.0:352x176 2.09:368x176 2.4:384x160 "
        "2.5:400x160 2.89:416x144 3.0:432x144 3.11:448x144 3.62:464x128 3.75:480x128 3.88:496x128 4.0:512x128"),
    512: (
        "0.25:256x1024 0.26:256x992 0.27:256x960 0.28:256x928 0.32:288x896 0.33:288x864 0.35:288x832 0.4:320x800 "
        "0.42:320x768 0.48:352x736 0.5:352x704 0.52:352x672 0.57:384x672 0.6:384x640 0.68:416x608 0.72:416x576 "
        "0.78:448x576 0.82:448x544 0.88:480x544 0.94:480x512 1.0:512x512 1.07:512x480 1.13:544x480 1.21:544x448 "
        "1.29:576x448 1.38:576x416 1.46:608x416 1.67:640x384 1.75:672x384 2.0:704x352 2.09:736x352 2.4:768x320 "
        "2.5:800x320 2.89:832x288 3.0:864x288 3.11:896x288 3.62:928x256 3.75:960x256 3.88:992x256 4.0:1024x256"),
    1024: (
        "0.25:512x2048 0.26:512x1984 0.27:512x1920 0.28:512x1856 0.32:576x1792 0.33:576x1728 0.35:576x1664 0.4:640x1600 "
        "0.42:640x1536 0.48:704x1472 0.5:704x1408 0.52:704x1344 0.57:768x1344 0.6:768x1280 0.68:832x1216 0.72:832x1152 "
        "0.78:896x1152 0.82:896x1088 0.88:960x1088 0.94:960x1024 1.0:1024x1024 1.07:1024x960 1.13:1088x960 1.21:1088x896 "
        "1.29:1152x896 1.38:1152x832 1.46:1216x832 1.67:1280x768 1.75:1344x768 2.0:1408x704 2.09:1472x704 2.4:1536x640 "
        "2.5:1600x640 2.89:1664x576 3.0:1728x576 3.11:1792x576 3.62:1856x512 3.75:1920x512 3.88:1984x512 4.0:2048x512"),
    2048: (
        "0.25:1024x4096 0.26:1024x3968 0.27:1024x3840 0.28:1024x3712 0.32:1152x3584 0.33:1152x3456 0.35:1152x3328 0.4:1280x3200 "
        "0.42:1280x3072 0.48:1408x2944 0.5:1408x2816 0.52:1408x2688 0.57:1536x2688 0.6:1536x2560 0.68:1664x2432 0.72:1664x2304 "
        "0.78:1792x2304 0.82:1792x2176 0.88:1920x2176 0.94:1920x2048 1.0:2048x2048 1.07:2048x1920 1.13:2176x1920 1.21:2176x1792 "
        "1.29:2304x1792 1.38:2304x1664 1.46:2432x1664 1.67:2560x1536 1.75:2688x1536 2.0:2816x1408 2.09:2944x1408 2.4:3072x1280 "
        "2.5:3200x1280 2.89:3328x1152 3.0:3456x1152 3.11:3584x1152 3.62:3712x1024 3.75:3840x1024 3.88:3968x1024 4.0:4096x1024"),
    2880: (
        "0.25:1408x5760 0.26:1408x5568 0.27:1408x5376 0.28:1408x5184 0.32:1600x4992 0.33:1600x4800 0.34:1600x4672 0.4:1792x4480 "
        "0.42:1792x4288 0.47:1920x4096 0.49:1920x3904 0.51:1920x3776 0.55:2112x3840 0.59:2112x3584 0.68:2304x3392 0.72:2304x3200 "
        "0.78:2496x3200 0.83:2496x3008 0.89:2688x3008 0.93:2688x2880 1.0:2880x2880 1.07:2880x2688 1.12:3008x2688 1.21:3008x2496 "
        "1.28:3200x2496 1.39:3200x2304 1.47:3392x2304 1.7:3584x2112 1.82:3840x2112 2.03:3904x1920 2.13:4096x1920 2.39:4288x1792 "
        "2.5:4480x1792 2.92:4672x1600 3.0:4800x1600 3.12:4992x1600 3.68:5184x1408 3.82:5376x1408 3.95:5568x1408 4.0:5760x1408"),
}


@pytest.mark.parametrize("res", sorted(OFFICIAL))
def test_every_table_equals_the_official_one(res):
    official = {k: tuple(int(v) for v in hw.split("x")) for k, hw in (e.split(":") for e in OFFICIAL[res].split())}
    assert len(official) == 40
    assert list(buckets.table(res).items()) == list(official.items())  # same keys, sizes and order


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
