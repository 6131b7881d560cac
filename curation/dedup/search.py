"""Dedup's worker functions (Ray tasks; plain functions, callable in-process too).

sample_embeddings  parts -> a random sample of their embeddings (for the centroid fit)
fit_plan           samples -> centroids + cluster -> group map, written to <out>/dedup/plan.*
route              parts -> one payload per search group: exact (id, sha) by sha hash, near
                   (id, sha, clusters, embedding fp16) to the groups owning the row's clusters
search_group       payloads of one group -> its exact pairs + near pairs within its clusters,
                   written to <out>/dedup/pairs/part-GGGGG.parquet

Similarities: candidates come from bf16 matmuls (inputs rounded to 8 significant bits: a dot
product of unit vectors is off by at most ~2^-8 + 2^-9 < 0.006), so every pair within MARGIN below the
threshold is recomputed in fp32 from the stored fp16 embeddings; the fp32 value decides and is stored.
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from _sigma import fs, manifest
from curation.dedup import kmeans
from curation.dedup.pairs import dedup_dir, key_ids, sha_words, write_pairs

MARGIN = 0.01  # > the bf16 error bound above
VERIFY_CHUNK = 1 << 16  # candidate pairs verified per fp32 gather (bounds memory on dense clusters)


def plan_npz(out: str) -> str:
    return fs.join(dedup_dir(out), "plan.npz")


def plan_json(out: str) -> str:
    return fs.join(dedup_dir(out), "plan.json")


def _part_rows(out: str, part: int, near: bool):
    """(ids, sha hi, sha lo, sha valid, emb fp16 (n, D) or None) of a part's status-ok rows (with
    an embedding when `near`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = manifest.read_part(out, part, ["key", "status", "sha256"])
    t = t.filter(pc.fill_null(pc.equal(t.column("status"), "ok"), False))
    emb = None
    if near:
        ekeys, e = manifest.read_part_embeddings(out, part)
        if len(ekeys):
            pos = pc.index_in(t.column("key"), value_set=pa.array(ekeys.tolist(), pa.string()))
            t = t.filter(pc.is_valid(pos))
            emb = e[pc.drop_null(pos).to_numpy()]
        else:
            t = t.slice(0, 0)
    sha = t.column("sha256") if "sha256" in t.column_names else pa.nulls(t.num_rows, pa.string())
    hi, lo, valid = sha_words(sha)
    return key_ids(t.column("key")), hi, lo, valid, emb


def sample_embeddings(parts: list[int], out: str, fraction: float, seed: int) -> np.ndarray:
    """A Bernoulli(fraction) sample of the parts' embeddings (fp16), reproducible per part."""
    chunks = []
    for p in parts:
        _, e = manifest.read_part_embeddings(out, p)
        if len(e):
            chunks.append(e[np.random.default_rng([seed, p]).random(len(e)) < fraction])
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float16)


