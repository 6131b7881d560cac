"""Dedup stage against an independent brute-force search (full fp32 similarity matrix)."""
import math

import numpy as np
import pytest
from scored_data import brute_pairs, representative, synthetic, write_scored

from _sigma import fs
from curation.config import DedupConfig, PipelineConfig
from curation.dedup import kmeans, read_done, run_dedup, search
from curation.dedup.pairs import ROW_BASE, key_ids, pair_file, pair_files

PART = 500
CLUSTERED = dict(exact_search_rows=0, cluster_rows=50, group_rows=1500, map_rows=1000)


def _cfg(out, **dedup):
    return PipelineConfig(name="t", output=str(out), dedup=DedupConfig(**dedup))


def _row(k):
    return int(k // ROW_BASE) * PART + int(k % ROW_BASE)


def _stored(out) -> dict:
    """{(row i, row j): (similarity, kind)} from the pair files; asserts every pair is stored once, a < b."""
    got = {}
    for uri in pair_files(str(out)):
        t = fs.read_parquet(uri)
        assert t.schema.field("similarity").type == "float" and all(a < b for a, b in zip(t["a"].to_pylist(), t["b"].to_pylist()))
        for a, b, s, kind in zip(key_ids(t["a"]), key_ids(t["b"]), t["similarity"].to_pylist(), t["kind"].to_pylist()):
            pair = (min(_row(a), _row(b)), max(_row(a), _row(b)))
            assert pair not in got, f"pair {pair} stored twice"
            got[pair] = (s, kind)
    return got


def _expected(data, threshold=0.9):
    """Brute-force near pairs (from threshold - 1e-6: float32 rounding decides right at the
    threshold), exact copies mapped onto their lowest row (dedup searches those only), and the
    star edges of each sha256 group."""
    rep = representative(data)
    ref = brute_pairs(data, threshold - 1e-6)
    near = {(min(rep[i], rep[j]), max(rep[i], rep[j])): s for (i, j), s in ref.items() if rep[i] != rep[j]}
    exact = {(int(rep[i]), i) for i in range(len(rep)) if rep[i] != i}
    return near, exact


@pytest.fixture(scope="module")
def data():
    return synthetic(3000, d=64)


def _check(stored, near, exact, data):
    for (i, j), (s, kind) in stored.items():
        if kind == "exact":
            assert (i, j) in exact and s == 1.0
        else:  # every stored near pair is a real one, with its fp32 cosine
            assert (i, j) in near and abs(s - near[(i, j)]) < 1e-5, ((i, j), s)
    assert {p for p, (_, k) in stored.items() if k == "exact"} == exact
    got = {p for p, (_, k) in stored.items() if k == "near"}
    want = {p for p, s in near.items() if s >= 0.9 + 1e-6}
    return len(got & want) / len(want), got, want


def test_small_input_is_exact_all_pairs_search(tmp_path, data):
    out = tmp_path / "out"
    write_scored(str(out), data, PART)
    res = run_dedup(_cfg(out), str(out), progress=False)  # 3000 rows <= exact_search_rows: one group, all pairs
    near, exact = _expected(data)
    recall, got, want = _check(_stored(out), near, exact, data)
    assert res["groups"] == 1 and recall == 1.0 and len(want) >= 60 and len(exact) == 30
    planted = {(min(s, d), max(s, d)) for s, d in data["near"]}
    assert planted & set(data["exact"]) == set() and all(p in got for p in planted
                                                          if all(data["status"][list(p)] == "ok"))
    done = read_done(str(out))
    assert done["pairs"] == len(got) + len(exact) and done["candidate_threshold"] == 0.9


def test_clustered_search_finds_pairs_across_clusters(tmp_path, data, ray_local):
    out = tmp_path / "out"
    write_scored(str(out), data, PART)
    cfg = _cfg(out, **CLUSTERED)
    res = run_dedup(cfg, str(out), progress=False)
    assert res["clusters"] >= 30 and res["groups"] >= 3 and len(res["nodes"]) >= 1
    near, exact = _expected(data)
    recall, got, _ = _check(_stored(out), near, exact, data)
    assert recall >= 0.99, recall
    # planted near duplicates whose rows have different nearest clusters: found all the same
    d = cfg.dedup
    cl = kmeans.Assigner(search.load_plan(str(out)), d.assignments,
                         d.assign_radius * math.sqrt(2 - 2 * d.candidate_threshold), d.probe)(data["emb"])
    ok = data["status"] == "ok"
    straddle = [(min(s, t), max(s, t)) for s, t in data["near"] if ok[s] and ok[t] and cl[s, 0] != cl[t, 0]]
    assert len(straddle) >= 5 and all(p in got for p in straddle)


def test_rerun_skips_then_redoes_only_missing_groups(tmp_path, data, ray_local):
    out = tmp_path / "out"
    write_scored(str(out), data, PART)
    cfg = _cfg(out, **CLUSTERED)
    first = run_dedup(cfg, str(out), progress=False)
    before = _stored(out)
    assert run_dedup(cfg, str(out), progress=False)["skipped"]
    fs.delete(fs.join(str(out), "dedup", "_done.json"))  # as after a kill between two group commits
    fs.delete(pair_file(str(out), 1))
    again = run_dedup(cfg, str(out), progress=False)
    assert again["groups_reused"] == first["groups"] - 1 and _stored(out) == before
    # another candidate threshold: a new fingerprint, everything recomputed, fewer pairs
    higher = run_dedup(_cfg(out, **CLUSTERED, candidate_threshold=0.95), str(out), progress=False)
    assert higher["groups_reused"] == 0 and 0 < higher["near"] < first["near"]
    assert all(s >= 0.95 for s, k in _stored(out).values())


def test_indexed_assignment_agrees_with_flat_nearest_centroid():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((40, 32)) * 3
    x = centers[rng.integers(40, size=4000)] + rng.standard_normal((4000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cent = kmeans.fit_centroids(x, 100, seed=0, drop=0)  # in the embedding space itself
    assert len(cent["coarse"]) == 10 and len(cent["fine"]) == 100 and cent["cell_start"][-1] == 100
    f = cent["fine"]
    d2 = ((x[:, None, :] - f[None]) ** 2).sum(-1)
    flat = np.argsort(d2, axis=1)[:, :2]  # exact two nearest centroids
    got = kmeans.Assigner(cent, 2, 1.0, 8, flat=False)(x.astype(np.float16))  # the index: 8 of 10 cells scored per row
    assert (got[:, 0] == flat[:, 0]).mean() > 0.97 and (got == flat).all(1).mean() > 0.9
    assert (kmeans.Assigner(cent, 2, 1.0, 10, flat=False)(x)[:, 0] == flat[:, 0]).mean() > 0.97  # every cell
    exact = kmeans.Assigner(cent, 2, 1.0, 8)(x)  # 100 centroids: flat scoring of all, fp32 re-ranked
    assert exact.shape == (len(x), 2) and (exact == flat).all(1).mean() > 0.999
    # the boundary rule: a second cluster only within the radius of the c1 / c2 boundary
    one = kmeans.Assigner(cent, 4, 0.0, 10)(x)
    assert (one[:, 1:] == -1).all()
    bd = (np.take_along_axis(d2, flat[:, 1:2], 1) - np.take_along_axis(d2, flat[:, :1], 1))[:, 0] / 2 \
        / np.linalg.norm(f[flat[:, 0]] - f[flat[:, 1]], axis=1)  # distance of x to the c1/c2 bisector
    some = kmeans.Assigner(cent, 2, 0.05, 10)(x)
    agree = (some[:, 1] >= 0) == (bd <= 0.05)
    assert agree.mean() > 0.97


def test_fit_refits_a_giant_cluster_on_its_own_rows():
    """One centroid owning most rows (a diffuse region k-means left whole) is replaced by centroids
    fitted on its rows; the others stay as they were."""
    rng = np.random.default_rng(3)
    small = rng.standard_normal((19, 32)) * 4
    x = np.concatenate([small.repeat(5, 0) + 0.01 * rng.standard_normal((95, 32)), rng.standard_normal((905, 32))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    fine = np.concatenate([x[:95:5], x[95:].mean(0, keepdims=True)]).astype(np.float32)  # 20: 19 small + 1 giant
    out = kmeans._split_large(x, fine, seed=0)
    mean = len(x) / len(fine)
    giant = int((np.argmax(x @ fine.T - (fine ** 2).sum(1) / 2, axis=1) == 19).sum())  # ~905 rows
    assert giant > kmeans.SPLIT_LARGE * mean and len(out) == 19 + math.ceil(giant / mean)
    assert np.array_equal(out[:19], fine[:19])  # untouched
    near = np.argmax(x @ out.T - (out ** 2).sum(1) / 2, axis=1)
    assert np.bincount(near, minlength=len(out))[19:].max() < 905 / 4
    assert np.array_equal(kmeans._split_large(x[:95], fine[:19], seed=0), fine[:19])  # nothing to split
