"""Short codes for the near search: the routing and the within-cluster search run on d' = dedup.code_dims
(default 128) dimensional random-projection codes, and only the candidate pairs they find are
verified on the full embeddings (verify.py). Why (issue 19):

- Isotropic data has no locality: a row's best clusters lie anywhere, so every partition-based
  search (k-means routing, IVF probes, LSH tables) ships each row to about A = 5-12 places. At 768-d
  fp16 that is A x 1.5 KB per row: 10M rows x A = 8 are 123 GB through the object store, the whole
  cost of the former design (1M rows: 1,160 s of search, mostly shuffle). A 128-d fp16 code is
  256 bytes: 6x less to ship and to compare, and the k-means fit and the assignment run in 128-d.
- A random orthonormal projection (Johnson-Lindenstrauss), not PCA: the code cosine of a pair at
  cosine c is off by ~(1 - c^2) / sqrt(d') (0.017 at c = 0.9, d' = 128) whatever the data and
  whatever direction the copy moved in. PCA was tried first: on 1M rows half topic mixture, half
  isotropic, its 128 directions went to the dense half, isotropic rows kept ~1/6 of their norm in
  the codes, a copy moved along the dense half's directions had a code cosine of 0.48 at a true
  0.9, the code threshold fell to 0.46 and a search task held 8.8 GB of candidates.
- Codes estimate the cosine, they do not decide it: the candidate threshold in code space,
  t' = the lowest code cosine of pairs planted at the candidate threshold t (both partner models of
  kmeans.calibrate and the sample's own pairs) minus CODE_MARGIN, is measured at plan time (~t - 5
  sigma), so a pair at >= t passes t' unless it is rarer than ~1 in 10^6. Random pairs have code
  cosines ~N(0, 1/d'): t' ~ 0.82 is ~9 sigma for d' = 128, so candidates are the near pairs plus
  pairs the data really has within ~0.1 below t.
- That last part decides where codes pay. Dense regions have many pairs just below t (the
  benchmark's topic mixture: same-topic rows at cosine 0.63 +- 0.08): on 1M rows half topic, half
  isotropic, codes alone gave 17M candidates (t' = 0.77) for 18K real pairs, and searching only
  rows' home clusters exactly still left 8M. So a row's embedding also goes with it to the clusters
  where a visitor would meet >= dedup.dense_candidates (0.5) candidates (search.py, estimated on
  the plan's sample): there the search is exact, and the codes serve the sparse regions, where they
  produce almost no false candidates (that run: 14K candidates in all).
"""
from __future__ import annotations

import numpy as np

CODE_MARGIN = 0.02  # below the lowest planted code cosine (a tail the planted sample did not reach)


def projection(dim: int, dims: int, seed: int = 0) -> np.ndarray | None:
    """(D, d') float32 random orthonormal basis (QR of a seeded Gaussian matrix), or None when
    d' >= D (codes = the embeddings)."""
    if dims <= 0 or dims >= dim:
        return None
    q, r = np.linalg.qr(np.random.default_rng([seed, 1919]).standard_normal((dim, dims)))
    return np.ascontiguousarray((q * np.sign(np.diag(r))).astype(np.float32))


def encode(emb: np.ndarray, basis: np.ndarray | None, dtype=np.float16, chunk: int = 16384) -> np.ndarray:
    """(n, D) embeddings -> (n, d') unit codes (the embeddings themselves, unit, when basis is None),
    `chunk` rows at a time: the fp32 copy (chunk, D) stays ~50 MB whatever n."""
    import torch

    d_out = emb.shape[1] if basis is None else basis.shape[1]
    out = np.empty((len(emb), d_out), dtype)
    b = None if basis is None else torch.from_numpy(basis)
    for s in range(0, len(emb), chunk):
        x = torch.from_numpy(np.ascontiguousarray(emb[s:s + chunk])).float()
        if b is not None:
            x = x @ b
        out[s:s + chunk] = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    return out


def code_cosines(x: np.ndarray, y: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    """(n,) fp32 cosines of the codes of row pairs (x[i], y[i])."""
    return (encode(x, basis, np.float32) * encode(y, basis, np.float32)).sum(1)


def code_threshold(pair_cosines: list[np.ndarray], threshold: float) -> dict:
    """t' from the code cosines of pairs at (or just above) the candidate threshold: the lowest of
    them minus CODE_MARGIN, never above the threshold itself."""
    allc = np.concatenate([c for c in pair_cosines if len(c)]) if any(len(c) for c in pair_cosines) else np.zeros(0)
    if not len(allc):
        return {"code_threshold": round(threshold - 0.1, 4), "pairs": 0}
    lo = float(allc.min())
    return {"code_threshold": round(min(threshold, lo - CODE_MARGIN), 4), "pairs": int(len(allc)),
            "lowest": round(lo, 4), "q001": round(float(np.quantile(allc, 0.001)), 4),
            "median": round(float(np.median(allc)), 4)}


def dense_clusters(z: np.ndarray, cl: np.ndarray, rows: np.ndarray, code_threshold: float, limit: float) -> tuple:
    """(K,) bool: clusters where a visiting row would meet >= limit (dedup.dense_candidates) candidate pairs
    (estimated: the share of the sample's pairs in the cluster at code cosine >= the code threshold
    x its estimated rows). Shipping the embedding (D x 2 bytes) to such a cluster costs less than
    verifying its candidates later (both ends shipped, 2 x D x 2 bytes each): dense regions, where
    many pairs sit just below the threshold, are searched exactly; sparse ones on the codes.
    Returns (dense, the mean expected candidates per visitor over routed rows)."""
    k = len(rows)
    r, s = np.nonzero(cl >= 0)
    c = cl[r, s]
    order = np.argsort(c, kind="stable")
    r, c = r[order], c[order]
    start = np.searchsorted(c, np.arange(k + 1))
    share = np.zeros(k)
    for q in range(k):
        m = r[start[q]:start[q + 1]]
        if len(m) >= 2:
            sims = z[m] @ z[m].T
            share[q] = ((sims >= code_threshold).sum() - len(m)) / (len(m) * (len(m) - 1))
    expect = share * rows
    return expect >= limit, float((expect * rows).sum() / max(rows.sum(), 1))
