"""Dedup stage: candidate duplicate pairs over the whole run, resolved later by select.

Writes `<out>/dedup/pairs/*.parquet` and, last, `<out>/dedup/_done.json` (pairs.py); never the
manifest, so select can apply any threshold >= dedup.candidate_threshold and any rank rule without
a new similarity search. The driver coordinates (footers, object refs, small summaries); workers
read parts and embeddings, compute and write:

1. fingerprint: the dedup config + every part's score fingerprint; a `_done.json` holding it -> skip.
2. plan (`plan.json`, `plan.npz`): up to `exact_search_rows` rows, one search group with exact
   all-pairs search. Else tasks sample embeddings per batch of parts, one task draws a random code
   basis (dedup.code_dims, codes.py) and fits spherical k-means centroids on the codes with scikit-learn,
   chooses the code threshold and the clusters per row A from the recall target (kmeans.py), and
   packs the clusters into G search groups by estimated cost.
3. route, in waves of groups that fit half the object store: one task per batch of parts reads
   key/status/sha256 + embeddings of the status-ok rows, encodes and assigns them (once per plan,
   kept in `assign/` with the embeddings of rows in dense clusters, so that later waves read no
   part's embeddings) and returns G payloads as object refs (num_returns=G+1), empty outside the
   wave. Exact rows go to group hash(sha256) % G (the distributed group-by), near rows (their
   codes; their embeddings too for dense clusters) to the groups owning their clusters.
4. search: one task per group finds the star edges of its sha groups and the candidate pairs within
   its clusters (code cosine >= the code threshold, exact-copy representatives only), writes them
   to `cand/` and then `pairs/part-GGGGG.parquet` (exact pairs). A killed run keeps the groups it
   finished (their files name the plan they belong to).
5. verify (verify.py): the candidates against the full embeddings (a join over the parts); the fp32
   pairs at >= candidate_threshold go to `pairs/part-<G + v>.parquet`.
6. recall: a seeded sample of rows searched exactly against all rows (recall.py); the summary
   carries the recall per cosine band; below dedup.min_recall the stage fails (ConfigError).
7. `_done.json`, written last.

Memory: each task holds at most dedup.task_memory_mb beyond its interpreter (route_rows,
group_rows below) and asks Ray for that much `memory`, so concurrency follows from the node's memory.
Search tasks of large groups run in fresh workers of their own (one task each) and the others in
workers recycled after 4 tasks (_Exec.submit: what a worker keeps after its tasks, measured).
"""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor

from _sigma import faults, fs, manifest
from _sigma.config import ConfigError, fingerprint
from curation.dedup import kmeans, recall, search, verify
from curation.dedup.pairs import (dedup_dir, done_uri, pair_file, pair_file_meta, pairs_dir, read_done)

__all__ = ["run_dedup", "dedup_fingerprint", "read_done"]


def _footers(out: str, parts: list[int], fn):
    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(lambda p: fn(out, p), parts))


def dedup_fingerprint(cfg, out: str, parts: list[int] | None = None) -> str:
    """What the pairs depend on: the dedup config and the score fingerprint of every part (footers)."""
    out = fs.normalize(out)
    parts = manifest.list_parts(out) if parts is None else parts
    scores = _footers(out, parts, lambda o, p: manifest.part_fingerprints(o, p).get("score"))
    # settings that change neither the plan nor the pairs (memory, the recall check) stay out
    d = {k: v for k, v in dataclasses.asdict(cfg.dedup).items() if k not in ("task_memory_mb", "min_recall", "recall_sample")}
    return fingerprint({"dedup": d, "score": [[p, s] for p, s in zip(parts, scores)]})


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


def _trimmed(fn, *args, **kwargs):
    """fn(*args, **kwargs), then the freed heap goes back to the OS: Ray reuses a worker for many
    tasks, and glibc keeps what a task freed (measured: an idle dedup worker held 3 GB after its
    search tasks). The result is returned (serialised) first by Ray, so it is not freed here."""
    try:
        return fn(*args, **kwargs)
    finally:
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc
            pass


