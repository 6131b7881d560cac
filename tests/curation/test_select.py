"""Select: the criteria, duplicate resolution (greedy in rank order among eligible rows, no
chaining), the invariants against brute-force cosines, and the dedup gate."""
import numpy as np
import pyarrow as pa
import pytest
from scored_data import brute_pairs, representative, synthetic, write_scored

from _sigma import fs, manifest
from _sigma.config import ConfigError
from curation.config import DedupConfig, PipelineConfig, SelectConfig
from curation.dedup import dedup_fingerprint, run_dedup
from curation.dedup.pairs import done_uri, key_ids, pair_files, write_pairs
from curation.dedup.resolve import NEAR, greedy
from curation.select import run_select, select_table


def _cfg(out, **select):
    return PipelineConfig(name="t", output=str(out), select=SelectConfig(**{"min_side": 0, **select}))


def test_thresholds_and_reasons():
    t = pa.table({
        "key": ["a", "b", "c", "d", "e", "f", "g"],
        "status": ["ok", "ok", "ok", "ok", "failed_download", "ok", "ok"],
        "width": [2000, 500, 1024, 1024, None, 1100, None],
        "height": [1500, 2000, 4700, 1024, None, 1100, None],
        "aesthetic": [6.0, 7.0, 6.0, 4.0, None, 6.5, None],
        "duplicate_of": [None, None, None, None, None, "a", None],
    })
    out = select_table(t, SelectConfig(min_side=1024, max_aspect_ratio=4.5, aesthetic_min=5.0))
    assert out.column_names == ["key", "selected", "reject_reason"]
    assert out.column("selected").to_pylist() == [True, False, False, False, False, False, False]
    assert out.column("reject_reason").to_pylist() == [
        None, "too_small", "aspect_ratio", "low_aesthetic", "failed_download", "duplicate", "not_scored;low_aesthetic"]
    # b: h/w = 4.0 passes the ratio, fails min side; c: 4.59 > 4.5
    loose = select_table(t, SelectConfig(min_side=0, max_aspect_ratio=5.0, aesthetic_min=None, drop_duplicates=False))
    assert loose.column("selected").to_pylist() == [True, True, True, True, False, True, False]


def test_greedy_does_not_chain():
    # A ~ B, B ~ C, A !~ C; rank A < B < C (0 = best): B is dropped for A, C stays
    res = greedy(3, np.ones(3, bool), np.arange(3), (np.array([], int), np.array([], int)),
                 (np.array([0, 1]), np.array([1, 2]), np.array([0.96, 0.97], np.float32)))
    assert res["dup_of"].tolist() == [-1, 0, -1] and res["kind"].tolist() == [0, NEAR, 0]
    assert res["sim"][1] == np.float32(0.96) and res["groups"] == 1 and res["largest_group"] == 3
    # the same chain when A is ineligible: A never keeps B out, so B is kept and C dropped for B
    res = greedy(3, np.array([False, True, True]), np.arange(3), (np.array([], int), np.array([], int)),
                 (np.array([0, 1]), np.array([1, 2]), np.array([0.96, 0.97], np.float32)))
    assert res["dup_of"].tolist() == [1, -1, 1]  # A names the kept B (information), C is B's duplicate


def _hand_made(out, rows, pairs, cfg):
    """A scored output from rows (width, height, aesthetic) and stored pairs (i, j, sim, kind),
    with the dedup done marker of the current fingerprint."""
    n = len(rows)
    keys = [f"00000_{i:06d}" for i in range(n)]
    t = pa.table({"key": keys, "status": ["ok"] * n, "sha256": [None] * n,
                  "width": [r[0] for r in rows], "height": [r[1] for r in rows], "aesthetic": [r[2] for r in rows]})
    manifest.write_part(str(out), 0, t, "score", "s", keep={"download": "d"})
    a, b, s, k = zip(*pairs)
    write_pairs(str(out), 0, np.array(a), np.array(b), np.array(s), np.array(k) == "exact", {})
    fs.write_json(done_uri(str(out)), {"fingerprint": dedup_fingerprint(cfg, str(out))})
    return keys


def test_panorama_group_keeps_the_good_photos(tmp_path, ray_local):
    # the case: the best-ranked member of a group (a 6000x1000 panorama) fails select for
    # its aspect ratio; the photos similar to it must not vanish with it
    rows = [(6000, 1000, 7.0), (2000, 1500, 6.0), (1800, 1200, 6.0), (1600, 1200, 6.0), (1500, 1500, 6.0)]
    pairs = [(0, 1, 0.97, "near"), (0, 2, 0.96, "near"), (0, 3, 0.96, "near"), (1, 2, 0.93, "near"),
             (2, 3, 0.955, "near"), (1, 4, 1.0, "exact")]
    cfg = _cfg(tmp_path, dedup_threshold=0.95)
    keys = _hand_made(tmp_path, rows, pairs, cfg)
    run_select(cfg, str(tmp_path), progress=False)
    m = {r["key"]: r for r in manifest.read_manifest(str(tmp_path)).to_pylist()}
    pano, p1, p2, p3, copy = (m[k] for k in keys)
    assert p1["selected"] and p2["selected"]  # 1 ~ 2 at 0.93 is below the threshold
    assert (p3["duplicate_of"], p3["dup_kind"], p3["reject_reason"]) == (keys[2], "near", "duplicate")
    assert p3["dup_similarity"] == np.float32(0.955)
    assert pano["reject_reason"] == "aspect_ratio;duplicate" and pano["duplicate_of"] == keys[1]  # most similar kept
    assert (copy["duplicate_of"], copy["dup_kind"], copy["dup_similarity"]) == (keys[1], "exact", 1.0)
    # a lower threshold: 2 is dropped for 1, and 3 (similar to the dropped 2 only) comes back: no chaining
    lower = _cfg(tmp_path, dedup_threshold=0.92)
    run_select(lower, str(tmp_path), progress=False)
    m = {r["key"]: r for r in manifest.read_manifest(str(tmp_path)).to_pylist()}
    assert [m[k]["selected"] for k in keys] == [False, True, False, True, False]
    assert m[keys[2]]["duplicate_of"] == keys[1] and m[keys[3]]["duplicate_of"] is None


