"""Aspect-ratio buckets: {ratio key (h/w, str): (height, width) pixels} per base resolution.

The tables are the official PixArt-Sigma ones (diffusion/data/datasets/utils.py; 40 buckets each,
ratios 0.25..4.0): the 256, 512 and 2048 tables equal the 1024 one /4, /2 and x2 exactly, so they
are derived from it here; the 2880 ("4K") table is the official one verbatim (it is not a scaled
1024 table). tests/features/test_feat_buckets.py checks every table against the official values.
A sample goes to the bucket whose key is nearest to its h/w (ties: the smaller key).
"""
from __future__ import annotations

import math

# PixArt's 1024 table (ratio h/w: (h, w)).
ASPECT_RATIO_1024: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048), "0.26": (512, 1984), "0.27": (512, 1920), "0.28": (512, 1856),
    "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664), "0.4": (640, 1600),
    "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152),
    "0.78": (896, 1152), "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024),
    "1.0": (1024, 1024), "1.07": (1024, 960), "1.13": (1088, 960), "1.21": (1088, 896),
    "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832), "1.67": (1280, 768),
    "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "2.89": (1664, 576), "3.0": (1728, 576), "3.11": (1792, 576),
    "3.62": (1856, 512), "3.75": (1920, 512), "3.88": (1984, 512), "4.0": (2048, 512),
}

# The official 2880 ("4K") table (PixArt-Sigma diffusion/data/datasets/utils.py), copied as data:
# it is NOT the 1024 table scaled (24 of its 40 sizes differ from 1024 x 2.8125), every side is a
# multiple of 64 px, and its keys are its own (e.g. 0.34, 0.47, 1.82).
ASPECT_RATIO_2880: dict[str, tuple[int, int]] = {
    "0.25": (1408, 5760), "0.26": (1408, 5568), "0.27": (1408, 5376), "0.28": (1408, 5184),
    "0.32": (1600, 4992), "0.33": (1600, 4800), "0.34": (1600, 4672), "0.4": (1792, 4480),
    "0.42": (1792, 4288), "0.47": (1920, 4096), "0.49": (1920, 3904), "0.51": (1920, 3776),
    "0.55": (2112, 3840), "0.59": (2112, 3584), "0.68": (2304, 3392), "0.72": (2304, 3200),
    "0.78": (2496, 3200), "0.83": (2496, 3008), "0.89": (2688, 3008), "0.93": (2688, 2880),
    "1.0": (2880, 2880), "1.07": (2880, 2688), "1.12": (3008, 2688), "1.21": (3008, 2496),
    "1.28": (3200, 2496), "1.39": (3200, 2304), "1.47": (3392, 2304), "1.7": (3584, 2112),
    "1.82": (3840, 2112), "2.03": (3904, 1920), "2.13": (4096, 1920), "2.39": (4288, 1792),
    "2.5": (4480, 1792), "2.92": (4672, 1600), "3.0": (4800, 1600), "3.12": (4992, 1600),
    "3.68": (5184, 1408), "3.82": (5376, 1408), "3.95": (5568, 1408), "4.0": (5760, 1408),
}


def _scaled(table: dict[str, tuple[int, int]], num: int, den: int) -> dict[str, tuple[int, int]]:
    out = {}
    for k, (h, w) in table.items():
        assert (h * num) % den == 0 and (w * num) % den == 0, "bucket tables must scale exactly"
        out[k] = (h * num // den, w * num // den)
    return out


TABLES: dict[int, dict[str, tuple[int, int]]] = {
    256: _scaled(ASPECT_RATIO_1024, 1, 4),
    512: _scaled(ASPECT_RATIO_1024, 1, 2),
    1024: dict(ASPECT_RATIO_1024),
    2048: _scaled(ASPECT_RATIO_1024, 2, 1),
    2880: dict(ASPECT_RATIO_2880),
}


def table(resolution: int) -> dict[str, tuple[int, int]]:
    if resolution not in TABLES:
        raise ValueError(f"no bucket table for resolution {resolution}; have {sorted(TABLES)}")
    return TABLES[resolution]


def nearest_key(ratio: float, resolution: int) -> str:
    """Key of the bucket whose h/w is nearest to `ratio` (= height / width)."""
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"aspect ratio must be a positive number, got {ratio!r}")
    return min(table(resolution), key=lambda k: (abs(float(k) - ratio), float(k)))


def assign(width: int, height: int, resolution: int) -> tuple[str, int, int]:
    """(bucket key, bucket height, bucket width) for an image of width x height pixels."""
    key = nearest_key(height / width, resolution)
    h, w = TABLES[resolution][key]
    return key, h, w
