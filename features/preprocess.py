"""The one image preprocessing policy of the project (features stage, eval references, demos).

resize keeping the aspect ratio so the image covers the bucket (bicubic; Lanczos from 2048 up),
center-crop to the bucket, normalise to [-1, 1]. The official feature extractor squashes images to
the bucket size instead (distorting them); we never do. Upscaling is allowed (small images still
train) but recorded per sample (`upscaled`), so it can be filtered or reported.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from _sigma import buckets

LANCZOS_FROM = 2048  # base resolutions >= this use Lanczos (sharper on big downscales)


def resample_for(resolution: int) -> int:
    return Image.Resampling.LANCZOS if resolution >= LANCZOS_FROM else Image.Resampling.BICUBIC


def cover_size(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int, float]:
    """(new_w, new_h, scale): smallest aspect-keeping size covering target_h x target_w."""
    scale = max(target_h / height, target_w / width)
    # ceil guards against rounding just below the target; the crop removes the extra pixel.
    new_w = max(target_w, math.ceil(width * scale - 1e-6))
    new_h = max(target_h, math.ceil(height * scale - 1e-6))
    return new_w, new_h, scale


def resize_crop(img: Image.Image, target_h: int, target_w: int, resolution: int) -> tuple[np.ndarray, bool]:
    """RGB PIL image -> (uint8 array (target_h, target_w, 3), upscaled?)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    new_w, new_h, scale = cover_size(w, h, target_h, target_w)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=resample_for(resolution))
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    img = img.crop((left, top, left + target_w, top + target_h))
    arr = np.asarray(img, dtype=np.uint8)
    assert arr.shape == (target_h, target_w, 3), arr.shape
    return arr, scale > 1.0 + 1e-9


def to_model_input(arr: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1] (what the VAE encoder expects)."""
    return (arr.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def preprocess(img: Image.Image, resolution: int) -> dict:
    """Bucket + resize/crop one image for one base resolution."""
    w, h = img.size
    key, bh, bw = buckets.assign(w, h, resolution)
    arr, upscaled = resize_crop(img, bh, bw, resolution)
    return {"bucket": key, "height": bh, "width": bw, "pixels": arr, "upscaled": upscaled}