# oneDNN (torch's bf16 matmul on CPU) keeps up to 1024 primitives, one per matmul shape, with their
# buffers: a search task meets hundreds of cluster sizes, and the cache held ~0.8 GB of its 2.3 GB
# peak (measured on the largest 1M group; 16 entries: 1.6 GB peak, 9 % slower)
POOL_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}
# a search group whose routed payload is at least this gets a fresh worker of its own: what a
# worker keeps grows with the group (~0.4 GB after a 1M-row group), while a fresh worker costs ~4 s
# to start on 2 cores (torch import), which a small group does not repay
FRESH_WORKER_BYTES = 64 * 2 ** 20


def search_placement(group_bytes: float) -> dict:
    """_Exec.submit options for one search task, from its estimated payload bytes."""
    return dict(max_calls=1, pool="search") if group_bytes >= FRESH_WORKER_BYTES else {}


class _Exec:
    """Ray tasks (SPREAD over the nodes) when Ray is up, else plain calls in this process."""

    def __init__(self, recycle: bool = True):
        import ray

        self.ray = ray if ray.is_initialized() else None
        self.recycle = recycle  # False: tasks too small for what a worker keeps to matter
        self._remotes: dict = {}

    def cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1)) if self.ray else 1

    def submit(self, fn, *args, num_returns: int = 1, num_cpus: float = 1, memory: int | None = None,
               max_calls: int = 4, pool: str | None = None, **kwargs):
        """fn(*args, **kwargs) as a Ray task. Memory (measured, issue 19): a Ray worker keeps much of
        what its tasks freed (~0.4 GB anonymous after each search task, even after malloc_trim) and
        every object-store page it touched counts in its RSS, so workers are recycled after
        max_calls tasks; `pool` gives tasks workers of their own (a runtime_env of their own is a
        separate worker pool in Ray), so a search task never starts in a worker that routed."""
        if self.ray is None:
            return fn(*args, **kwargs)
        if memory:  # never more than a node has: such a task would wait forever
            memory = min(memory, int(self.ray.cluster_resources().get("memory", memory)))
        if not self.recycle:  # 0: Ray never recycles; no pool of their own either (a worker start each)
            max_calls, pool = 0, None
        # one RemoteFunction per (cpus, max_calls): Ray counts max_calls per function object, so a
        # fresh ray.remote() per task would never recycle a worker (measured, Ray 2.60)
        key = (num_cpus, max_calls)
        if key not in self._remotes:
            self._remotes[key] = self.ray.remote(num_cpus=num_cpus, max_retries=2, max_calls=max_calls)(_trimmed)
        remote = self._remotes[key].options(
            num_returns=num_returns, scheduling_strategy="SPREAD", name=getattr(fn, "__name__", "dedup"),
            **({"memory": memory} if memory else {}),
            **({"runtime_env": {"env_vars": {"SIGMA_DEDUP_POOL": pool, **POOL_ENV}}} if pool else {}))
        return remote.remote(fn, *args, **kwargs)

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


# --- memory budget (issue 19 item 3) -------------------------------------------------------------
# A task's peak RSS = BASE_MB (interpreter, numpy, torch, scikit-learn, pyarrow, the Ray worker:
# importing torch alone takes ~0.7 GB, half of it shared library pages) + what it holds, which the
# sizes below keep within dedup.task_memory_mb (benchmarks/scale_bench.py measures both).
BASE_MB = 1000


def task_request(d) -> int:
    """Bytes of Ray's `memory` resource each dedup task asks for: concurrency = node memory / this."""
    return int((BASE_MB + d.task_memory_mb) * 2 ** 20)


