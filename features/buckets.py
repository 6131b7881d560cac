"""Aspect-ratio buckets: {ratio key (h/w, str): (height, width) pixels} per base resolution.

The 1024 table is PixArt's (40 buckets, ratios 0.25..4.0). 512 and 256 are it /2 and /4, 2048 is
it x2 (all exact: every 1024 size is a multiple of 64). The 2880 ("4K") table is ours: every side
of the 1024 table times 2880/1024 = 2.8125, rounded to the nearest multiple of 32 px, keyed by the
resulting h/w rounded to 2 decimals (so 7 keys differ from the 1024 ones, e.g. 0.33 -> 0.34); the
areas stay within 10 % of 2880^2 and the 40 keys remain distinct (checked by the tests).
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

# Ours (derivation in the module docstring); multiples of 32 px, latent sides multiples of 4.
ASPECT_RATIO_2880: dict[str, tuple[int, int]] = {
    "0.25": (1440, 5760), "0.26": (1440, 5568), "0.27": (1440, 5408), "0.28": (1440, 5216),
    "0.32": (1632, 5056), "0.34": (1632, 4864), "0.35": (1632, 4672), "0.4": (1792, 4512),
    "0.41": (1792, 4320), "0.48": (1984, 4128), "0.5": (1984, 3968), "0.53": (1984, 3776),
    "0.58": (2176, 3776), "0.61": (2176, 3584), "0.68": (2336, 3424), "0.72": (2336, 3232),
    "0.78": (2528, 3232), "0.82": (2528, 3072), "0.88": (2688, 3072), "0.93": (2688, 2880),
    "1.0": (2880, 2880), "1.07": (2880, 2688), "1.14": (3072, 2688), "1.22": (3072, 2528),
    "1.28": (3232, 2528), "1.38": (3232, 2336), "1.47": (3424, 2336), "1.65": (3584, 2176),
    "1.74": (3776, 2176), "2.0": (3968, 1984), "2.08": (4128, 1984), "2.41": (4320, 1792),
    "2.52": (4512, 1792), "2.86": (4672, 1632), "2.98": (4864, 1632), "3.1": (5056, 1632),
    "3.62": (5216, 1440), "3.76": (5408, 1440), "3.87": (5568, 1440), "4.0": (5760, 1440),
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
