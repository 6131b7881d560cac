"""Dedup against an independent brute-force computation (full similarity matrix + scipy components)."""
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation.config import DedupConfig
from curation.dedup import find_duplicates, near_pairs


def _data(n=300, d=16, n_dups=40, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d))
    src = rng.choice(n, n_dups, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), n_dups, replace=False)
    emb[dst] = emb[src] + rng.normal(scale=0.05, size=(n_dups, d))  # near copies, spread across blocks
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


def _brute_components(emb, thr):
    s = emb @ emb.T
    i, j = np.nonzero(np.triu(s > thr, 1))
    g = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(emb),) * 2)
    return connected_components(g, directed=False)[1]


def test_near_pairs_match_full_matrix_across_blocks():
    emb = _data()
    got = {(i, j) for i, j, _ in near_pairs(emb, 0.9, block=32)}  # block << N: pairs cross blocks
    s = emb @ emb.T
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(s > 0.9, 1)))}
    assert got == want and len(want) >= 40


def test_groups_equal_connected_components_and_keep_best():
    emb = _data()
    n = len(emb)
    keys = [f"{i:05d}" for i in range(n)]
    pixels = list(np.random.default_rng(1).integers(1, 10_000, n))
    cfg = DedupConfig(threshold=0.9, block_size=64, exact=False)
    dups = find_duplicates(keys, [None] * n, emb, pixels, [None] * n, cfg)
    labels = _brute_components(emb, 0.9)
    for comp in np.unique(labels):
        members = np.flatnonzero(labels == comp)
        if len(members) == 1:
            assert members[0] not in dups
            continue
        best = max(members, key=lambda i: (pixels[i], -i))
        assert best not in dups
        for m in members:
            if m != best:
                assert dups[m][0] == best and dups[m][1] == "near"
                assert abs(dups[m][2] - float(emb[m] @ emb[best])) < 1e-5


def test_exact_duplicates_by_hash_and_first_policy():
    emb = np.eye(4, dtype=np.float32)
    keys = ["a", "b", "c", "d"]
    sha = ["h1", "h2", "h1", None]
    dups = find_duplicates(keys, sha, emb, [1, 1, 5, 1], [None] * 4, DedupConfig(threshold=0.99, keep="first"))
    assert dups == {2: (0, "exact", 1.0)}
    dups = find_duplicates(keys, sha, emb, [1, 1, 5, 1], [None] * 4, DedupConfig(threshold=0.99, keep="best"))
    assert dups == {0: (2, "exact", 1.0)}  # the larger copy is kept


def test_cluster_partitioned_search_finds_the_same_duplicates():
    # well-separated clusters: partitioned search must find every pair the full search finds
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(8, 32)) * 10
    emb = np.concatenate([c + rng.normal(size=(100, 32)) for c in centers])
    emb[::50] = emb[1::50] + 0.01
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    n = len(emb)
    args = ([f"{i:05d}" for i in range(n)], [None] * n, emb, [1] * n, [None] * n)
    full = find_duplicates(*args, DedupConfig(threshold=0.999, block_size=100, exact=False))
    part = find_duplicates(*args, DedupConfig(threshold=0.999, block_size=100, clusters=8, exact=False))
    assert full == part and len(full) == 16