def fit_plan(*samples: np.ndarray, out: str, fp: str, n_clusters: int, min_groups: int, total_rows: int,
             max_assignments: int, radius: float, probe: int, recall_cosine: float, recall_target: float,
             group_rows: int, seed: int, threads: int = 1) -> dict:
    """Fit the centroids on the samples, choose the clusters per row from the recall target
    (kmeans.calibrate), estimate cluster sizes from the sample's own assignment, pack clusters into
    search groups of at most ~group_rows routed rows; write plan.npz then plan.json (the latter
    marks it usable)."""
    t0 = time.time()
    import sklearn.cluster  # noqa: F401 - loads its OpenMP runtime first, so that the limit below reaches it
    from threadpoolctl import threadpool_limits

    x = np.concatenate([s for s in samples if len(s)]).astype(np.float32)
    with threadpool_limits(threads):  # workers run with OMP_NUM_THREADS=1; this task holds `threads` CPUs
        cent = kmeans.fit_centroids(x, n_clusters, seed)
    t_fit = time.time() - t0
    cal = kmeans.calibrate(x, cent, max_assignments, radius, probe, recall_cosine, recall_target, seed)
    a = cal["assignments"]
    cl = kmeans.Assigner(cent, a, radius, probe)(x)
    k = len(cent["fine"])
    rows = np.bincount(cl[cl >= 0], minlength=k) * (total_rows / len(x))  # estimated rows per cluster
    routed = rows.sum()
    # 1.25: the estimate is a sample's, and packing by cost leaves groups uneven in rows
    n_groups = int(max(1, min(k, max(min_groups, np.ceil(1.25 * routed / group_rows)))))
    group = kmeans.pack_groups(rows ** 2, n_groups)
    group_rows_est = np.bincount(group, weights=rows, minlength=n_groups)
    plan_id = uuid.uuid4().hex[:12]
    import io

    buf = io.BytesIO()
    np.savez(buf, cluster_group=group, **cent)
    fs.write_bytes(plan_npz(out), buf.getvalue())
    info = {"fingerprint": fp, "plan_id": plan_id, "mode": "clusters", "clusters": k, "coarse": len(cent["coarse"]),
            "groups": n_groups, "assignments": a, "calibration": cal, "sample_rows": len(x), "dim": int(x.shape[1]),
            "mean_assignments": round(float((cl >= 0).sum(1).mean()), 3), "routed_rows_est": int(routed),
            "group_rows_est": [int(r) for r in group_rows_est], "largest_cluster_est": int(rows.max()),
            "search_work_est": float((rows ** 2).sum()), "fit_seconds": round(t_fit, 2),
            "plan_seconds": round(time.time() - t0, 2)}
    fs.write_json(plan_json(out), info)
    return info


def load_plan(out: str) -> dict:
    with fs.open_input(plan_npz(out)) as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


def assign_uri(out: str, plan_id: str, first_part: int) -> str:
    return fs.join(dedup_dir(out), "assign", plan_id, f"batch-{first_part:05d}.npy")


def _assignments(parts: list[int], emb: np.ndarray, out: str, plan: dict, cent: dict, radius: float,
                 probe: int) -> np.ndarray:
    """(n, A) int32 clusters of the batch's rows: computed once per plan and kept in
    dedup/assign/<plan>/ (later waves and a resumed run read them instead of scoring again)."""
    import io

    uri = assign_uri(out, plan["plan_id"], parts[0])
    try:
        cl = np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False)
        if cl.shape[0] == len(emb):
            return cl
    except (FileNotFoundError, OSError, ValueError):
        pass
    cl = kmeans.Assigner(cent, int(plan["assignments"]), radius, probe)(emb)  # (n, A)
    buf = io.BytesIO()
    np.save(buf, cl)
    fs.write_bytes(uri, buf.getvalue())
    return cl


def route(parts: list[int], *, out: str, plan: dict, wave: tuple, exact: bool = True, near: bool = True,
          radius: float = 0.0, probe: int = 1) -> list:
    """Read the parts' status-ok rows and split them into one payload per search group of this
    `wave` (the others get empty payloads: the object store holds one wave at a time).

    Returns G payloads + a small stats dict (num_returns = G + 1). Exact payload: rows with a
    sha256, in group hash(sha) % G. Near payload: each row once per group that owns one of its
    clusters, with all its clusters (for the "lowest shared cluster reports the pair" rule) and
    `mine` (A,) marking the clusters of that group."""
    n_groups = int(plan["groups"])
    wanted = np.zeros(n_groups, bool)
    wanted[list(wave)] = True
    rows = [_part_rows(out, p, near) for p in parts]
    ids = np.concatenate([r[0] for r in rows])
    hi, lo, valid = (np.concatenate([r[i] for r in rows]) for i in (1, 2, 3))
    embs = [r[4] for r in rows if r[4] is not None and len(r[4])]
    emb = np.concatenate(embs) if embs else None
    del rows, embs
    payload = [{} for _ in range(n_groups)]
    if exact:
        g_of = (hi[valid] % np.uint64(n_groups)).astype(np.int64)
        order = np.argsort(g_of, kind="stable")
        x_ids, x_hi, x_lo = ids[valid][order], hi[valid][order], lo[valid][order]
        bounds = np.searchsorted(g_of[order], np.arange(n_groups + 1))
        for g in np.flatnonzero(wanted).tolist():
            sl = slice(bounds[g], bounds[g + 1])
            payload[g].update(x_ids=x_ids[sl], x_hi=x_hi[sl], x_lo=x_lo[sl])
    n_near = 0 if emb is None else len(emb)
    routed = 0
    if near and n_near:
        if plan["mode"] == "clusters":
            cent = load_plan(out)
            cl = _assignments(parts, emb, out, plan, cent, radius, probe)
            grp = np.where(cl >= 0, cent["cluster_group"][np.maximum(cl, 0)], -1)
            del cent
        else:  # one cluster (exact all-pairs search) in group 0
            cl = np.zeros((n_near, 1), np.int32)
            grp = np.zeros((n_near, 1), np.int64)
        r, s = np.nonzero((grp >= 0) & wanted[np.maximum(grp, 0)])
        key = np.unique(grp[r, s].astype(np.int64) * n_near + r)  # each (group, row) once, by group
        gs, rs = key // n_near, key % n_near
        bounds = np.searchsorted(gs, np.arange(n_groups + 1))
        for g in np.flatnonzero(wanted).tolist():
            idx = rs[bounds[g]:bounds[g + 1]]
            payload[g].update(ids=ids[idx], hi=hi[idx], lo=lo[idx], valid=valid[idx], cl=cl[idx],
                              mine=grp[idx] == g, emb=emb[idx])
        routed = int(len(rs))
    stats = {"rows": int(len(ids)), "near_rows": int(n_near), "routed": routed}
    return [*payload, stats]


