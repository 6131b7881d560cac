"""Embeddings of three distributions for the dedup recall tests (issue 19), in the dict format of
scored_data.synthetic (so write_scored writes them): a topic mixture, isotropic unit vectors (no
cluster structure at all), and a mixture of both (dense topics + a sparse isotropic region).
Planted near copies at cosines drawn uniformly from 0.90-0.999, along isotropic directions for
isotropic rows and along the topic noise spectrum for topic rows; their cosines are recomputed
from the stored fp16 rows by the tests (the truth never comes from the code under test)."""
from __future__ import annotations

import hashlib

import numpy as np


def _topic(rng, n: int, d: int, n_topics: int):
    common = rng.standard_normal(d)
    topics = rng.standard_normal((n_topics, d))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    w = np.arange(1, n_topics + 1) ** -0.7
    spec = (np.arange(1, d + 1) ** -0.6)[rng.permutation(d)]
    spec /= np.linalg.norm(spec)
    x = 0.55 * common / np.linalg.norm(common) + 0.6 * topics[rng.choice(n_topics, n, p=w / w.sum())]
    return x + 0.62 * rng.standard_normal((n, d)) * spec, spec


def embeddings(n: int, d: int = 768, kind: str = "topic", seed: int = 0, near_frac: float = 0.01) -> dict:
    rng = np.random.default_rng([seed, {"topic": 1, "iso": 2, "mixed": 3}[kind]])
    n_iso = {"topic": 0, "iso": n, "mixed": n // 2}[kind]
    topic, spec = _topic(rng, n - n_iso, d, max(50, (n - n_iso) // 300))
    x = np.concatenate([topic, rng.standard_normal((n_iso, d))]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    iso_row = np.arange(n) >= n - n_iso
    n_near = int(n * near_frac)
    idx = rng.permutation(n)
    src, dst = idx[:n_near], idx[n_near:2 * n_near]
    iso_row[dst] = iso_row[src]  # a copy lives where its source does
    cos = rng.uniform(0.90, 0.999, n_near)
    u = rng.standard_normal((n_near, d)) * np.where(iso_row[src, None], 1.0, spec[None, :] * np.sqrt(d))
    u -= (u * x[src]).sum(1, keepdims=True) * x[src]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x[dst] = cos[:, None] * x[src] + np.sqrt(1 - cos ** 2)[:, None] * u
    sha = [hashlib.sha256(f"{kind}-{seed}-{i}".encode()).hexdigest() for i in range(n)]
    status = np.array(["ok"] * n, object)
    width = rng.integers(1024, 4000, n)
    return {"emb": x.astype(np.float16), "sha": sha, "status": status, "width": width,
            "height": (width * rng.choice([0.75, 1.0, 1.5], n)).astype(int),
            "aesthetic": rng.normal(6, 0.8, n).round(3), "near": list(zip(src.tolist(), dst.tolist())),
            "exact": [], "iso": iso_row}
