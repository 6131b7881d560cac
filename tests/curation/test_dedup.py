"""Dedup stage against an independent brute-force search (full fp32 similarity matrix)."""

import numpy as np
import pytest
from scored_data import brute_pairs, representative, synthetic, write_scored

from _sigma import fs
from curation.config import DedupConfig, PipelineConfig
from curation.dedup import codes, kmeans, read_done, run_dedup, search
from curation.dedup.pairs import ROW_BASE, key_ids, pair_file, pair_files

PART = 500
# tiny budget: several groups and batches; the code threshold keeps the whole band from 0.9 (the
# checks below want every pair at >= 0.9; the default keeps all at >= 0.95: test_dedup_recall.py)
CLUSTERED = dict(exact_search_rows=0, cluster_rows=50, task_memory_mb=1, code_cosine=0.9)


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
    assert done["recall"]["recall"] == 1.0 and done["recall"]["pairs"] > 0  # exact search: measured 1.0


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
    plan = fs.read_json(search.plan_json(str(out)))
    cent = search.load_plan(str(out))
    cl = kmeans.Assigner(cent, plan["assignments"], plan["radius"], d.probe)(codes.encode(data["emb"], cent.get("basis")))
    ok = data["status"] == "ok"
    straddle = [(min(s, t), max(s, t)) for s, t in data["near"] if ok[s] and ok[t] and cl[s, 0] != cl[t, 0]]
    assert len(straddle) >= 5 and all(p in got for p in straddle)


def test_code_search_verifies_candidates_on_the_embeddings(tmp_path, data, ray_local):
    """Routing and search on 24-d random codes of the 64-d rows: the candidates include pairs below the
    threshold, and what is stored is exactly the real pairs with their fp32 cosines (brute force)."""
    out = tmp_path / "out"
    write_scored(str(out), data, PART)
    res = run_dedup(_cfg(out, **CLUSTERED, code_dims=24, dense_candidates=1e9), str(out), progress=False)  # codes only
    assert res["code_dims"] == 24 and res["code_threshold"] < 0.9
    near, exact = _expected(data)
    recall, got, want = _check(_stored(out), near, exact, data)
    assert recall >= 0.99, recall
    assert res["candidates"] > res["near"] == len(got)  # verification rejected some candidates
    assert search.load_plan(str(out))["basis"].shape == (64, 24)
    assert not fs.exists(fs.join(str(out), "dedup", "assign"))  # the codes are scratch, removed once done


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
    cent = kmeans.fit_centroids(x, 100, seed=0)
    assert len(cent["coarse"]) == 10 and len(cent["fine"]) == 100 and cent["cell_start"][-1] == 100
    f = cent["fine"]
    assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5)  # spherical: unit centroids
    cos = x @ f.T
    flat = np.argsort(-cos, axis=1)[:, :2]  # exact two best centroids by cosine
    got = kmeans.Assigner(cent, 2, 2.0, 8, flat=False)(x.astype(np.float16))  # the index: 8 of 10 cells scored per row
    assert (got[:, 0] == flat[:, 0]).mean() > 0.97 and (got == flat).all(1).mean() > 0.9
    assert (kmeans.Assigner(cent, 2, 2.0, 10, flat=False)(x)[:, 0] == flat[:, 0]).mean() > 0.97  # every cell
    exact = kmeans.Assigner(cent, 2, 2.0, 8)(x)  # 100 centroids: flat scoring of all, fp32 re-ranked
    assert exact.shape == (len(x), 2) and (exact == flat).all(1).mean() > 0.999
    # the boundary rule: a second cluster only within the radius of the c1 / c2 bisector
    one = kmeans.Assigner(cent, 4, 0.0, 10)(x)
    assert (one[:, 1:] == -1).all()
    bd = (np.take_along_axis(cos, flat[:, :1], 1) - np.take_along_axis(cos, flat[:, 1:2], 1))[:, 0] \
        / np.linalg.norm(f[flat[:, 0]] - f[flat[:, 1]], axis=1)  # distance of x to the c1/c2 bisector
    some = kmeans.Assigner(cent, 2, 0.05, 10)(x)
    agree = (some[:, 1] >= 0) == (bd <= 0.05)
    assert agree.mean() > 0.97


