"""k-means for near-duplicate search: centroids fitted on a sample (scikit-learn), an index over
them for fast assignment, and every row assigned to its nearest cluster plus the clusters whose
boundary it lies close to. What was measured on a 1M-row topic mixture (benchmarks/scale_bench.py)
decided each choice below.

Space: clustering (not the search) happens after removing the leading principal components of
the sample (D / 100 of them, the "all-but-the-top" rule of thumb: 8 for ViT-L/14's 768-d) and
renormalising: those directions carry variance
shared by every topic (in CLIP: style, lighting, ...), so cells cut along them split every topic
and near duplicates, which differ mostly along them, straddle the cuts. Dropping 8 raised the
share of planted pairs sharing a cluster from 0.990 to 0.999 with fewer copies per row.

Fit: MiniBatchKMeans, random seeding, a few epochs over ~16 sample rows per cluster. k-means++
seeding was 8x slower with the same recall; a balanced two-level fit (clusters allotted per coarse
cell by its rows) cut dense topics finely and lost pairs (recall 0.955 instead of 0.997).

Index: scoring a row against all K centroids would dominate at tens of millions of rows (K grows
with the data), so above FLAT_MAX centroids they are grouped into ~sqrt(K) cells (k-means over the
centroids) and a row is scored against the cell centres and the centroids of its `probe` best cells
only. Below it, flat bf16 scoring against every centroid is faster and exact.

Several clusters per row: for unit vectors at cosine t, |x - y| = r = sqrt(2 - 2t). If y's nearest
cluster c is not x's nearest c1, the segment x-y crosses the boundary (bisector hyperplane) of c1
and c, so x lies within r of it (projection shrinks distances: the bound holds in the clustering
space too). A row joins every cluster whose boundary with its nearest lies within `radius` (in the
stage assign_radius * r: 1 can miss nothing, but in high dimensions nearly every cluster is that
close), at most `assignments` clusters. Scores are s(x, c) = x.c - |c|^2 / 2 (the nearest centroid in
Euclidean distance has the largest s), so x's distance to the c1/c boundary is (s1 - s) / |c1 - c|.
k-means leaves some clusters far larger than the rest (rows of sparse regions gather at central
centroids); the fit replaces each cluster above SPLIT_LARGE x the mean by centroids fitted on its own
sample rows (1M rows: largest 21K -> 16K rows, 1M in 116 s instead of 126 s, 0.7 % fewer pairs; at
8x the mean 103 s but 0.9 % fewer pairs and recall 0.9972 at 100K).
"""
from __future__ import annotations

import math

import numpy as np

SAMPLE_PER_CLUSTER = 16  # sample rows per centroid: more costs fit time without better recall
SPLIT_LARGE = 16  # clusters above this many times the mean size are fitted again on their own rows
FLAT_MAX = 16384  # up to this many centroids (~4M rows) rows are scored against all of them
CELL_CAP = 3  # largest cell of the centroid index, in mean cell sizes (bounds the per-row scoring)


def drop_components(dim: int) -> int:
    """Leading principal components left out of the clustering space: D / 100 (8 at 768-d). On 64-d
    test data dropping 8 lost pairs (recall 0.985), D / 100 kept 1.0."""
    return int(round(dim / 100))


def fit_space(sample: np.ndarray, drop: int | None = None) -> np.ndarray:
    """(drop, D) float32: the leading principal directions of the (centred) sample, <= 20000 rows."""
    x = np.asarray(sample[:20000], np.float32)
    drop = drop_components(x.shape[1]) if drop is None else drop
    if drop <= 0 or len(x) < 2 * drop:
        return np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    return np.ascontiguousarray(vt[:drop], np.float32)


