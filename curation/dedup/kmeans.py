"""Spherical k-means routing for near-duplicate search, with the number of clusters per row chosen
from a recall target (issue 19).

Clusters: MiniBatchKMeans (scikit-learn) on a sample of the unit embeddings, centroids then
normalised, and every row scored by cosine s(x, c) = x . c. The former Euclidean rule
(x . c - |c|^2 / 2) collapses on data without cluster structure: on isotropic 768-d embeddings the
centroid of a diffuse cluster has a small norm, so it wins for most rows (100K isotropic rows, 400
clusters: one held 57 % of the rows), and splitting it afterwards left near pairs on either side of
cuts through the bulk (64 % recall on 1M isotropic rows). Cosine scoring keeps clusters balanced on
isotropic data (largest 1.5x the mean) and on a topic mixture; clusters above SPLIT_LARGE x the mean
are still refitted on their own sample rows (dense topics).

Soft assignment, both sides: every row joins its `A` best-scoring clusters, and a pair is searched
when the two rows share a cluster (the lowest shared cluster reports it). Measured on 1M x 768-d
rows with partners planted at cosine 0.95 (4000 clusters): sharing one of the top A clusters finds
0.4568 / 0.8035 / 0.9795 / 0.9987 / 0.9998 of the pairs for A = 1 / 2 / 4 / 6 / 8 on isotropic
data, and 0.66 / 0.90 / 0.99 / 0.9992 / 1.0 on a topic mixture; probing the partner's single
cluster among the top P (IVF-style, one copy of the data) needs P = 16 for 0.997 on both: soft
assignment on both sides needs A^2 = 36 row comparisons per cluster row where IVF needs P = 16
clusters of one row each, but its shuffle is A copies against 1 + P.

A from the data, not a constant: at plan time (calibrate) partners are planted at the recall
cosine around sample rows, along two kinds of directions (isotropic, and differences of two
sample rows of the row's own cluster, i.e. the data's local covariance: near copies of topic data
differ along the directions that also separate its clusters), and the sample's own near pairs are added where it has enough;
A is the smallest count whose estimated recall reaches the target for all of them. The margin after that is only the lossless one: a row skips a
cluster c of its top A when its distance to the boundary (the bisector hyperplane of its nearest
centroid c1 and c, through the origin for unit centroids) exceeds r = |x - y| = sqrt(2 - 2t) at the
candidate threshold t. Such a partner y lies on c1's side too, so it ranks c1 above c and c1 is in
both lists: the pair is still found. On a topic mixture at the high end this drops most extra
clusters; on isotropic data none (every boundary is about equally close).

Space: the centroids are fitted on, and rows assigned by, their codes (codes.py: random 128-d by
default, what the search ships and compares); partners are planted in the full space and encoded,
and the boundary radius follows from the calibrated code threshold. The measurements above were
taken in the full 768-d space.

Index: above FLAT_MAX centroids they are grouped into ~sqrt(K) cells and a row is scored against
the cell centres and the centroids of its `probe` best cells only (bf16 candidates, fp32 re-ranked).
"""
from __future__ import annotations

import math

import numpy as np

SAMPLE_PER_CLUSTER = 16  # sample rows per centroid: more costs fit time without better recall
SPLIT_LARGE = 16  # clusters above this many times the mean size are fitted again on their own rows
FLAT_MAX = 16384  # up to this many centroids (~4M rows) rows are scored against all of them
CELL_CAP = 3  # largest cell of the centroid index, in mean cell sizes (bounds the per-row scoring)
BANDS = (0.90, 0.95, 0.99)  # cosines at which calibrate() reports the estimated recall per count


def _unit(x) -> np.ndarray:
    """Rows scaled to unit norm, fp32; x itself when it already is (no copy: the fit's 100K x 768
    sample is 0.3 GB)."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if len(x) and np.abs(norm - 1).max() <= 1e-6:
        return x
    return x / np.maximum(norm, 1e-12)


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n,) index of the highest-cosine row of c for each row of x (fp32, in 4096-row slices)."""
    import torch

    xt, ct = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(c))
    return torch.cat([torch.argmax(xt[s:s + 4096] @ ct.T, dim=1) for s in range(0, len(xt), 4096)]).numpy()