def test_boundary_rule_is_lossless():
    """Pairs at cosine >= t share a cluster with the boundary rule at r(t) exactly when they share
    one among the plain top-A lists (the rule drops only clusters a partner cannot need)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 24))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cent = kmeans.fit_centroids(x, 60, seed=0)
    u = rng.standard_normal(x.shape).astype(np.float32)
    u -= (u * x).sum(1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = rng.uniform(0.9, 0.99, (len(x), 1)).astype(np.float32)
    y = c * x + np.sqrt(1 - c ** 2) * u
    shared = lambda a, b: ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any((1, 2))  # noqa: E731
    for a in (2, 3):
        plain = kmeans.Assigner(cent, a, 2.0, 8)  # radius 2: every top-A cluster kept
        rule = kmeans.Assigner(cent, a, kmeans.boundary_radius(0.9), 8)
        assert (rule(x) == -1).any()  # the rule does drop clusters
        assert np.array_equal(shared(plain(x), plain(y)), shared(rule(x), rule(y)))


def test_calibration_chooses_more_clusters_where_the_data_needs_them():
    """Isotropic rows need more clusters per row than a well-separated mixture for the same target,
    and the chosen count reaches the target on partners planted independently of the calibration."""
    rng = np.random.default_rng(2)
    d = 64
    iso = rng.standard_normal((6000, d))
    centers = rng.standard_normal((30, d)) * 3
    topic = centers[rng.integers(30, size=6000)] + rng.standard_normal((6000, d))
    chosen = {}
    for name, x in (("iso", iso), ("topic", topic)):
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        cent = kmeans.fit_centroids(x, 60, seed=0)
        cal = kmeans.calibrate(x, cent, 12, 8, 0.95, 0.99, threshold=0.9)  # no basis: codes = the rows
        chosen[name] = a = cal["assignments"]
        assert 0.85 <= cal["code"]["code_threshold"] <= 0.9 - 0.02  # the lowest pair at 0.9 minus the margin
        asg = kmeans.Assigner(cent, a, cal["radius"], 8)
        src = x[rng.integers(len(x), size=3000)]
        u = rng.standard_normal(src.shape).astype(np.float32)
        u -= (u * src).sum(1, keepdims=True) * src
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        part = 0.95 * src + np.sqrt(1 - 0.95 ** 2) * u
        hx, hy = asg(src), asg(part)
        found = ((hx[:, :, None] == hy[:, None, :]) & (hx[:, :, None] >= 0)).any((1, 2)).mean()
        assert found >= 0.98, (name, a, found)
    assert chosen["iso"] > chosen["topic"], chosen


def test_fit_refits_a_giant_cluster_on_its_own_rows():
    """One centroid owning most rows (a dense region k-means left whole) is replaced by centroids
    fitted on its rows; the others stay as they were."""
    rng = np.random.default_rng(3)
    small = rng.standard_normal((19, 32)) * 4
    big = rng.standard_normal(32) * 4
    x = np.concatenate([small.repeat(5, 0) + 0.01 * rng.standard_normal((95, 32)),
                        big + 1.5 * rng.standard_normal((905, 32))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    fine = np.concatenate([x[:95:5], kmeans._unit(x[95:].mean(0, keepdims=True))]).astype(np.float32)  # 19 small + 1 giant
    out = kmeans._split_large(x, fine, seed=0)
    mean = len(x) / len(fine)
    giant = int((np.argmax(x @ fine.T, axis=1) == 19).sum())  # ~905 rows
    assert giant > kmeans.SPLIT_LARGE * mean and len(out) == 19 + int(np.ceil(giant / mean))
    assert np.array_equal(out[:19], fine[:19])  # untouched
    near = np.argmax(x @ out.T, axis=1)
    assert np.bincount(near, minlength=len(out))[19:].max() < 905 / 4
    assert np.array_equal(kmeans._split_large(x[:95], fine[:19], seed=0), fine[:19])  # nothing to split


def test_a_truncated_candidate_file_makes_its_group_run_again(tmp_path, data, ray_local):
    """Candidate files are reused by a rerun only when whole (header shape x 16 bytes = their size):
    a truncated one is not trusted, its group is searched again and the stored pairs are the same."""
    from curation.dedup import verify

    out = tmp_path / "out"
    write_scored(str(out), data, PART)
    cfg = _cfg(out, **CLUSTERED, code_dims=24, dense_candidates=1e9)
    first = run_dedup(cfg, str(out), progress=False)
    before = _stored(out)
    plan_id = fs.read_json(search.plan_json(str(out)))["plan_id"]
    uri = verify.cand_uri(str(out), plan_id, 0)
    assert verify.candidates_ok(uri)
    raw = fs.read_bytes(uri)
    fs.write_bytes(uri, raw[:-8])  # truncated by half a pair
    assert not verify.candidates_ok(uri) and not verify.candidates_ok(uri + ".missing")
    fs.delete(fs.join(str(out), "dedup", "_done.json"))
    again = run_dedup(cfg, str(out), progress=False)
    assert again["groups_reused"] == first["groups"] - 1 and _stored(out) == before
    assert fs.read_bytes(uri) == raw and read_done(str(out))["verify_missing"] == 0