@pytest.fixture(scope="module")
def data():
    d = synthetic(3000, d=64, seed=5, n_near=150)
    rng = np.random.default_rng(0)
    bad = rng.choice(3000, 300, replace=False)
    d["height"][bad[:150]] = d["width"][bad[:150]] // 6  # panoramas: fail the aspect ratio
    d["width"][bad[150:]] = 300  # too small
    return d


def test_duplicates_point_at_selected_rows_and_rerun_needs_no_search(tmp_path, data, ray_local):
    out = str(tmp_path / "out")
    keys = write_scored(out, data, 500)
    cfg = _cfg(out, dedup_threshold=0.93, min_side=512)
    run_dedup(cfg, out, progress=False)
    run_select(cfg, out, progress=False)
    m = manifest.read_manifest(out).to_pylist()
    row = {k: i for i, k in enumerate(keys)}
    cos = brute_pairs(data, 0.9 - 1e-6)
    rep = representative(data)
    sel = {r["key"] for r in m if r["selected"]}
    dropped = [r for r in m if "duplicate" in (r["reject_reason"] or "")]
    assert len(dropped) >= 100
    for r in m:
        if r["duplicate_of"] is None:
            assert "duplicate" not in (r["reject_reason"] or "")
            continue
        assert r["duplicate_of"] in sel  # never a row that select rejected
        i, j = row[r["key"]], row[r["duplicate_of"]]
        if r["dup_kind"] == "exact":
            assert rep[i] == rep[j] and r["dup_similarity"] == 1.0
        else:  # the stored similarity = the two rows' cosine, at/above the threshold: distinct images never
            want = cos[(min(rep[i], j), max(rep[i], j))]
            assert abs(r["dup_similarity"] - want) < 1e-5 and r["dup_similarity"] >= np.float32(0.93)
    # what is selected is duplicate-free at the threshold (exact search at this size: nothing missed)
    sel_rows = {row[k] for k in sel}
    assert not [p for p, s in cos.items() if s >= 0.93 + 1e-6 and set(p) <= sel_rows]
    assert len({data["sha"][i] for i in sel_rows}) == len(sel_rows)
    n_dup = len(dropped)
    # a higher threshold: no similarity search (the embeddings are gone), fewer rows dropped
    pairs_before = {u: fs.info(u).mtime_ns for u in pair_files(out)}
    fs.delete_dir(fs.join(out, "embeddings"))
    res = run_select(_cfg(out, dedup_threshold=0.97, min_side=512), out, progress=False)
    m2 = manifest.read_manifest(out).to_pylist()
    n_dup2 = sum("duplicate" in (r["reject_reason"] or "") for r in m2)
    assert 0 < n_dup2 < n_dup and res["reject_reasons"]["duplicate"] == n_dup2
    assert {u: fs.info(u).mtime_ns for u in pair_files(out)} == pairs_before
    assert all(r["dup_similarity"] >= np.float32(0.97) for r in m2 if r["dup_kind"] == "near")


def test_select_refuses_until_dedup_finished(tmp_path, ray_local):
    out = str(tmp_path / "out")
    write_scored(out, synthetic(400, d=16, n_near=10, n_exact=5, n_bad=5), 200)
    cfg = _cfg(out)
    with pytest.raises(ConfigError, match="dedup has not run"):
        run_select(cfg, out, progress=False)
    assert not any("select" in manifest.part_fingerprints(out, p) for p in manifest.list_parts(out))
    run_dedup(cfg, out, progress=False)
    assert run_select(cfg, out, progress=False)["rows"] == 400
    other = PipelineConfig(name="t", output=out, dedup=DedupConfig(candidate_threshold=0.92),
                           select=SelectConfig(min_side=0))
    with pytest.raises(ConfigError, match="other scores or dedup settings"):
        run_select(other, out, progress=False)
    assert run_select(_cfg(out, drop_duplicates=False), out, progress=False)["rows"] == 400  # needs no dedup


def test_select_threshold_below_the_candidate_threshold_is_refused():
    with pytest.raises(ConfigError, match=r"select\.dedup_threshold \(0\.85\).*dedup\.candidate_threshold \(0\.9\)"):
        PipelineConfig(name="t", output="o", select=SelectConfig(dedup_threshold=0.85))
    PipelineConfig(name="t", output="o", dedup=DedupConfig(candidate_threshold=0.8), select=SelectConfig(dedup_threshold=0.85))