def _cat(payloads: list[dict], name: str, dtype, shape=()) -> np.ndarray:
    xs = [p[name] for p in payloads if name in p and len(p[name])]
    return np.concatenate(xs) if xs else np.zeros((0, *shape), dtype)


def exact_pairs(ids: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges (lowest id of each equal-sha group, other member)."""
    order = np.lexsort((ids, lo, hi))
    ids, hi, lo = ids[order], hi[order], lo[order]
    start = np.ones(len(ids), bool)
    start[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    head = ids[np.maximum.accumulate(np.where(start, np.arange(len(ids)), 0))]
    return head[~start], ids[~start]


def block_pairs(e16: np.ndarray, threshold: float, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of rows of e16 (n, D) with fp32 cosine >= threshold: (i, j, sim float32).

    Blockwise upper triangle: block rows x the rows from the block on, (block, n - start) scores
    at a time."""
    import torch

    e32 = torch.from_numpy(np.ascontiguousarray(e16)).float()
    eb = e32.to(torch.bfloat16)
    out_i, out_j, out_s = [], [], []
    n = len(eb)
    for s in range(0, n, block):
        sims = eb[s:s + block] @ eb[s:].T  # (b, n - s)
        b = len(sims)
        sims[:, :b].masked_fill_(torch.ones(b, b, dtype=torch.bool).tril(), float("-inf"))  # j <= i
        ci, cj = torch.nonzero(sims >= threshold - MARGIN, as_tuple=True)
        for v in range(0, len(ci), VERIFY_CHUNK):
            gi, gj = ci[v:v + VERIFY_CHUNK] + s, cj[v:v + VERIFY_CHUNK] + s
            sim = (e32[gi] * e32[gj]).sum(1)
            ok = sim >= threshold  # in float32, as select compares the stored values
            out_i.append(gi[ok].numpy()), out_j.append(gj[ok].numpy()), out_s.append(sim[ok].numpy())
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32)


def _representatives(idx: np.ndarray, ids, hi, lo, valid) -> np.ndarray:
    """Rows of idx without exact copies: per sha256 the lowest id (copies share an embedding, so
    their near pairs are those of the kept one; select maps them back)."""
    v = idx[valid[idx]]
    if len(v) < 2:
        return idx
    order = np.lexsort((ids[v], lo[v], hi[v]))
    v = v[order]
    first = np.ones(len(v), bool)
    first[1:] = (hi[v][1:] != hi[v][:-1]) | (lo[v][1:] != lo[v][:-1])
    return np.sort(np.concatenate([idx[~valid[idx]], v[first]]))