def project(x, components):
    """Rows without their components along `components`, renormalised: (n, D) float32 (numpy or torch)."""
    import torch

    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if len(components):
        v = torch.as_tensor(components)
        t = t - (t @ v.T) @ v
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_centroids(sample: np.ndarray, n_clusters: int, seed: int = 0, drop: int | None = None) -> dict:
    """sample (S, D) -> {"components" (drop, D): the clustering space, "fine" (K, D) f32 centroids
    ordered by cell, "coarse" (K1, D) f32 cell centres, "cell_start" (K1 + 1,) int64: the centroids
    of cell c are fine[cell_start[c]:cell_start[c + 1]]}."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(sample) == 0:
        raise ValueError("no sample rows to fit centroids on")
    components = fit_space(sample, drop)
    x = project(sample, components).numpy()
    n = len(x)
    k = max(1, min(int(n_clusters), n))
    if k > 1:
        fine = MiniBatchKMeans(k, init="random", batch_size=4096, n_init=1, max_iter=5, max_no_improvement=3,
                               random_state=seed).fit(x).cluster_centers_.astype(np.float32)
    else:
        fine = x.mean(0, keepdims=True)
    fine = _split_large(x, fine, seed)
    labels = _cells(fine, seed)
    k1 = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k1)
    coarse = np.stack([fine[labels == c].mean(0) for c in range(k1)]).astype(np.float32)
    return {"components": components, "coarse": coarse, "fine": fine[order],
            "cell_start": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}


def _split_large(x: np.ndarray, fine: np.ndarray, seed: int) -> np.ndarray:
    """Centroids (K', D) where every cluster holding more than SPLIT_LARGE x the mean of the sample
    is replaced by k-means centroids of its own sample rows (about mean-sized). k-means leaves a
    few diffuse clusters ~50x the mean (1M rows: largest ~21K rows of ~440); the search work is the
    sum of squared cluster sizes, which they dominate."""
    import torch
    from sklearn.cluster import KMeans

    n, k = len(x), len(fine)
    if k < 2:
        return fine
    xt, ft = torch.from_numpy(x), torch.from_numpy(fine)
    near = torch.cat([torch.argmax(xt[s:s + 4096] @ ft.T - (ft ** 2).sum(1) / 2, dim=1)
                      for s in range(0, n, 4096)]).numpy()  # (n,) nearest centroid, fp32
    counts = np.bincount(near, minlength=k)
    mean = n / k
    keep, extra = np.ones(k, bool), []
    for c in np.flatnonzero(counts > SPLIT_LARGE * mean).tolist():
        members = x[near == c]
        sub = KMeans(int(math.ceil(counts[c] / mean)), n_init=1, max_iter=50, random_state=seed).fit(members)
        keep[c] = False
        extra.append(sub.cluster_centers_.astype(np.float32))
    return np.concatenate([fine[keep], *extra]) if extra else fine


def _cells(fine: np.ndarray, seed: int) -> np.ndarray:
    """(K,) int64 cell of each centroid: ~sqrt(K) cells of the centroid index, none larger than
    CELL_CAP x the mean. k-means over the centroids alone left one cell with 2103 of 3800 centroids
    (the dense centre of the data), which made assignment score 8 probed cells x 2103 slots per row;
    oversized cells are split again until they fit."""
    from sklearn.cluster import KMeans

    k = len(fine)
    k1 = int(round(math.sqrt(k))) if k > 64 else 1
    if k1 <= 1:
        return np.zeros(k, np.int64)
    labels = KMeans(k1, n_init=1, random_state=seed).fit(fine).labels_.astype(np.int64)
    mean = k / k1
    cap = max(8, int(CELL_CAP * mean))
    while True:
        counts = np.bincount(labels)
        big = np.flatnonzero(counts > cap)
        if not len(big):
            break
        for c in big.tolist():
            members = np.flatnonzero(labels == c)
            n_sub = int(math.ceil(len(members) / mean))
            sub = KMeans(n_sub, n_init=1, random_state=seed).fit(fine[members]).labels_
            if np.bincount(sub).max() == len(members):  # identical centroids: split in order
                sub = np.arange(len(members)) * n_sub // len(members)
            nxt = int(labels.max()) + 1
            labels[members] = np.where(sub == 0, c, nxt + sub - 1)
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


class Assigner:
    """Assigns rows to clusters: `assigner(emb (n, D) fp16/fp32) -> (n, assignments) int32`, nearest
    first, -1 where a row joins fewer clusters; rows are projected into the clustering space
    (cent["components"]) first. Deterministic per row (copies of one image agree).
    Only the centroids of the `probe` cells nearest to a row are scored (exact when probe >= cells)."""

    def __init__(self, cent: dict[str, np.ndarray], assignments: int, radius: float, probe: int,
                 flat: bool | None = None):
        import torch  # here, not at import: the driver references this module without running it

        self.components = cent.get("components", np.zeros((0, 0), np.float32))
        self.coarse = torch.from_numpy(cent["coarse"]).to(torch.bfloat16)
        self.fine32 = torch.from_numpy(np.ascontiguousarray(cent["fine"], np.float32))
        self.fine = self.fine32.to(torch.bfloat16)
        self.h_coarse = (self.coarse.float() ** 2).sum(1) / 2
        self.h_fine = (self.fine.float() ** 2).sum(1) / 2
        self.h_fine32 = (self.fine32 ** 2).sum(1) / 2
        self.h_fine16 = self.h_fine.to(torch.bfloat16)
        self.start = cent["cell_start"].astype(np.int64)
        self.sizes = np.diff(self.start)
        self.kmax = int(self.sizes.max())
        self.probe = max(1, min(probe, len(self.coarse)))
        self.assignments = max(1, min(assignments, self.probe * self.kmax, len(self.fine)))
        self.radius = radius
        # Measured at K = 3800 (1M rows): flat bf16 scoring 30 s per 1M rows on one core, the
        # index (probe 8) 81-117 s with only 87 % of rows on their true nearest centroid; the
        # per-cell gathers cost more than the matmul they save until K is in the tens of thousands.
        self.flat = (len(self.fine) <= FLAT_MAX or self.probe >= len(self.coarse)) if flat is None else flat

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        import torch

        n = len(emb)
        out = np.full((n, self.assignments), -1, np.int32)
        width = len(self.fine) if self.flat else self.probe * self.kmax
        chunk = max(256, min(4096, (1 << 24) // width))  # bounds the (chunk, width) score buffers
        for s in range(0, n, chunk):
            out[s:s + chunk] = self._assign(project(torch.from_numpy(np.ascontiguousarray(emb[s:s + chunk])),
                                                    self.components))
        return out

    def _assign(self, x) -> np.ndarray:
        import torch

        xb = x.to(torch.bfloat16)  # (m, D): bf16 matmuls, ~2.4x fp32 on AVX512-BF16 CPUs
        m = len(xb)
        if self.flat:  # every centroid: (m, K) bf16 scores, bias subtracted in place (no fp32 copy)
            top = min(self.assignments + 2, len(self.fine))
            scores = xb @ self.fine.T
            scores -= self.h_fine16
            vals, fine_id = torch.topk(scores, top, dim=1)
            vals = vals.float()
        else:
            cells = torch.topk((xb @ self.coarse.T).float() - self.h_coarse, self.probe, dim=1).indices  # (m, P)
            buf = torch.full((m, self.probe, self.kmax), -math.inf)  # fine scores of the probed cells
            for c in torch.unique(cells).tolist():
                r, slot = torch.nonzero(cells == c, as_tuple=True)
                lo, hi = int(self.start[c]), int(self.start[c + 1])
                buf[r, slot, :hi - lo] = (xb[r] @ self.fine[lo:hi].T).float() - self.h_fine[lo:hi]
            top = min(self.assignments + 2, buf.shape[1] * buf.shape[2])
            vals, idx = torch.topk(buf.view(m, -1), top, dim=1)  # (m, top) candidates from bf16 scores
            cell = torch.gather(cells, 1, idx // self.kmax)
            fine_id = torch.from_numpy(self.start)[cell] + idx % self.kmax
        # their exact fp32 scores decide the order and the boundary rule (bf16 is off by ~0.004)
        valid = torch.isfinite(vals)
        fine_id = torch.where(valid, fine_id, 0)
        exact = torch.cat([torch.bmm(self.fine32[fine_id[s:s + 512]], x[s:s + 512, :, None].float())[:, :, 0]
                           for s in range(0, m, 512)]) - self.h_fine32[fine_id]  # (m, top); 512-row slices stay in cache
        vals, order = torch.sort(torch.where(valid, exact, -math.inf), dim=1, descending=True)
        fine_id = torch.gather(fine_id, 1, order)[:, :self.assignments]
        vals = vals[:, :self.assignments]
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
