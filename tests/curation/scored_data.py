"""Synthetic scored outputs for the dedup / select tests: manifest parts + embeddings written
through _sigma.manifest, with planted exact copies (same sha256 and embedding) and near
duplicates (cosine drawn from 0.92-0.99), and an independent brute-force pair search."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from _sigma import manifest


def key(i: int, part_rows: int) -> str:
    return f"{i // part_rows:05d}_{i % part_rows:06d}"


def synthetic(n: int, d: int = 64, seed: int = 0, n_near: int = 60, n_exact: int = 30, n_bad: int = 20) -> dict:
    """Topic mixture (shared direction + topic centre + decaying-spectrum noise), unit norm, fp16."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d)
    topics = rng.standard_normal((max(4, n // 150), d))
    spec = np.arange(1, d + 1) ** -0.6
    spec /= np.linalg.norm(spec)
    x = 0.5 * common / np.linalg.norm(common) + 0.6 * topics[rng.integers(len(topics), size=n)] / np.sqrt(d) * 3
    x = x + 0.7 * rng.standard_normal((n, d)) * spec
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = rng.permutation(n)
    src, dst = idx[:n_near], idx[n_near:2 * n_near]
    cos = rng.uniform(0.92, 0.99, n_near)
    u = rng.standard_normal((n_near, d)) * spec
    u -= (u * x[src]).sum(1, keepdims=True) * x[src]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x[dst] = cos[:, None] * x[src] + np.sqrt(1 - cos ** 2)[:, None] * u
    esrc, edst = idx[2 * n_near:2 * n_near + n_exact], idx[2 * n_near + n_exact:2 * n_near + 2 * n_exact]
    x[edst] = x[esrc]
    sha = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]
    for s, t in zip(esrc, edst):
        sha[t] = sha[s]
    status = np.array(["ok"] * n, object)
    status[idx[-n_bad:]] = "failed_download"
    width = rng.integers(1024, 4000, n)
    height = (width * rng.choice([0.75, 1.0, 1.5], n)).astype(int)
    width[edst], height[edst] = width[esrc], height[esrc]
    return {"emb": x.astype(np.float16), "sha": sha, "status": status, "width": width, "height": height,
            "aesthetic": rng.normal(6, 0.8, n).round(3), "near": list(zip(src, dst)), "exact": list(zip(esrc, edst))}


def write_scored(out: str, data: dict, part_rows: int) -> list[str]:
    """Write parts (download + score done) and embeddings of the ok rows; returns the keys."""
    n = len(data["sha"])
    keys = [key(i, part_rows) for i in range(n)]
    for p0 in range(0, n, part_rows):
        sl = slice(p0, p0 + part_rows)
        ok = data["status"][sl] == "ok"
        t = pa.table({"key": keys[sl], "status": pa.array(list(data["status"][sl]), pa.string()),
                      "sha256": pa.array([s if o else None for s, o in zip(data["sha"][sl], ok)], pa.string()),
                      "width": pa.array(np.where(ok, data["width"][sl], 0)).cast(pa.int64()),
                      "height": pa.array(np.where(ok, data["height"][sl], 0)).cast(pa.int64()),
                      "aesthetic": pa.array(data["aesthetic"][sl], pa.float64())})
        manifest.write_part(out, p0 // part_rows, t, "score", "score-fp", keep={"download": "download-fp"})
        manifest.write_embeddings(out, p0 // part_rows, np.array(keys[sl])[ok], data["emb"][sl][ok])
    return keys


def brute_pairs(data: dict, threshold: float) -> dict[tuple[int, int], float]:
    """{(i, j): cosine} for every pair of ok rows whose cosine (float64, from the stored fp16
    embeddings) is >= threshold."""
    ok = np.flatnonzero(data["status"] == "ok")
    e = data["emb"][ok].astype(np.float64)
    s = e @ e.T
    i, j = np.nonzero(np.triu(s >= threshold, 1))
    return {(int(ok[a]), int(ok[b])): float(s[a, b]) for a, b in zip(i, j)}


def representative(data: dict) -> np.ndarray:
    """Per row, the lowest row with the same sha256 among ok rows (itself when it has no copy)."""
    first: dict[str, int] = {}
    rep = np.arange(len(data["sha"]))
    for i, (s, st) in enumerate(zip(data["sha"], data["status"])):
        if st == "ok":
            rep[i] = first.setdefault(s, i)
    return rep