def fit_centroids(sample: np.ndarray, n_clusters: int, seed: int = 0) -> dict:
    """sample (S, D) -> {"fine" (K, D) f32 unit centroids ordered by cell, "coarse" (K1, D) f32 unit
    cell centres, "cell_start" (K1 + 1,) int64: the centroids of cell c are
    fine[cell_start[c]:cell_start[c + 1]]}."""
    from sklearn.cluster import MiniBatchKMeans

    if len(sample) == 0:
        raise ValueError("no sample rows to fit centroids on")
    x = _unit(sample)
    k = max(1, min(int(n_clusters), len(x)))
    if k > 1:
        fine = MiniBatchKMeans(k, init="random", batch_size=4096, n_init=1, max_iter=5, max_no_improvement=3,
                               random_state=seed).fit(x).cluster_centers_
    else:
        fine = x.mean(0, keepdims=True)
    fine = _split_large(x, _unit(fine), seed)
    labels = _cells(fine, seed)
    k1 = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k1)
    coarse = _unit(np.stack([fine[labels == c].mean(0) for c in range(k1)]))
    return {"coarse": coarse, "fine": np.ascontiguousarray(fine[order]),
            "cell_start": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}


def _split_large(x: np.ndarray, fine: np.ndarray, seed: int) -> np.ndarray:
    """Unit centroids (K', D) where every cluster holding more than SPLIT_LARGE x the mean of the
    sample is replaced by k-means centroids of its own sample rows (about mean-sized): the search
    work is the sum of squared cluster sizes, which a few dense topics would dominate."""
    from sklearn.cluster import KMeans

    n, k = len(x), len(fine)
    if k < 2:
        return fine
    near = _nearest(x, fine)
    counts = np.bincount(near, minlength=k)
    mean = n / k
    keep, extra = np.ones(k, bool), []
    for c in np.flatnonzero(counts > SPLIT_LARGE * mean).tolist():
        members = x[near == c]
        sub = KMeans(int(math.ceil(counts[c] / mean)), n_init=1, max_iter=50, random_state=seed).fit(members)
        keep[c] = False
        extra.append(_unit(sub.cluster_centers_))
    return np.concatenate([fine[keep], *extra]) if extra else fine


def _cells(fine: np.ndarray, seed: int) -> np.ndarray:
    """(K,) int64 cell of each centroid: ~sqrt(K) cells of the centroid index, none larger than
    CELL_CAP x the mean (oversized cells are split again until they fit)."""
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


def boundary_radius(threshold: float) -> float:
    """|x - y| of two unit vectors at cosine `threshold`: the lossless boundary margin."""
    return math.sqrt(max(0.0, 2.0 - 2.0 * threshold))


