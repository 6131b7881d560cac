"""Codes of the near search (curation/dedup/codes.py): the random projection against the
Johnson-Lindenstrauss error it promises on data of any shape, and the code threshold against pairs
planted independently of the calibration (768-d, as ViT-L/14)."""
from __future__ import annotations

import numpy as np
from dedup_data import embeddings

from curation.dedup import codes, kmeans


def test_projection_error_is_the_same_on_any_data():
    """For pairs at cosine c the code cosine's spread is ~(1 - c^2) / sqrt(d') (Gaussian projection
    theory), on isotropic rows and on a topic mixture alike, with copies moved isotropically or
    along the data's own differences; orthonormal, seeded, None when d' >= D."""
    w = codes.projection(768, 128, seed=3)
    assert w.shape == (768, 128) and np.allclose(w.T @ w, np.eye(128), atol=1e-5)
    assert np.array_equal(w, codes.projection(768, 128, seed=3)) and not np.allclose(w, codes.projection(768, 128, 4))
    assert codes.projection(768, 768) is None and codes.projection(768, 0) is None
    rng = np.random.default_rng(1)
    for kind in ("iso", "topic"):
        x = embeddings(6000, 768, kind, seed=2, near_frac=0.0)["emb"].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        for c in (0.9, 0.95):
            for spec in (None, np.abs(x[:1] - x[1:2])):
                got = codes.code_cosines(x, _plant(x, c, rng, spec), w)
                theory = (1 - c * c) / np.sqrt(128)
                # one fixed basis for all pairs: structured data shifts the mean a little (topic: +0.33 sigma)
                assert abs(got.mean() - c) < 0.5 * theory and 0.7 * theory < got.std() < 1.3 * theory, (kind, c, got.std())
    z = codes.encode(x[:5], w)
    assert z.dtype == np.float16 and np.allclose(np.linalg.norm(z.astype(np.float32), axis=1), 1, atol=2e-3)


def _plant(x, cos, rng, spec=None):
    u = rng.standard_normal(x.shape) * (1.0 if spec is None else spec * np.sqrt(x.shape[1]))
    u -= (u * x).sum(1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return (cos * x + np.sqrt(1 - cos ** 2) * u).astype(np.float32)


def test_code_threshold_keeps_pairs_at_the_threshold_and_drops_random_pairs():
    """768-d rows, 128-d codes: the calibrated t' keeps >= 99.9 % of fresh pairs at cosine 0.9 (the
    candidate threshold) and 100 % of those at 0.95, while unrelated isotropic pairs stay far below
    (they would be candidates for nothing)."""
    for kind in ("iso", "topic"):
        data = embeddings(30_000, 768, kind, seed=1, near_frac=0.0)
        x = data["emb"].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        basis = codes.projection(768, 128)
        cent = kmeans.fit_centroids(codes.encode(x[:20_000], basis, np.float32), 80, seed=0)
        cal = kmeans.calibrate(x[:20_000], cent, 8, 8, 0.95, 0.99, threshold=0.9, basis=basis)
        t = cal["code"]["code_threshold"]
        assert 0.78 < t < 0.9 - codes.CODE_MARGIN, cal["code"]  # ~ t - 5 sigma
        rng = np.random.default_rng(7)
        src = x[20_000:]
        for cos, need in ((0.9, 0.999), (0.95, 1.0)):
            for spec in (None, np.abs(src[:1] - src[1:2])):  # isotropic, and along the data's own differences
                kept = (codes.code_cosines(src, _plant(src, cos, rng, spec), basis) >= t).mean()
                assert kept >= need, (kind, cos, kept, t)
        if kind == "iso":
            rand = codes.code_cosines(src[:5000], src[5000:], basis)
            assert rand.max() < t - 0.2, (rand.max(), t)


def test_dense_clusters_follow_the_expected_candidates_per_visitor():
    """A tight cluster (rows within ~0.95 of each other) is dense, a sparse one (random directions)
    is not; the expectation is the share of the cluster's sample pairs above the code threshold
    times its estimated rows (recounted here with a plain double loop)."""
    rng = np.random.default_rng(4)
    centre = rng.standard_normal(32)
    tight = centre / np.linalg.norm(centre) + 0.05 * rng.standard_normal((40, 32))
    loose = rng.standard_normal((40, 32))
    z = np.concatenate([tight, loose]).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cl = np.concatenate([np.zeros(40), np.ones(40)]).astype(np.int32)[:, None]
    rows = np.array([400.0, 400.0])
    dense, per_visitor = codes.dense_clusters(z, cl, rows, 0.8, 0.5)
    assert dense.tolist() == [True, False]
    share = [sum(float(z[i] @ z[j]) >= 0.8 for i in m for j in m if i != j) / (len(m) * (len(m) - 1))
             for m in (range(40), range(40, 80))]
    assert share[0] > 0.9 and share[1] == 0.0
    assert np.isclose(per_visitor, (share[0] * 400 * 400 + share[1] * 400 * 400) / 800)
    assert not codes.dense_clusters(z, cl, rows, 0.8, 1e9)[0].any()  # a huge limit: codes only


def test_contiguous_packing_keeps_neighbours_together():
    cost = np.array([1, 1, 1, 1, 10, 1, 1, 1, 1, 2], float)
    g = kmeans.pack_groups(cost, 3, contiguous=True)
    assert (np.diff(g) >= 0).all() and g[0] == 0 and g.max() == 2  # runs of consecutive ids
    loads = np.bincount(g, weights=cost)
    assert loads.max() <= 10 + 1 and set(np.unique(g)) == {0, 1, 2}
    lpt = kmeans.pack_groups(cost, 3)
    assert sorted(np.bincount(lpt, weights=cost).tolist()) == [5.0, 5.0, 10.0]  # balanced, not contiguous