class _Rows:
    """The near rows of a search group's payloads without concatenating their embeddings: those stay
    in the payloads (zero-copy from the object store) and one cluster's rows are gathered at a time."""

    def __init__(self, payloads: list[dict]):
        parts = [p for p in payloads if len(p.get("ids", ()))]
        self.embs = [p["emb"] for p in parts]
        self.offsets = np.cumsum([0] + [len(e) for e in self.embs])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), D) fp16 rows at the group-level positions idx (sorted)."""
        piece = np.searchsorted(self.offsets, idx, side="right") - 1  # (n,) payload of each row
        cuts = np.flatnonzero(np.diff(piece)) + 1
        return np.concatenate([self.embs[p[0]][c - self.offsets[p[0]]]
                               for c, p in zip(np.split(idx, cuts), np.split(piece, cuts)) if len(c)])


def search_group(group: int, *payloads: dict, out: str, threshold: float, block: int, meta: dict,
                 memory_mb: float | None = None) -> dict:
    """Exact pairs of this group's sha partition and near pairs within its clusters; writes the
    group's pair file (atomic) and returns its counts. Memory: the payloads (fp16 embeddings of the
    routed rows, in the object store) + one cluster at a time (block_pairs: its fp32 and bf16 copies
    and a (block, rows) score block, whose rows shrink so that it stays within a quarter of
    `memory_mb`: 4 bytes of scores and mask per entry, twice)."""
    t0 = time.time()
    xa, xb = exact_pairs(_cat(payloads, "x_ids", np.int64), _cat(payloads, "x_hi", np.uint64),
                         _cat(payloads, "x_lo", np.uint64))
    ids = _cat(payloads, "ids", np.int64)
    hi, lo, valid = _cat(payloads, "hi", np.uint64), _cat(payloads, "lo", np.uint64), _cat(payloads, "valid", bool)
    cl = _cat(payloads, "cl", np.int32, (1,))
    mine = _cat(payloads, "mine", bool, (1,))
    rows = _Rows(list(payloads))
    na, nb, ns = [], [], []
    n_clusters = largest = 0
    if len(ids):
        r, s = np.nonzero(mine)
        c = cl[r, s].astype(np.int64)
        order = np.lexsort((r, c))
        r, c = r[order], c[order]
        cuts = np.flatnonzero(np.diff(c)) + 1
        for members, cid in zip(np.split(r, cuts), c[np.concatenate([[0], cuts])]):
            n_clusters += 1
            idx = _representatives(members, ids, hi, lo, valid)
            if len(idx) < 2:
                continue
            largest = max(largest, len(idx))
            blk = block if memory_mb is None else max(64, min(block, int(memory_mb * 2 ** 18 / (8 * len(idx)))))
            i, j, sim = block_pairs(rows.gather(idx), threshold, blk)
            gi, gj = idx[i], idx[j]
            # the lowest cluster both rows joined reports the pair: found once over all groups
            ci, cj = cl[gi], cl[gj]  # (m, A)
            same = (ci[:, :, None] == cj[:, None, :]) & (ci[:, :, None] >= 0)
            low = np.where(same, ci[:, :, None], np.iinfo(np.int32).max).min(axis=(1, 2))
            keep = low == cid
            na.append(ids[gi[keep]]), nb.append(ids[gj[keep]]), ns.append(sim[keep])
    a_near = np.concatenate(na) if na else np.zeros(0, np.int64)
    b_near = np.concatenate(nb) if nb else np.zeros(0, np.int64)
    s_near = np.concatenate(ns) if ns else np.zeros(0, np.float32)
    a = np.concatenate([xa, a_near])
    b = np.concatenate([xb, b_near])
    sim = np.concatenate([np.ones(len(xa), np.float32), s_near])
    is_exact = np.concatenate([np.ones(len(xa), bool), np.zeros(len(a_near), bool)])
    counts = {"group": group, "exact": int(len(xa)), "near": int(len(a_near)), "rows": int(len(ids)),
              "clusters": n_clusters, "largest_cluster": largest}
    write_pairs(out, group, a, b, sim, is_exact, dict(meta, **counts))
    return dict(counts, seconds=round(time.time() - t0, 2))