class Assigner:
    """Assigns rows to clusters: `assigner(emb (n, D) fp16/fp32) -> (n, assignments) int32`, best
    first, -1 where a row skips a cluster (farther than `radius` from its boundary with the
    nearest). Deterministic per row (copies of one image agree). Only the centroids of the `probe`
    cells nearest to a row are scored when there are more than FLAT_MAX of them."""

    def __init__(self, cent: dict[str, np.ndarray], assignments: int, radius: float, probe: int,
                 flat: bool | None = None):
        import torch  # here, not at import: the driver references this module without running it

        self.coarse = torch.from_numpy(np.ascontiguousarray(cent["coarse"], np.float32)).to(torch.bfloat16)
        self.fine32 = torch.from_numpy(np.ascontiguousarray(cent["fine"], np.float32))
        self.fine = self.fine32.to(torch.bfloat16)
        self.start = cent["cell_start"].astype(np.int64)
        self.kmax = int(np.diff(self.start).max())
        self.probe = max(1, min(probe, len(self.coarse)))
        self.assignments = max(1, min(assignments, self.probe * self.kmax, len(self.fine)))
        self.radius = radius
        # flat bf16 scoring of every centroid: 30 s per 1M rows on one core at K = 3800; the per-cell
        # gathers of the index cost more than the matmul they save until K is in the tens of thousands
        self.flat = (len(self.fine) <= FLAT_MAX or self.probe >= len(self.coarse)) if flat is None else flat

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        import torch

        n = len(emb)
        out = np.full((n, self.assignments), -1, np.int32)
        width = len(self.fine) if self.flat else self.probe * self.kmax
        chunk = max(256, min(4096, (1 << 24) // width))  # bounds the (chunk, width) score buffers
        for s in range(0, n, chunk):
            x = torch.from_numpy(np.ascontiguousarray(emb[s:s + chunk])).float()
            out[s:s + chunk] = self._assign(x / x.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return out

    def _assign(self, x) -> np.ndarray:
        import torch

        xb = x.to(torch.bfloat16)  # (m, D): bf16 matmuls, ~2.4x fp32 on AVX512-BF16 CPUs
        m = len(xb)
        if self.flat:  # every centroid: (m, K) bf16 cosines
            top = min(self.assignments + 2, len(self.fine))
            vals, fine_id = torch.topk(xb @ self.fine.T, top, dim=1)
            vals = vals.float()
        else:
            cells = torch.topk((xb @ self.coarse.T).float(), self.probe, dim=1).indices  # (m, P)
            buf = torch.full((m, self.probe, self.kmax), -math.inf)  # fine scores of the probed cells
            for c in torch.unique(cells).tolist():
                r, slot = torch.nonzero(cells == c, as_tuple=True)
                lo, hi = int(self.start[c]), int(self.start[c + 1])
                buf[r, slot, :hi - lo] = (xb[r] @ self.fine[lo:hi].T).float()
            top = min(self.assignments + 2, buf.shape[1] * buf.shape[2])
            vals, idx = torch.topk(buf.view(m, -1), top, dim=1)  # (m, top) candidates from bf16 scores
            cell = torch.gather(cells, 1, idx // self.kmax)
            fine_id = torch.from_numpy(self.start)[cell] + idx % self.kmax
        # their exact fp32 cosines decide the order and the boundary rule (bf16 is off by ~0.004)
        valid = torch.isfinite(vals)
        fine_id = torch.where(valid, fine_id, 0)
        exact = torch.cat([torch.bmm(self.fine32[fine_id[s:s + 512]], x[s:s + 512, :, None])[:, :, 0]
                           for s in range(0, m, 512)])  # (m, top); 512-row slices stay in cache
        vals, order = torch.sort(torch.where(valid, exact, -math.inf), dim=1, descending=True)
        fine_id = torch.gather(fine_id, 1, order)[:, :self.assignments]
        vals = vals[:, :self.assignments]
        keep = torch.isfinite(vals)
        if self.assignments > 1:
            c0 = self.fine32[fine_id[:, 0]]  # (m, D)
            for k in range(1, self.assignments):
                dist = (c0 - self.fine32[fine_id[:, k]]).norm(dim=1).clamp_min(1e-6)
                keep[:, k] &= (vals[:, 0] - vals[:, k]) / dist <= self.radius  # distance to the c1 / ck bisector
        return torch.where(keep, fine_id, -1).numpy().astype(np.int32)


def _partners(x: np.ndarray, pool: np.ndarray, cos: float, shaped: bool, rng, home=None) -> np.ndarray:
    """Unit rows at cosine `cos` from each row of x (n, D): along isotropic directions, or (shaped)
    along differences of two random rows of `pool` from x's own cluster (the local covariance;
    home = (cluster of each x row, pool rows sorted by cluster, start of each cluster in it)). The
    global covariance would be wrong for a mixture: on 1M rows half topics, half isotropic, it
    pushed isotropic rows towards the dense topics and asked for 12 clusters per row instead of ~6."""
    if shaped:
        c, order, start = home
        lo, n = start[c], np.maximum(start[c + 1] - start[c], 1)
        pick = lambda: order[np.minimum(lo + (rng.random(len(x)) * n).astype(np.int64), len(order) - 1)]  # noqa: E731
        u = pool[pick()] - pool[pick()]
    else:
        u = rng.standard_normal(x.shape).astype(np.float32)
    u = u - (u * x).sum(1, keepdims=True) * x
    u = _unit(u + 1e-6 * rng.standard_normal(x.shape).astype(np.float32))  # never a zero direction
    return (cos * x + math.sqrt(1 - cos * cos) * u).astype(np.float32)


def _real_pairs(x: np.ndarray, pool: np.ndarray, lo: float, hi: float, limit: int = 20000) -> tuple:
    """(i, j): rows x[i], pool[j] at fp32 cosine in [lo, hi) (exact copies, cosine >= 0.99999, left out)."""
    import torch

    xt, pt = torch.from_numpy(x), torch.from_numpy(pool)
    out_i, out_j = [], []
    step = max(256, (1 << 23) // max(len(xt), 1))  # (n, step) fp32 scores ~32 MB (8192 columns: +0.6 GB at n = 4000)
    for s in range(0, len(pt), step):
        sims = xt @ pt[s:s + step].T
        i, j = torch.nonzero((sims >= lo) & (sims < min(hi, 0.99999)), as_tuple=True)
        out_i.append(i.numpy()), out_j.append(j.numpy() + s)
        if sum(map(len, out_i)) >= limit:
            break
    return np.concatenate(out_i)[:limit], np.concatenate(out_j)[:limit]


def calibrate(sample: np.ndarray, cent: dict, max_assignments: int, probe: int, cosine: float, target: float,
              threshold: float, basis: np.ndarray | None = None, seed: int = 0, n: int = 4000,
              min_real: int = 100, code_cosine: float | None = None) -> dict:
    """The code threshold t' (codes.py) and the smallest number of clusters per row whose estimated
    recall of pairs at `cosine` reaches `target` (capped at max_assignments), with the estimate per
    count and band. `sample` (S, D) are full embeddings, `cent` was fitted on their codes (`basis`).

    Partners are planted in the full space and then encoded, as a near copy's embedding would be.
    Three estimates, the worst decides: partners planted at each BANDS cosine (and `cosine`) around
    up to n sample rows along isotropic directions, and along differences of two sample rows; and
    the sample's own pairs (up to n rows against the whole sample) in the band [cosine, cosine +
    0.04) when there are at least `min_real` of them (dense data: real neighbours are not random
    perturbations). A pair counts as found when the two rows' assignments share a cluster. The
    boundary radius follows from t' (pairs at >= threshold are within it in code space).
    Returns {"assignments", "reached" (False: even max_assignments falls short), "radius", "code":
    {"code_threshold", ...}, "estimate": {"A": {"0.9": recall, ...}}, "mean_clusters": {A: mean
    clusters per row after the boundary rule}, "real_pairs": {cosine: pairs used}}."""
    from curation.dedup import codes

    rng = np.random.default_rng([seed, 19])
    full = _unit(sample)
    pool = codes.encode(full, basis, np.float32)
    pick = rng.permutation(len(pool))[:n]
    xf, x = full[pick], pool[pick]
    one = Assigner(cent, 1, 0.0, probe)
    hp = one(pool)[:, 0]
    order = np.argsort(hp, kind="stable")
    start = np.searchsorted(hp[order], np.arange(len(cent["fine"]) + 1))
    home = (one(x)[:, 0], order, start)  # local covariance: sample rows of each row's own cluster
    # t' first: the code cosines of pairs at the candidate threshold, or at code_cosine above it
    # (both partner models, real pairs): pairs below code_cosine are then found where their codes clear t'
    ct = threshold if code_cosine is None else max(threshold, code_cosine)
    at_t = [codes.code_cosines(xf, _partners(xf, full, ct, shaped, rng, home), basis) for shaped in (False, True)]
    i, j = _real_pairs(xf, full, ct, ct + 0.02)
    code = codes.code_threshold(at_t + [codes.code_cosines(xf[i], full[j], basis)], ct)
    radius = boundary_radius(code["code_threshold"])
    big = Assigner(cent, max_assignments, radius, probe)
    ax, ap = big(x), big(pool)
    cosines = sorted(set(BANDS) | {round(float(cosine), 4)})

    def recall_by_count(hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
        return np.array([((hx[:, :a, None] == hy[:, None, :a]) & (hx[:, :a, None] >= 0)).any((1, 2)).mean()
                         for a in range(1, big.assignments + 1)])

    found, real = {}, {}  # cosine -> (A,) worst recall for the first A clusters of both rows
    for c in cosines:
        worst = np.ones(big.assignments)
        for shaped in (False, True):
            y = codes.encode(_partners(xf, full, c, shaped, rng, home), basis, np.float32)
            worst = np.minimum(worst, recall_by_count(ax, big(y)))
        i, j = _real_pairs(xf, full, c, c + 0.04)
        real[str(c)] = int(len(i))
        if len(i) >= min_real:
            worst = np.minimum(worst, recall_by_count(ax[i], ap[j]))
        found[c] = worst
    ok = np.flatnonzero(found[round(float(cosine), 4)] >= target)
    a = int(ok[0]) + 1 if len(ok) else big.assignments
    return {"assignments": a, "reached": bool(len(ok)), "real_pairs": real, "radius": radius, "code": code,
            "estimate": {str(k): {str(c): round(float(found[c][k - 1]), 4) for c in cosines}
                         for k in range(1, big.assignments + 1)},
            "mean_clusters": {str(k): round(float((ax[:, :k] >= 0).sum(1).mean()), 3)
                              for k in range(1, big.assignments + 1)}}


def pack_groups(cost: np.ndarray, n_groups: int, contiguous: bool = False) -> np.ndarray:
    """Cluster -> search group (int32). Default: longest-processing-time first (each cluster, most
    costly first, goes to the group with the least cost so far; cost ~ rows^2, the search work).
    contiguous: consecutive cluster ids (fit_centroids orders them by cell of the centroid index,
    so neighbouring clusters are neighbours in id) in runs of about equal cost: a row's clusters,
    and a dense region's, then mostly share one group, where its embedding is (search.route)."""
    cost = np.asarray(cost, np.float64)
    if contiguous:
        cum = np.cumsum(cost)
        total = cum[-1] if len(cum) else 0.0
        if total <= 0:
            return (np.arange(len(cost)) * n_groups // max(1, len(cost))).astype(np.int32)
        group = np.minimum((cum - cost / 2) * n_groups // total, n_groups - 1).astype(np.int32)
        return np.unique(group, return_inverse=True)[1].astype(np.int32)  # no empty group ids
    import heapq

    heap = [(0.0, g) for g in range(n_groups)]
    group = np.zeros(len(cost), np.int32)
    for c in np.argsort(-cost, kind="stable"):
        load, g = heapq.heappop(heap)
        group[c] = g
        heapq.heappush(heap, (load + float(cost[c]), g))
    return group
