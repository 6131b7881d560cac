"""Reference features of a benchmark's images: computed once per (benchmark, protocol, extractor)
and cached, one row per benchmark key so that KID, bootstrap and per-stratum FID can use them.

Cache: <out>/eval/reference/<id>.npz, id = sha256(benchmark checksum | protocol | extractor id |
extractor file sha256)[:16]; the npz holds `keys` (N,) str, `feats` (N, D) float32 (the extractors
compute in float32, so nothing is lost) and a JSON `meta` (protocol, extractor, failures). Images
of our own benchmark come from the download tars (_sigma.images, the only reader), those of a
published set from its folder; both decoded by _sigma.images.decode_image. An image that cannot
be used is reported (key + reason), never fatal.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from _sigma import fs
from _sigma.holdout import EVAL_DIR
from eval import fid

FORMAT = "sigma-eval-reference/2"


def cache_id(checksum: str, protocol: str, ext: dict) -> str:
    return hashlib.sha256(f"{checksum}|{protocol}|{ext['extractor']}|{ext['sha256']}".encode()).hexdigest()[:16]


def cache_uri(out: str, cid: str) -> str:
    return fs.join(fs.normalize(out), EVAL_DIR, "reference", f"{cid}.npz")


def iter_reference_images(out: str, rows: list[dict], source_path: str | None = None):
    """Yield (key, RGB image | None, error | None) for every benchmark row, grouped by tar."""
    from _sigma.images import decode_image, iter_download_images

    by_part: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        if r["image"].startswith("download/"):
            by_part[int(r["key"].split("_", 1)[0])].add(r["key"])
        else:
            try:
                img, info = decode_image(fs.read_bytes(fs.join(fs.normalize(source_path), r["image"])))
                yield r["key"], img, (info.get("error") if img is None else None)
            except (FileNotFoundError, OSError) as e:
                yield r["key"], None, f"reference image unreadable: {str(e)[:200]}"
    for part in sorted(by_part):
        wanted = by_part[part]
        for k, data in iter_download_images(out, part, set(wanted)):
            img, info = decode_image(data)
            wanted.discard(k)
            yield k, img, (info.get("error") if img is None else None)
        for k in sorted(wanted):
            yield k, None, "image not found in download tar"


def extract(extractor, items, protocol: str, batch_size: int, device: str = "cpu", bar=None):
    """(keys, feats (n, D) float32, failed [{key, reason}]) from (key, image, error) items."""
    keys, chunks, failed, buf = [], [], [], []

    def flush():
        if buf:
            chunks.append(fid.features(extractor, [im for _, im in buf], protocol, device).astype(np.float32))
            keys.extend(k for k, _ in buf)
            buf.clear()

    for key, img, err in items:
        if bar is not None:
            bar.update(1)
        if img is None:
            failed.append({"key": key, "reason": err})
            continue
        buf.append((key, img))
        if len(buf) == batch_size:
            flush()
    flush()
    dim = getattr(extractor, "num_features", 0)
    return keys, (np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)), failed


def save(uri: str, keys: list[str], feats: np.ndarray, meta: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(keys, dtype=str), feats=feats.astype(np.float32),
             meta=np.array(json.dumps(dict(meta, format=FORMAT), sort_keys=True)))
    fs.write_bytes(uri, buf.getvalue())


def load(uri: str) -> tuple[list[str], np.ndarray, dict]:
    with np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False) as z:
        return z["keys"].tolist(), z["feats"], json.loads(str(z["meta"]))


def reference_features(cfg, rows: list[dict], info: dict, extractor=None, device: str = "cpu",
                       progress: bool = True) -> tuple[dict[str, np.ndarray], dict, bool]:
    """({key: features (D,) float32}, meta, from_cache) of the benchmark's reference images."""
    out, ecfg = cfg.out, cfg.eval
    ext = fid.extractor_info(ecfg)
    cid = cache_id(info["checksum"], ecfg.fid_protocol, ext)
    uri = cache_uri(out, cid)
    if fs.isfile(uri):
        keys, feats, meta = load(uri)
        return dict(zip(keys, feats)), meta, True
    extractor = extractor or fid.make_extractor(ecfg, device)
    t0 = time.time()
    bar = tqdm(total=len(rows), desc="reference features", unit="img", disable=not progress, mininterval=1.0)
    keys, feats, failed = extract(extractor, iter_reference_images(out, rows, ecfg.benchmark_path),
                                  ecfg.fid_protocol, ecfg.batch_size, device, bar)
    bar.close()
    meta = {"cache_id": cid, "benchmark_version": info["version"], "benchmark_checksum": info["checksum"],
            "protocol": ecfg.fid_protocol, **{f"extractor_{k}": v for k, v in ext.items()},
            "n_benchmark": len(rows), "n_images": len(keys), "failed": failed, "seconds": round(time.time() - t0, 2)}
    if len(keys) >= 2:  # a set with fewer than 2 images has no covariance: never cached
        save(uri, keys, feats, meta)
    return dict(zip(keys, feats)), meta, False
