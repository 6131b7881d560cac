"""Dedup stage: exact (sha256) and near duplicates (cosine of CLIP image embeddings).

Global over the whole manifest, not per batch: rows are grouped by connected components of the
"same bytes" and "cosine > threshold" relations (union-find), and each group keeps one row (the
largest image, then the most aesthetic, then the lowest key). Near-duplicate search is blockwise
all-pairs (exact, O(N^2/block) matmuls); with `clusters > 0` embeddings are first partitioned by
k-means and compared only within a cluster (SemDeDup-style), which scales to tens of millions.
Adds duplicate_of (kept key), dup_kind (exact|near), dup_similarity.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from common import manifest
from common.config import fingerprint


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(emb: np.ndarray, threshold: float, block: int = 4096) -> list[tuple[int, int, float]]:
    """All pairs (i < j) with cosine(emb_i, emb_j) > threshold. emb: (N, D) L2-normalised."""
    e = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    pairs = []
    for start in range(0, len(e), block):
        sims = e[start:start + block] @ e[start:].T  # (b, N - start): only the upper triangle matters
        rows, cols = torch.nonzero(sims > threshold, as_tuple=True)
        gi, gj = rows + start, cols + start
        keep = gj > gi
        for i, j, s in zip(gi[keep].tolist(), gj[keep].tolist(), sims[rows[keep], cols[keep]].tolist()):
            pairs.append((i, j, s))
    return pairs


def kmeans_partition(emb: np.ndarray, k: int, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Spherical k-means labels (N,) for partitioned dedup; fitted on a sample, assigned to all."""
    g = torch.Generator().manual_seed(seed)
    e = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    k = max(1, min(k, len(e)))
    sample = e[torch.randperm(len(e), generator=g)[: max(k * 64, 10000)]]
    cent = sample[torch.randperm(len(sample), generator=g)[:k]].clone()
    for _ in range(iters):
        lab = (sample @ cent.T).argmax(1)
        for c in range(k):
            members = sample[lab == c]
            if len(members):
                v = members.mean(0)
                cent[c] = v / v.norm().clamp_min(1e-12)
    labels = torch.cat([(e[s:s + 65536] @ cent.T).argmax(1) for s in range(0, len(e), 65536)])
    return labels.numpy()


def find_duplicates(keys, sha, emb, pixels, aesthetic, cfg) -> dict[int, tuple[int, str, float]]:
    """{row: (kept_row, kind, similarity)} for every row that is a duplicate of another.

    Two levels: rows with identical bytes collapse onto one representative ("exact"), then the
    representatives are grouped by embedding cosine ("near"); every member of a group points at
    the group's kept row.
    """
    n = len(keys)

    def rank(i):  # lower is better
        if cfg.keep == "first":
            return (keys[i],)
        return (-(pixels[i] or 0), -(aesthetic[i] if aesthetic[i] is not None else -1e9), keys[i])

    rep = list(range(n))
    if cfg.exact:
        by_hash: dict[str, list[int]] = {}
        for i, h in enumerate(sha):
            if h:
                by_hash.setdefault(h, []).append(i)
        for group in by_hash.values():
            best = min(group, key=rank)
            for i in group:
                rep[i] = best
    reps = sorted(set(rep))
    uf = UnionFind(n)
    if cfg.near and emb is not None and len(emb) and len(reps) > 1:
        idx_all = np.asarray(reps)
        if cfg.clusters > 0 and len(reps) > cfg.block_size:
            labels = kmeans_partition(emb[idx_all], cfg.clusters)
            groups = [idx_all[labels == c] for c in np.unique(labels)]
        else:
            groups = [idx_all]
        for idx in groups:
            for i, j, _ in near_pairs(emb[idx], cfg.threshold, cfg.block_size):
                uf.union(int(idx[i]), int(idx[j]))
    members: dict[int, list[int]] = {}
    for r in reps:
        members.setdefault(uf.find(r), []).append(r)
    kept_of_rep = {}
    for group in members.values():
        best = min(group, key=rank)
        for r in group:
            kept_of_rep[r] = best
    result = {}
    for i in range(n):
        kept = kept_of_rep[rep[i]]
        if i == kept:
            continue
        if rep[i] != i:  # an exact copy of another row's bytes
            result[i] = (kept, "exact", 1.0 if rep[i] == kept else float(np.dot(emb[i], emb[kept])) if emb is not None and len(emb) else float("nan"))
        else:
            result[i] = (kept, "near", float(np.dot(emb[i], emb[kept])))
    return result


def run_dedup(cfg, out: Path, progress: bool = True) -> dict:
    out = Path(out)
    parts = manifest.list_parts(out)
    upstream = [manifest.part_fingerprints(out, p).get("score") for p in parts]
    fp = fingerprint({"dedup": cfg.dedup, "score": upstream})
    if parts and all(manifest.stage_done(out, p, "dedup", fp) for p in parts):
        return {"skipped": True}
    t = manifest.read_manifest(out, ["key", "status", "sha256", "width", "height", "aesthetic"])
    ok = [i for i, s in enumerate(t.column("status").to_pylist()) if s == "ok"]
    sub = t.take(pa.array(ok, pa.int64())) if ok else t.slice(0, 0)
    keys = sub.column("key").to_pylist()
    sha = sub.column("sha256").to_pylist() if "sha256" in sub.column_names else [None] * len(keys)
    w = sub.column("width").to_pylist() if "width" in sub.column_names else [None] * len(keys)
    h = sub.column("height").to_pylist() if "height" in sub.column_names else [None] * len(keys)
    aes = sub.column("aesthetic").to_pylist() if "aesthetic" in sub.column_names else [None] * len(keys)
    ekeys, emb = manifest.read_embeddings(out)
    pos = {k: i for i, k in enumerate(ekeys.tolist())}
    emb_rows = np.stack([emb[pos[k]].astype(np.float32) if k in pos else np.zeros(emb.shape[1] if emb.ndim == 2 and emb.shape[1] else 1, np.float32)
                         for k in keys]) if keys else None
    dups = find_duplicates(keys, sha, emb_rows, [(a or 0) * (b or 0) for a, b in zip(w, h)], aes, cfg.dedup)
    by_key = {keys[i]: (keys[k], kind, sim) for i, (k, kind, sim) in dups.items()}
    for p in parts:
        pk = manifest.read_part(out, p, ["key"]).column("key").to_pylist()
        cols = {"key": pk,
                "duplicate_of": [by_key.get(k, (None,))[0] for k in pk],
                "dup_kind": [by_key[k][1] if k in by_key else None for k in pk],
                "dup_similarity": [by_key[k][2] if k in by_key else None for k in pk]}
        table = pa.table({"key": pa.array(cols["key"], pa.string()),
                          "duplicate_of": pa.array(cols["duplicate_of"], pa.string()),
                          "dup_kind": pa.array(cols["dup_kind"], pa.string()),
                          "dup_similarity": pa.array(cols["dup_similarity"], pa.float64())})
        manifest.update_part(out, p, table, "dedup", fp)
    kinds = [v[1] for v in by_key.values()]
    return {"rows_compared": len(keys), "exact": kinds.count("exact"), "near": kinds.count("near")}
