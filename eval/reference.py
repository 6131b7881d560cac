"""Reference statistics of the benchmark images: FID feature sums computed once and cached.

Cache file: <output>/eval/reference/<id>.npz with id = sha256(benchmark checksum | extractor id |
resize policy)[:16], so a different benchmark, extractor (weights hash included) or resize policy
never reuses stale numbers. The npz holds the torchmetrics running sums (n, sum (D,), cov_sum
(D, D), float64) and a JSON `meta` recording the policy, resolution, extractor and any image that
could not be used (key + reason): bad images are reported, never fatal.

Images are read from the img2dataset tars <output>/download/NNNNN.tar (our key rides in the json
member) through common.images.iter_download_images (local or object store) and decoded by
common.images.decode_image (EXIF orientation, colour modes), the same decoder every other stage uses.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval import fid
from eval.build_benchmark import EVAL_DIR, read_benchmark


def cache_id(checksum: str, extractor: str, policy: str) -> str:
    return hashlib.sha256(f"{checksum}|{extractor}|{policy}".encode()).hexdigest()[:16]


def cache_path(out: Path, cid: str) -> Path:
    return Path(out) / EVAL_DIR / "reference" / f"{cid}.npz"


def _decode(data: bytes):
    try:
        from common.images import decode_image
    except ImportError:  # decode module absent: plain Pillow
        import io

        from PIL import Image

        try:
            return Image.open(io.BytesIO(data)).convert("RGB"), {"error": None}
        except Exception as e:  # noqa: BLE001 - any decoder failure is a per-image reason
            return None, {"error": f"decode failed: {e}"}
    return decode_image(data)


def iter_reference_images(out: Path, keys: list[str]):
    """Yield (key, RGB image | None, error | None) for every benchmark key, grouped by tar."""
    from common.images import iter_download_images

    by_part: dict[int, set[str]] = defaultdict(set)
    for k in keys:
        by_part[int(k.split("_", 1)[0])].add(k)
    for part in sorted(by_part):
        wanted = by_part[part]
        for k, data in iter_download_images(out, part, set(wanted)):
            if k in wanted:
                img, info = _decode(data)
                wanted.discard(k)
                yield k, img, (info.get("error") if img is None else None)
        for k in sorted(wanted):
            yield k, None, "image not found in download tar"


def batched_update(metric, images_iter, size: int, policy: str, batch_size: int, real: bool, bar=None):
    """Preprocess + feed images to the metric in batches; returns (n_used, [(key, reason)])."""
    buf, failed, used = [], [], 0
    for key, img, err in images_iter:
        if bar is not None:
            bar.update(1)
        if img is None:
            failed.append({"key": key, "reason": err})
            continue
        buf.append(fid.preprocess(img, size, policy))
        if len(buf) == batch_size:
            metric.update(torch.from_numpy(np.stack(buf)), real=real)
            used, buf = used + len(buf), []
    if buf:
        metric.update(torch.from_numpy(np.stack(buf)), real=real)
        used += len(buf)
    return used, failed


def reference_stats(cfg, device: str = "cpu", progress: bool = True) -> tuple[dict, dict, bool]:
    """(stats, meta, from_cache) of the benchmark's reference images for pipeline config `cfg`."""
    out, ecfg = Path(cfg.output), cfg.eval
    rows, info = read_benchmark(out, ecfg.version)
    ext, pol = fid.extractor_id(ecfg), fid.policy_id(ecfg)
    cid = cache_id(info["checksum"], ext, pol)
    path = cache_path(out, cid)
    if path.exists():
        stats, meta = fid.load_stats(path)
        return stats, meta, True
    metric = fid.make_metric(ecfg, device)
    keys = [r["key"] for r in rows]
    t0 = time.time()
    bar = tqdm(total=len(keys), desc="reference features", unit="img", disable=not progress, mininterval=1.0)
    used, failed = batched_update(metric, iter_reference_images(out, keys), ecfg.fid_size, ecfg.fid_resize,
                                  ecfg.fid_batch_size, real=True, bar=bar)
    bar.close()
    stats = fid.get_stats(metric, real=True)
    meta = {"cache_id": cid, "benchmark_version": info["version"], "benchmark_checksum": info["checksum"],
            "extractor": ext, "resize_policy": ecfg.fid_resize, "resolution": ecfg.fid_size,
            "interpolation": "bicubic (PIL, antialiased)", "policy_id": pol, "n_benchmark": len(keys),
            "n_images": used, "failed": failed, "seconds": round(time.time() - t0, 2)}
    if used >= 2:  # a set with fewer than 2 images has no covariance: do not cache it
        fid.save_stats(path, stats, meta)
    return stats, meta, False
