"""Dedup stage: candidate duplicate pairs over the whole run, resolved later by select.

Writes `<out>/dedup/pairs/*.parquet` and, last, `<out>/dedup/_done.json` (pairs.py); never the
manifest, so select can apply any threshold >= dedup.candidate_threshold and any rank rule without
a new similarity search. The driver coordinates (footers, object refs, small summaries); workers
read parts and embeddings, compute and write:

1. fingerprint: the dedup config + every part's score fingerprint; a `_done.json` holding it -> skip.
2. plan (`plan.json`, `plan.npz`): up to `exact_search_rows` rows, one search group with exact
   all-pairs search. Else tasks sample embeddings per batch of parts, one task fits k-means
   centroids with scikit-learn (kmeans.py: all-but-the-top space, oversized clusters refitted)
   and packs the clusters into G search groups by estimated cost.
3. route: one task per batch of parts (~map_rows rows) reads key/status/sha256 + embeddings of
   the status-ok rows, assigns clusters and returns G payloads as object refs (num_returns=G+1).
   Exact rows go to group hash(sha256) % G (the distributed group-by), near rows to the groups
   owning their clusters.
4. search: one task per group finds the star edges of its sha groups and all near pairs within
   its clusters (exact-copy representatives only), writes `pairs/part-GGGGG.parquet`. A killed
   run keeps the groups it finished (their files name the plan they belong to).
5. `_done.json`, written last.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

from _sigma import faults, fs, manifest
from _sigma.config import fingerprint
from curation.dedup import kmeans, search
from curation.dedup.pairs import (done_uri, pair_file, pair_file_meta, pairs_dir, read_done)

__all__ = ["run_dedup", "dedup_fingerprint", "read_done"]


def _footers(out: str, parts: list[int], fn):
    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(lambda p: fn(out, p), parts))


def dedup_fingerprint(cfg, out: str, parts: list[int] | None = None) -> str:
    """What the pairs depend on: the dedup config and the score fingerprint of every part (footers)."""
    out = fs.normalize(out)
    parts = manifest.list_parts(out) if parts is None else parts
    scores = _footers(out, parts, lambda o, p: manifest.part_fingerprints(o, p).get("score"))
    return fingerprint({"dedup": cfg.dedup, "score": [[p, s] for p, s in zip(parts, scores)]})


def _batches(parts: list[int], rows: list[int], target: int) -> list[list[int]]:
    """Consecutive parts in batches of about `target` rows (parts without ok rows are skipped)."""
    out, cur, n = [], [], 0
    for p, r in zip(parts, rows):
        if not r:
            continue
        if cur and n + r > target:
            out.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += r
    return out + ([cur] if cur else [])


class _Exec:
    """Ray tasks (SPREAD over the nodes) when Ray is up, else plain calls in this process."""

    def __init__(self):
        import ray

        self.ray = ray if ray.is_initialized() else None

    def cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1)) if self.ray else 1

    def submit(self, fn, *args, num_returns: int = 1, num_cpus: float = 1, **kwargs):
        if self.ray is None:
            return fn(*args, **kwargs)
        remote = self.ray.remote(num_cpus=num_cpus, max_retries=2)(fn).options(num_returns=num_returns,
                                                                              scheduling_strategy="SPREAD")
        return remote.remote(*args, **kwargs)

    def get(self, x):
        return self.ray.get(x) if self.ray else x

    def as_completed(self, handles: list):
        """Results of submitted tasks as they finish."""
        if self.ray is None:
            yield from handles
            return
        pending = list(handles)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(ready[0])


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray
        return None


def _search(group, *payloads, **kwargs):
    return dict(search.search_group(group, *payloads, **kwargs), node=_node_id())


def _make_plan(cfg, out: str, fp: str, batches: list[list[int]], n_rows: int, ex: _Exec) -> dict:
    d = cfg.dedup
    min_groups = 2 * ex.cpus()
    if not d.near or n_rows <= d.exact_search_rows:
        groups = 1 if n_rows <= d.exact_search_rows else max(min_groups, math.ceil(n_rows / d.group_rows))
        import uuid

        info = {"fingerprint": fp, "plan_id": uuid.uuid4().hex[:12], "mode": "exact", "clusters": 1 if d.near else 0,
                "groups": groups}
        fs.write_json(search.plan_json(out), info)
        return info
    n_clusters = max(1, round(n_rows / d.cluster_rows))
    frac = min(1.0, d.sample_rows / n_rows, kmeans.SAMPLE_PER_CLUSTER * n_clusters / n_rows)
    samples = [ex.submit(search.sample_embeddings, b, out, frac, d.seed) for b in batches]
    # the fit runs alone (sampling done, routing waits for it): let its BLAS use a few cores
    threads = min(4, ex.cpus())
    return ex.get(ex.submit(search.fit_plan, *samples, num_cpus=threads, threads=threads, out=out, fp=fp,
                            n_clusters=n_clusters, min_groups=min_groups, total_rows=n_rows,
                            assignments=d.assignments, radius=_radius(d), probe=d.probe, group_rows=d.group_rows,
                            seed=d.seed))


def _radius(d) -> float:
    """assign_radius in units of the distance of two unit vectors at the candidate threshold."""
    return d.assign_radius * math.sqrt(max(0.0, 2 - 2 * d.candidate_threshold))


def _current_plan(out: str, fp: str) -> dict | None:
    try:
        info = fs.read_json(search.plan_json(out))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if info.get("fingerprint") != fp or (info.get("mode") == "clusters" and not fs.exists(search.plan_npz(out))):
        return None
    return info


def run_dedup(cfg, out: str, progress: bool = True) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    out, d = fs.normalize(out), cfg.dedup
    parts = manifest.list_parts(out)
    fp = dedup_fingerprint(cfg, out, parts)
    done = read_done(out)
    if done and done.get("fingerprint") == fp:
        return {"skipped": True, **{k: done.get(k) for k in ("rows", "exact", "near", "clusters", "groups")}}
    fs.delete(done_uri(out))  # select refuses from here until this run is finished
    ok_rows = _footers(out, parts, lambda o, p: manifest.part_summary(o, p).get("status", {}).get("ok", 0))
    batches = _batches(parts, ok_rows, d.map_rows)
    n_rows = sum(ok_rows)
    ex = _Exec()
    t_plan = time.time()
    plan = _current_plan(out, fp)
    if plan is None:
        fs.delete_dir(pairs_dir(out))  # pairs of another plan must not mix with this one's
        plan = _make_plan(cfg, out, fp, batches, n_rows, ex)
    n_groups, meta = int(plan["groups"]), {"fingerprint": fp, "plan_id": plan["plan_id"]}
    metas = _footers(out, list(range(n_groups)), lambda o, g: pair_file_meta(pair_file(o, g)))
    finished = {g: m for g, m in enumerate(metas) if m.get("plan_id") == plan["plan_id"] and m.get("fingerprint") == fp}
    todo = [g for g in range(n_groups) if g not in finished]
    t_search = time.time()
    results, stats = dict(finished), []
    if todo and (d.exact or d.near):
        kw = dict(out=out, plan={"groups": n_groups, "mode": plan["mode"]}, skip=tuple(finished), exact=d.exact,
                  near=d.near, assignments=d.assignments, radius=_radius(d), probe=d.probe)
        routed = [ex.submit(search.route, b, num_returns=n_groups + 1, **kw) for b in batches]
        handles = [ex.submit(_search, g, *[r[g] for r in routed], out=out, threshold=d.candidate_threshold,
                             block=d.block_size, meta=meta) for g in todo]
        stats = [ex.get(r[-1]) for r in routed]
        del routed  # the search tasks hold what they still need
        bar = tqdm(total=len(todo), desc="dedup search", unit="group", disable=not progress, mininterval=1.0)
        for res in ex.as_completed(handles):
            results[res["group"]] = res
            bar.update(1)
            faults.after_commit("dedup")
        bar.close()
    summary = {"fingerprint": fp, "plan_id": plan["plan_id"], "mode": plan["mode"], "rows": n_rows,
               "near_rows": sum(s["near_rows"] for s in stats) if stats else None,
               "routed_rows": sum(s["routed"] for s in stats) if stats else None,
               "pairs": sum(r.get("exact", 0) + r.get("near", 0) for r in results.values()),
               "exact": sum(r.get("exact", 0) for r in results.values()),
               "near": sum(r.get("near", 0) for r in results.values()),
               "candidate_threshold": d.candidate_threshold, "clusters": plan.get("clusters"), "groups": n_groups,
               "groups_reused": len(finished), "seconds": round(time.time() - t0, 2),
               "plan_seconds": round(t_search - t_plan, 2), "search_seconds": round(time.time() - t_search, 2),
               "fit": {k: plan.get(k) for k in ("sample_rows", "mean_assignments", "largest_cluster_est", "fit_seconds")},
               "group_seconds_max": max((r.get("seconds", 0) for r in results.values()), default=0)}
    fs.write_json(done_uri(out), summary)
    faults.after_commit("dedup")
    nodes: dict = {}
    for r in results.values():
        if r.get("node"):
            nodes[r["node"]] = nodes.get(r["node"], 0) + 1
    keep = ("rows", "exact", "near", "clusters", "groups", "groups_reused", "routed_rows", "plan_seconds",
            "search_seconds", "group_seconds_max", "fit")
    return {k: summary[k] for k in keep} | {"nodes": nodes}
