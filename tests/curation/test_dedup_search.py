"""Dedup's search kernels and task plumbing: the hit scan against torch.nonzero, the codes cache
under dedup/assign/ against a fresh computation (stale, cut and tampered files), and the worker
recycling against the pids Ray really used."""

import io
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from scored_data import synthetic, write_scored

from _sigma import fs, manifest
from curation.config import DedupConfig, PipelineConfig
from curation.dedup import FRESH_WORKER_BYTES, POOL_ENV, _Exec, kernels, run_dedup, search, search_placement
from curation.dedup.pairs import key_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,threshold,density", [((300, 5000), 0.8, 0.3), ((64, 70), 0.05, 1.0),
                                                     ((1000, 900), 0.9, 0.01), ((10, 10), -0.2, 1.0),
                                                     ((5, 7), 0.5, 0.0)])
def test_hits_are_exactly_torch_nonzero(dtype, shape, threshold, density):
    """The row-max + int16 scan finds the same entries as torch.nonzero(sims >= t) in the same
    dtype: sparse and dense hits, -inf (masked) entries, a threshold at or below zero."""
    g = torch.Generator().manual_seed(int(threshold * 100) + shape[0])
    sims = torch.rand(*shape, generator=g) * 2 - 1
    rows = torch.rand(shape[0], generator=g) < density  # rows that may hold hits
    sims[~rows] = sims[~rows].clamp(max=threshold - 0.05)
    sims = sims.to(dtype)
    sims[0, : shape[1] // 2] = float("-inf")
    i, j = kernels.hits(sims, threshold)
    ri, rj = torch.nonzero(sims >= threshold, as_tuple=True)
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ri.tolist(), rj.tolist()))
    assert i.dtype == j.dtype == torch.int64


def _route_all(out, plan, parts):
    small = {k: plan[k] for k in ("groups", "mode", "plan_id", "assignments", "clusters", "code_dims")}
    small["dim"] = plan["dim"]
    return search.route(parts, out=out, plan=small, wave=tuple(range(plan["groups"])), radius=plan["radius"],
                        probe=8)


def _same(a: list, b: list) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a[:-1], b[:-1]))


def test_codes_cache_is_used_only_when_it_checks_out(tmp_path):
    """route keeps each batch's codes, clusters and dense rows' embeddings in dedup/assign/; a
    later wave reads them instead of the embeddings. A cache whose cluster ids are out of range,
    whose rows are another batch's, or which is cut short is computed again, and the payloads are
    those of a fresh computation."""
    data = synthetic(3000, d=64)
    out = str(tmp_path / "out")
    write_scored(out, data, 500)
    cfg = PipelineConfig(name="t", output=out, dedup=DedupConfig(exact_search_rows=0, cluster_rows=50,
                                                                task_memory_mb=1, dense_candidates=0.05))
    run_dedup(cfg, out, progress=False)  # in-process (no Ray): leaves plan.npz / plan.json
    plan = fs.read_json(search.plan_json(out))
    assert plan["mode"] == "clusters" and plan["dense_clusters"] > 0
    parts = manifest.list_parts(out)[:2]
    fresh = _route_all(out, plan, parts)
    uri = search.batch_uri(out, plan["plan_id"], parts[0])
    with np.load(io.BytesIO(fs.read_bytes(uri))) as z:
        cache = {k: z[k] for k in z.files}
    assert len(cache["dense_idx"]) and cache["dense_emb"].shape == (len(cache["dense_idx"]), 64)
    # the dense rows' embeddings are those the parts hold for their keys
    keys, emb = manifest.read_embeddings(out, parts)
    row = {int(k): i for i, k in enumerate(key_ids(pa.array(keys.tolist())))}
    want = emb[[row[int(k)] for k in cache["ids"][cache["dense_idx"]]]]
    assert np.array_equal(cache["dense_emb"], want)
    assert _same(_route_all(out, plan, parts), fresh)  # from the cache

    def tampered(**change):
        buf = io.BytesIO()
        np.savez(buf, **dict(cache, **change))
        return buf.getvalue()

    bad_cl = cache["cl"].copy()
    bad_cl[0, 0] = plan["clusters"] + 7
    for blob in (tampered(cl=bad_cl), tampered(ids=cache["ids"] + 1), tampered(dense_idx=cache["dense_idx"][::-1]),
                 fs.read_bytes(uri)[:-100]):
        fs.write_bytes(uri, blob)
        assert _same(_route_all(out, plan, parts), fresh)
        with np.load(io.BytesIO(fs.read_bytes(uri))) as z:  # and the cache is whole again
            assert np.array_equal(z["cl"], cache["cl"]) and np.array_equal(z["ids"], cache["ids"])


def test_search_tasks_get_fresh_workers_of_their_own(ray_local):
    """Search tasks (max_calls=1, their own pool) each run in a worker of their own that never ran
    another dedup task, with the oneDNN cache capped; other tasks share workers up to max_calls."""
    ex = _Exec()
    pool = [ex.submit(os.getpid, max_calls=1, pool="search") for _ in range(6)]
    shared = [ex.submit(os.getpid) for _ in range(12)]
    pool, shared = ex.get(pool), ex.get(shared)
    assert len(set(pool)) == 6 and not set(pool) & set(shared)
    assert max(shared.count(p) for p in set(shared)) <= 4
    env = ex.get(ex.submit(os.getenv, "ONEDNN_PRIMITIVE_CACHE_CAPACITY", max_calls=1, pool="search"))
    assert env == POOL_ENV["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]


def test_only_large_groups_pay_for_a_fresh_worker(ray_local):
    """A fresh worker costs seconds (torch import); what a worker keeps grows with the group, so only
    groups of FRESH_WORKER_BYTES or more get one. Below that budget, workers are not recycled."""
    assert search_placement(FRESH_WORKER_BYTES) == {"max_calls": 1, "pool": "search"}
    assert search_placement(FRESH_WORKER_BYTES - 1) == {}
    ex = _Exec(recycle=False)
    pids = ex.get([ex.submit(os.getpid) for _ in range(12)])
    assert len(set(pids)) < 12  # workers reused (recycle=True: at most 4 tasks each, tested above)