def route_rows(d, dim: int, assignments: int, code_dims: int | None = None, routed: float | None = None,
               dense: float | None = None) -> int:
    """Rows per routing task. It holds its rows' embeddings (fp16, 2D bytes; encoded in chunks),
    their codes and clusters (2d' + 4A) and the payloads, each twice (built, then serialised):
    per routed copy its code and row data (2d' + SEARCH_ROW_BYTES + 5A), per copy routed to a
    dense cluster its embedding too (2D). `routed` / `dense`: copies per row estimated by the plan
    (x 1.25: a sample's estimate, and batches differ); without them, every row A times, all dense.
    Exact mode (code_dims >= dim): the embeddings are the codes, every copy brings one."""
    code_dims = dim if code_dims is None else code_dims
    a = assignments
    if code_dims >= dim:
        per_row = 2 * dim + 2 * a * (2 * dim + search.SEARCH_ROW_BYTES)
    else:
        r = a if routed is None else min(a, 1.25 * routed)
        f = a if dense is None else min(r, 1.25 * dense)
        per_row = 2 * dim + 2 * code_dims + 4 * a + 2 * (r * (2 * code_dims + search.SEARCH_ROW_BYTES + 5 * a) + f * 2 * dim)
    return max(1000, int(d.task_memory_mb * 2 ** 20 / per_row))


def group_rows(d, dim: int) -> int:
    """Routed rows per search task: their fp16 embeddings (D x 2 bytes) take 60 % of the budget; one
    cluster at a time (gathered fp16, fp32 and bf16 copies, the score block) the rest."""
    return max(1000, int(0.6 * d.task_memory_mb * 2 ** 20 / (dim * 2)))


def waves(group_bytes: list[float], store_bytes: float) -> list[tuple]:
    """Search groups in consecutive waves whose routed payloads (codes + home embeddings, or the
    embeddings in exact mode) fill at most half the object store (routing runs once per wave; the
    codes and clusters are computed in the first)."""
    out, cur, size = [], [], 0.0
    for g, b in enumerate(group_bytes):
        if cur and size + b > 0.5 * store_bytes:
            out.append(tuple(cur))
            cur, size = [], 0.0
        cur.append(g)
        size += b
    return out + ([tuple(cur)] if cur else [])


