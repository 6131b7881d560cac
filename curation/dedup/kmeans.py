"""Two-level k-means for near-duplicate search: centroids fitted on a sample (scikit-learn), every
row assigned to its nearest cluster plus the clusters whose boundary it lies close to.

Why two levels: clusters stay ~`cluster_rows` rows so that the search per row stays constant, so
the number of clusters K grows with the data, and scoring a row against K flat centroids would
dominate at tens of millions of rows. Here ~sqrt(K) coarse centroids each own fine centroids
fitted on that coarse cell's sample rows; a row is scored against the coarse centroids and the
fine centroids of its `probe` best cells only: ~(1 + probe) * sqrt(K) dot products per row.

Why several clusters per row: for unit vectors at cosine t, |x - y| = r = sqrt(2 - 2t). If y's
nearest cluster c is not x's nearest c1, the segment x-y crosses the boundary (bisector hyperplane)
of c1 and c, so x lies within r of it. A row therefore joins every cluster whose boundary with its
nearest lies within `radius * r` (radius 1 can miss nothing but in 768-d nearly every cluster is that
close; ~0.35 keeps about two clusters per row and finds > 99 % of the pairs on structured data,
see benchmarks/RESULTS.md), at most `assignments` clusters.
Scores are s(x, c) = x.c - |c|^2 / 2 (the nearest centroid in Euclidean distance has the largest s),
so the distance of x to the c1/c boundary is (s(x, c1) - s(x, c)) / |c1 - c|.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def fit_centroids(sample: np.ndarray, n_clusters: int, seed: int = 0) -> dict[str, np.ndarray]:
    """sample (S, D) float -> {"coarse" (K1, D) f32, "fine" (K, D) f32 grouped by coarse cell,
    "cell_start" (K1 + 1,) int64: fine centroids of cell c are fine[cell_start[c]:cell_start[c+1]]}.

    Fine centroids are spread over the cells in proportion to their sample rows, so clusters come
    out of similar size wherever the data is dense."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.ascontiguousarray(sample, dtype=np.float32)
    n = len(x)
    if n == 0:
        raise ValueError("no sample rows to fit centroids on")
    k = max(1, min(int(n_clusters), n))
    k1 = max(1, min(int(round(math.sqrt(k))), n))
    if k1 > 1:
        coarse_km = MiniBatchKMeans(k1, batch_size=4096, n_init=1, max_iter=20, random_state=seed,
                                    max_no_improvement=5, reassignment_ratio=0.0).fit(x)
        coarse, labels = coarse_km.cluster_centers_.astype(np.float32), coarse_km.labels_
    else:
        coarse, labels = x.mean(0, keepdims=True), np.zeros(n, np.int64)
    counts = np.bincount(labels, minlength=k1)
    alloc = np.clip(np.round(counts * (k / n)).astype(np.int64), 1, np.maximum(counts, 1))
    fine = []
    for c in range(k1):
        rows = x[labels == c]
        if len(rows) == 0:
            fine.append(coarse[c:c + 1])
        elif alloc[c] == 1:
            fine.append(rows.mean(0, keepdims=True))
        else:
            km = KMeans(int(alloc[c]), n_init=1, max_iter=30, random_state=seed).fit(rows)
            fine.append(km.cluster_centers_.astype(np.float32))
    sizes = np.array([len(f) for f in fine], np.int64)
    return {"coarse": coarse.astype(np.float32), "fine": np.concatenate(fine).astype(np.float32),
            "cell_start": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)}


class Assigner:
    """Assigns rows to clusters: `assigner(emb (n, D) fp16/fp32) -> (n, assignments) int32`, nearest
    first, -1 where a row joins fewer clusters. Deterministic per row (copies of one image agree)."""

    def __init__(self, cent: dict[str, np.ndarray], assignments: int, radius: float, probe: int):
        self.coarse = torch.from_numpy(cent["coarse"]).to(torch.bfloat16)
        self.fine32 = torch.from_numpy(np.ascontiguousarray(cent["fine"], np.float32))
        self.fine = self.fine32.to(torch.bfloat16)
        self.h_coarse = (self.coarse.float() ** 2).sum(1) / 2
        self.h_fine = (self.fine.float() ** 2).sum(1) / 2
        self.start = cent["cell_start"].astype(np.int64)
        self.sizes = np.diff(self.start)
        self.kmax = int(self.sizes.max())
        self.probe = max(1, min(probe, len(self.coarse)))
        self.assignments = max(1, min(assignments, self.probe * self.kmax, len(self.fine)))
        self.radius = radius

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        n = len(emb)
        out = np.full((n, self.assignments), -1, np.int32)
        chunk = max(1024, (1 << 23) // (self.probe * self.kmax))  # bounds the (chunk, probe, kmax) score buffer
        for s in range(0, n, chunk):
            out[s:s + chunk] = self._assign(torch.from_numpy(np.ascontiguousarray(emb[s:s + chunk])))
        return out

    def _assign(self, x: torch.Tensor) -> np.ndarray:
        xb = x.to(torch.bfloat16)  # (m, D): bf16 matmuls, ~2.4x fp32 on AVX512-BF16 CPUs
        m = len(xb)
        cells = torch.topk((xb @ self.coarse.T).float() - self.h_coarse, self.probe, dim=1).indices  # (m, P)
        buf = torch.full((m, self.probe, self.kmax), -math.inf)  # fine scores of the probed cells
        for c in torch.unique(cells).tolist():
            r, slot = torch.nonzero(cells == c, as_tuple=True)
            lo, hi = int(self.start[c]), int(self.start[c + 1])
            buf[r, slot, :hi - lo] = (xb[r] @ self.fine[lo:hi].T).float() - self.h_fine[lo:hi]
        vals, idx = torch.topk(buf.view(m, -1), self.assignments, dim=1)  # (m, A), nearest first
        cell = torch.gather(cells, 1, idx // self.kmax)
        fine_id = torch.from_numpy(self.start)[cell] + idx % self.kmax
        keep = torch.isfinite(vals)
        if self.assignments > 1:
            c0 = self.fine32[fine_id[:, 0]]  # (m, D)
            for k in range(1, self.assignments):
                gap = vals[:, 0] - vals[:, k]  # >= 0
                dist = (c0 - self.fine32[fine_id[:, k]]).norm(dim=1).clamp_min(1e-6)
                keep[:, k] &= gap / dist <= self.radius
        return torch.where(keep, fine_id, -1).numpy().astype(np.int32)


def pack_groups(cost: np.ndarray, n_groups: int) -> np.ndarray:
    """Cluster -> search group (int32), longest-processing-time first: each cluster, most costly
    first, goes to the group with the least cost so far (cost ~ rows^2, the search work)."""
    import heapq

    heap = [(0.0, g) for g in range(n_groups)]
    group = np.zeros(len(cost), np.int32)
    for c in np.argsort(-np.asarray(cost, np.float64), kind="stable"):
        load, g = heapq.heappop(heap)
        group[c] = g
        heapq.heappush(heap, (load + float(cost[c]), g))
    return group