def _make_plan(cfg, out: str, fp: str, batches: list[list[int]], n_rows: int, ex: _Exec) -> dict:
    d = cfg.dedup
    min_groups = 4 * ex.cpus()  # a few groups per core: the last ones to finish do not hold up the wave
    if not d.near or n_rows <= d.exact_search_rows:
        groups = 1 if n_rows <= d.exact_search_rows else max(min_groups, math.ceil(n_rows / group_rows(d, 768)))
        import uuid

        info = {"fingerprint": fp, "plan_id": uuid.uuid4().hex[:12], "mode": "exact", "clusters": 1 if d.near else 0,
                "groups": groups, "assignments": 1}
        fs.write_json(search.plan_json(out), info)
        return info
    # the fit holds its sample in fp32 (D x 4 bytes a row, for the calibration) and its codes with
    # scikit-learn's copies (~4 x d' x 4); centroids need SAMPLE_PER_CLUSTER sample rows each, so the
    # sample caps the clusters (10M rows: ~6,000 clusters of ~1,600 rows instead of 40,000 of 250;
    # finer clusters need more per row: 36,700 of ~270 rows, fitted hierarchically, asked for A = 12
    # instead of 7, 2.2x the routed rows: benchmarks/RESULTS.md)
    cap = min(d.sample_rows, max(1000, int(d.task_memory_mb * 2 ** 20 / (768 * 4 + 16 * min(d.code_dims, 768)))))
    n_clusters = max(1, min(round(n_rows / d.cluster_rows), cap // kmeans.SAMPLE_PER_CLUSTER))
    frac = min(1.0, cap / n_rows, kmeans.SAMPLE_PER_CLUSTER * n_clusters / n_rows)
    samples = [ex.submit(search.sample_embeddings, b, out, frac, d.seed, memory=task_request(d)) for b in batches]
    # the fit runs alone (sampling done, routing waits for it): let its BLAS use a few cores
    threads = min(4, ex.cpus())
    # a fresh worker of its own (pool): the fit is the largest single task, and a shared worker would
    # add what its sampling and routing tasks left behind (measured: 2.07 GB at 1M rows)
    return ex.get(ex.submit(search.fit_plan, *samples, num_cpus=threads, memory=task_request(d), threads=threads,
                            max_calls=1, pool="fit",
                            out=out, fp=fp, n_clusters=n_clusters, min_groups=min_groups, total_rows=n_rows,
                            max_assignments=d.max_assignments, probe=d.probe, recall_cosine=d.recall_cosine,
                            recall_target=d.recall_target, threshold=d.candidate_threshold,
                            code_cosine=d.code_cosine, code_dims=d.code_dims, dense_candidates=d.dense_candidates, group_bytes=0.6 * d.task_memory_mb * 2 ** 20, seed=d.seed))


def _radius(d) -> float:
    """The lossless boundary margin: |x - y| of two unit vectors at the candidate threshold."""
    return kmeans.boundary_radius(d.candidate_threshold)


def _current_plan(out: str, fp: str) -> dict | None:
    try:
        info = fs.read_json(search.plan_json(out))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if info.get("fingerprint") != fp or (info.get("mode") == "clusters" and not fs.exists(search.plan_npz(out))):
        return None
    return info


def _measure_recall(cfg, out: str, parts: list[int], ok_rows: list[int], batches: list[list[int]], ex: _Exec) -> dict:
    """Exact search of a seeded sample of rows against all rows, in tasks; the recall of the stored
    pairs on it (recall.py). The driver holds the sample's positions and the counts only."""
    d = cfg.dedup
    picks = recall.choose_sample(ok_rows, d.recall_sample, d.seed)
    by_part = dict(zip(parts, picks))
    mem = task_request(d)
    got = [ex.submit(recall.sample_rows, b, [by_part[p] for p in b], out, memory=mem) for b in batches
           if any(len(by_part[p]) for p in b)]
    if not got:
        return recall.measure(out=out, sample_size=0, drawn=0, cosine=d.recall_cosine)
    sample = ex.submit(recall.merge_samples, *got, memory=mem)
    truths = [ex.submit(recall.exact_neighbours, b, sample, out=out, threshold=d.candidate_threshold, memory=mem)
              for b in batches]
    size = ex.submit(lambda s: (len(s["ids"]), s["drawn"]), sample)
    n, drawn = ex.get(size)
    return ex.get(ex.submit(recall.measure, *truths, out=out, sample_size=n, drawn=drawn, cosine=d.recall_cosine,
                            memory=mem))


def _check_recall(d, res: dict, plan: dict) -> None:
    lo, hi = res["interval"]
    if res["pairs"] and hi < d.min_recall:
        raise ConfigError(
            f"dedup: measured recall {res['recall']:.4f} (95 % interval {lo:.4f}-{hi:.4f}, {res['found']} of "
            f"{res['pairs']} sampled pairs at cosine >= {d.recall_cosine}) is below dedup.min_recall "
            f"{d.min_recall}: raise dedup.recall_target (this run chose {plan.get('assignments')} clusters per row) "
            f"or dedup.max_assignments ({d.max_assignments}), or set dedup.min_recall lower; details in "
            f"dedup/recall.json")


def _verify(cfg, out: str, plan: dict, meta: dict, parts: list[int], ok_rows: list[int], n_cand: int, ex: _Exec,
            progress: bool) -> dict:
    """The candidate pairs of every search group against the full embeddings (verify.py): fetch
    tasks per batch of parts, then V bucket tasks that write pair files G .. G + V - 1. A bucket
    file of this plan is kept by a resumed run (V follows from the candidate count, fixed per plan)."""
    from tqdm import tqdm

    d, n_groups = cfg.dedup, int(plan["groups"])
    dim = int(plan.get("dim", 768))
    v = verify.n_buckets(n_cand, dim, d.task_memory_mb, ex.cpus())
    metas = _footers(out, [n_groups + k for k in range(v)], lambda o, g: pair_file_meta(pair_file(o, g)))
    done = {k: m for k, m in enumerate(metas) if m.get("plan_id") == plan["plan_id"] and m.get("fingerprint") ==
            meta["fingerprint"]}
    todo = [k for k in range(v) if k not in done]
    res = {"buckets": v, "near": sum(m.get("near", 0) for m in done.values()), "missing": 0}
    if not todo:
        return res
    mem = task_request(d)
    fetched = [ex.submit(verify.fetch, b, num_returns=v + 1, memory=mem, out=out, plan_id=plan["plan_id"],
                         n_groups=n_groups, buckets=v) for b in _batches(parts, ok_rows, route_rows(d, dim, 1))]
    handles = [ex.submit(verify.verify_bucket, k, *[f[k] for f in fetched], out=out, index=n_groups + k,
                         threshold=d.candidate_threshold, meta=meta, memory=mem) for k in todo]
    del fetched
    for r in tqdm(ex.as_completed(handles), total=len(handles), desc="dedup verify", unit="bucket",
                  disable=not progress, mininterval=1.0):
        res["near"] += r["near"]
        res["missing"] += r["missing"]
        faults.after_commit("dedup")
    return res


def run_dedup(cfg, out: str, progress: bool = True) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    out, d = fs.normalize(out), cfg.dedup
    parts = manifest.list_parts(out)
    fp = dedup_fingerprint(cfg, out, parts)
    done = read_done(out)
    if done and done.get("fingerprint") == fp:
        return {"skipped": True, **{k: done.get(k) for k in ("rows", "exact", "near", "clusters", "groups", "recall")}}
    fs.delete(done_uri(out))  # select refuses from here until this run is finished
    ok_rows = _footers(out, parts, lambda o, p: manifest.part_summary(o, p).get("status", {}).get("ok", 0))
    n_rows = sum(ok_rows)
    ex = _Exec(recycle=d.task_memory_mb * 2 ** 20 >= FRESH_WORKER_BYTES)
    t_plan = time.time()
    plan = _current_plan(out, fp)
    if plan is None:
        fs.delete_dir(pairs_dir(out))  # pairs of another plan must not mix with this one's
        for tmp in ("assign", "cand"):
            fs.delete_dir(fs.join(dedup_dir(out), tmp))
        plan = _make_plan(cfg, out, fp, _batches(parts, ok_rows, route_rows(d, 768, 1)), n_rows, ex)
    n_groups, meta = int(plan["groups"]), {"fingerprint": fp, "plan_id": plan["plan_id"]}
    dim, a = int(plan.get("dim", 768)), int(plan.get("assignments", 1))
    coded = plan["mode"] == "clusters" and d.near  # codes + candidates, verified on the embeddings
    code_dims = int(plan.get("code_dims", dim)) if coded else dim
    radius = float(plan.get("radius", _radius(d)))
    per_row = {"routed": plan["routed_rows_est"] / max(n_rows, 1), "dense": plan["dense_rows_est"] / max(n_rows, 1)} \
        if "dense_rows_est" in plan else {}
    batches = _batches(parts, ok_rows, route_rows(d, dim, a, code_dims, **per_row))
    metas = _footers(out, list(range(n_groups)), lambda o, g: pair_file_meta(pair_file(o, g)))
    finished = {g: m for g, m in enumerate(metas) if m.get("plan_id") == plan["plan_id"] and m.get("fingerprint") == fp}
    if coded:  # a group is finished with its candidates on disk
        have = _footers(out, sorted(finished), lambda o, g: verify.candidates_ok(verify.cand_uri(o, plan["plan_id"], g)))
        finished = {g: finished[g] for g, h in zip(sorted(finished), have) if h}
    todo = [g for g in range(n_groups) if g not in finished]
    store = ex.ray.cluster_resources().get("object_store_memory", math.inf) if ex.ray else math.inf
    est = plan.get("group_bytes_est") or [math.ceil(n_rows / n_groups) * dim * 2] * n_groups
    plan_waves = waves([est[g] for g in todo], store)
    plan_waves = [tuple(todo[i] for i in w) for w in plan_waves]
    t_search = time.time()
    results, stats = dict(finished), []
    mem = task_request(d)
    code_threshold = float(plan["code_threshold"]) if coded else None
    bar = tqdm(total=len(todo), desc="dedup search", unit="group", disable=not progress, mininterval=1.0)
    for wave in plan_waves if (d.exact or d.near) else []:
        kw = dict(out=out, plan={"groups": n_groups, "mode": plan["mode"], "plan_id": plan["plan_id"],
                                 "assignments": a, "clusters": plan.get("clusters"), "dim": dim,
                                 "code_dims": code_dims}, wave=wave, exact=d.exact, near=d.near, radius=radius,
                  probe=d.probe)
        routed = [ex.submit(search.route, b, num_returns=n_groups + 1, memory=mem, **kw) for b in batches]
        handles = [ex.submit(_search, g, *[r[g] for r in routed], out=out, threshold=d.candidate_threshold,
                             block=d.block_size, meta=meta, memory_mb=d.task_memory_mb,
                             code_threshold=code_threshold, memory=mem, **search_placement(est[g])) for g in wave]
        stats += [ex.get(r[-1]) for r in routed]
        del routed  # the search tasks hold what they still need
        for res in ex.as_completed(handles):
            results[res["group"]] = res
            bar.update(1)
            faults.after_commit("dedup")
    bar.close()
    t_verify = time.time()
    verified = _verify(cfg, out, plan, meta, parts, ok_rows, sum(r.get("candidates", 0) for r in results.values()),
                       ex, progress) if coded else {}
    t_recall = time.time()
    rec = _measure_recall(cfg, out, parts, ok_rows, _batches(parts, ok_rows, route_rows(d, dim, 1)), ex) \
        if d.near and d.recall_sample and n_rows else None
    summary = {"fingerprint": fp, "plan_id": plan["plan_id"], "mode": plan["mode"], "rows": n_rows,
               "near_rows": sum(s["near_rows"] for s in stats[:len(batches)]) if stats else None,
               "routed_rows": sum(s["routed"] for s in stats) if stats else None,
               "pairs": sum(r.get("exact", 0) + r.get("near", 0) for r in results.values()) + verified.get("near", 0),
               "exact": sum(r.get("exact", 0) for r in results.values()),
               "near": sum(r.get("near", 0) for r in results.values()) + verified.get("near", 0),
               "candidate_threshold": d.candidate_threshold, "clusters": plan.get("clusters"), "groups": n_groups,
               "assignments": a, "waves": len(plan_waves), "groups_reused": len(finished),
               "recall": rec, "seconds": round(time.time() - t0, 2),
               "candidates": sum(r.get("candidates", 0) for r in results.values()) if coded else None,
               "code_dims": code_dims if coded else None, "code_threshold": code_threshold,
               "plan_seconds": round(t_search - t_plan, 2), "search_seconds": round(t_verify - t_search, 2),
               "verify_seconds": round(t_recall - t_verify, 2), "verify_tasks": verified.get("buckets"),
               "verify_missing": verified.get("missing"),
               "recall_seconds": round(time.time() - t_recall, 2),
               "memory": {"task_memory_mb": d.task_memory_mb, "task_request_mb": mem // 2 ** 20,
                          "route_rows": route_rows(d, dim, a, code_dims, **per_row), "group_rows": group_rows(d, code_dims)},
               "fit": {k: plan.get(k) for k in ("sample_rows", "mean_assignments", "largest_cluster_est", "fit_seconds",
                                                 "calibration", "routed_rows_est")},
               "group_seconds_max": max((r.get("seconds", 0) for r in results.values()), default=0),
               "largest_cluster": max((r.get("largest_cluster", 0) for r in results.values()), default=0)}
    if rec is not None and d.min_recall:
        try:
            _check_recall(d, rec, plan)
        except ConfigError:
            fs.write_json(fs.join(dedup_dir(out), "recall.json"), summary)
            raise
    fs.write_json(done_uri(out), summary)
    faults.after_commit("dedup")
    # codes and clusters (~300 bytes a row) only serve a resumed search; the candidate files (16 bytes
    # a candidate) stay: a later rerun that redoes one search group verifies the buckets it lacks
    fs.delete_dir(fs.join(dedup_dir(out), "assign"))
    nodes: dict = {}
    for r in results.values():
        if r.get("node"):
            nodes[r["node"]] = nodes.get(r["node"], 0) + 1
    keep = ("rows", "exact", "near", "clusters", "groups", "groups_reused", "routed_rows", "assignments", "waves",
            "candidates", "code_dims", "code_threshold", "plan_seconds", "search_seconds", "verify_seconds",
            "recall_seconds", "group_seconds_max", "recall", "memory", "fit")
    return {k: summary[k] for k in keep} | {"nodes": nodes}
