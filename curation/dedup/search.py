"""Dedup's worker functions (Ray tasks; plain functions, callable in-process too).

sample_embeddings  parts -> a random sample of their embeddings (for the basis and centroid fit)
fit_plan           samples -> code basis + centroids (fitted on the codes) + cluster -> group map, written to <out>/dedup/plan.*
route              parts -> one payload per search group: exact (id, sha) by sha hash, near
                   (id, sha, clusters, code fp16) to the groups owning the row's clusters
search_group       payloads of one group -> its exact pairs + near candidates within its clusters,
                   written to <out>/dedup/cand/ and <out>/dedup/pairs/part-GGGGG.parquet

Similarities: candidates come from bf16 matmuls (inputs rounded to 8 significant bits: a dot
product of unit vectors is off by at most ~2^-8 + 2^-9 < 0.006), so every pair within MARGIN below the
threshold is recomputed in fp32; in exact mode (small inputs, full embeddings) that value decides
and is stored, in clusters mode (codes) the pairs are candidates that verify.py decides on.
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from _sigma import fs, manifest
from curation.dedup import codes, kmeans, verify
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
             max_assignments: int, probe: int, recall_cosine: float, recall_target: float, threshold: float,
             code_dims: int, group_bytes: float, seed: int, threads: int = 1,
             dense_candidates: float = 0.5) -> dict:
    """Draw the code basis and fit the centroids (on the codes) on the samples, choose the code threshold
    and the clusters per row (kmeans.calibrate), estimate cluster sizes from the sample's own
    assignment, pack clusters into search groups of at most ~group_bytes of routed codes;
    write plan.npz then plan.json (the latter marks it usable)."""
    t0 = time.time()
    import sklearn.cluster  # noqa: F401 - loads its OpenMP runtime first, so that the limit below reaches it
    from threadpoolctl import threadpool_limits

    x = np.concatenate([s for s in samples if len(s)]).astype(np.float32)
    with threadpool_limits(threads):  # workers run with OMP_NUM_THREADS=1; this task holds `threads` CPUs
        basis = codes.projection(x.shape[1], code_dims, seed)
        z = codes.encode(x, basis, np.float32)
        cent = kmeans.fit_centroids(z, n_clusters, seed)
    t_fit = time.time() - t0
    cal = kmeans.calibrate(x, cent, max_assignments, probe, recall_cosine, recall_target, threshold, basis, seed)
    a, radius = cal["assignments"], cal["radius"]
    cl = kmeans.Assigner(cent, a, radius, probe)(z)
    k = len(cent["fine"])
    scale = total_rows / len(x)
    rows = np.bincount(cl[cl >= 0], minlength=k) * scale  # estimated routed rows (codes) per cluster
    dense, per_visitor = codes.dense_clusters(z, cl, rows, cal["code"]["code_threshold"], dense_candidates)
    full = np.where(dense, rows, np.bincount(cl[:, 0], minlength=k) * scale)  # rows that bring their embedding
    nbytes = rows * z.shape[1] * 2 + full * x.shape[1] * 2
    routed = rows.sum()
    # 1.25: the estimate is a sample's, and packing by cost leaves groups uneven in size
    n_groups = int(max(1, min(k, max(min_groups, np.ceil(1.25 * nbytes.sum() / group_bytes)))))
    group = kmeans.pack_groups(rows ** 2, n_groups, contiguous=True)
    n_groups = int(group.max()) + 1
    group_rows_est = np.bincount(group, weights=rows, minlength=n_groups)
    group_bytes_est = np.bincount(group, weights=nbytes, minlength=n_groups)
    plan_id = uuid.uuid4().hex[:12]
    import io

    buf = io.BytesIO()
    np.savez(buf, cluster_group=group, dense=dense, **cent, **({"basis": basis} if basis is not None else {}))
    fs.write_bytes(plan_npz(out), buf.getvalue())
    info = {"fingerprint": fp, "plan_id": plan_id, "mode": "clusters", "clusters": k, "coarse": len(cent["coarse"]),
            "groups": n_groups, "assignments": a, "radius": radius, "code_dims": int(z.shape[1]),
            "code_threshold": cal["code"]["code_threshold"], "calibration": cal, "sample_rows": len(x),
            "dim": int(x.shape[1]), "mean_assignments": round(float((cl >= 0).sum(1).mean()), 3),
            "routed_rows_est": int(routed), "group_rows_est": [int(r) for r in group_rows_est],
            "group_bytes_est": [int(b) for b in group_bytes_est], "dense_clusters": int(dense.sum()),
            "dense_rows_est": int(rows[dense].sum()), "candidates_per_visitor_est": float(per_visitor),
            "largest_cluster_est": int(rows.max()), "search_work_est": float((rows ** 2).sum()),
            "fit_seconds": round(t_fit, 2), "plan_seconds": round(time.time() - t0, 2)}
    fs.write_json(plan_json(out), info)
    return info


def load_plan(out: str) -> dict:
    with fs.open_input(plan_npz(out)) as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


def batch_uri(out: str, plan_id: str, first_part: int) -> str:
    return fs.join(dedup_dir(out), "assign", plan_id, f"batch-{first_part:05d}.npz")


def _batch_rows(parts: list[int], out: str, plan: dict, near: bool, radius: float, probe: int) -> dict:
    """The batch's status-ok rows: ids, sha words, and (near) their embeddings `emb` (n, D) fp16 and
    clusters `cl` (n, A) int32, with (clusters mode) their codes `code` (n, d') fp16. Codes and
    clusters are computed once per plan and kept in dedup/assign/<plan>/ (256 + 4A bytes a row):
    later waves and a resumed run read those instead of encoding and assigning again."""
    import io

    rows = [_part_rows(out, p, near) for p in parts]
    got = {k: np.concatenate([r[i] for r in rows]) for i, k in enumerate(("ids", "hi", "lo", "valid"))}
    embs = [r[4] for r in rows if r[4] is not None and len(r[4])]
    del rows
    if not near or not embs:
        return got
    got["emb"] = np.concatenate(embs)
    del embs
    if plan["mode"] != "clusters":  # one cluster (exact all-pairs search)
        return dict(got, cl=np.zeros((len(got["emb"]), 1), np.int32))
    uri = batch_uri(out, plan["plan_id"], parts[0])
    try:
        with np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False) as z:
            if np.array_equal(z["ids"], got["ids"]):
                return dict(got, code=z["code"], cl=z["cl"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        pass
    cent = load_plan(out)
    code = codes.encode(got["emb"], cent.get("basis"))  # (n, d') fp16
    cl = kmeans.Assigner(cent, int(plan["assignments"]), radius, probe)(code)
    buf = io.BytesIO()
    np.savez(buf, ids=got["ids"], code=code, cl=cl)
    fs.write_bytes(uri, buf.getvalue())
    return dict(got, code=code, cl=cl)


def route(parts: list[int], *, out: str, plan: dict, wave: tuple, exact: bool = True, near: bool = True,
          radius: float = 0.0, probe: int = 1) -> list:
    """Read the parts' status-ok rows and split them into one payload per search group of this
    `wave` (the others get empty payloads: the object store holds one wave at a time).

    Returns G payloads + a small stats dict (num_returns = G + 1). Exact payload: rows with a
    sha256, in group hash(sha) % G. Near payload: each row once per group that owns one of its
    clusters, with all its clusters (for the "lowest shared cluster reports the pair" rule), `mine`
    (A,) marking the clusters of that group, `home` (the group of its best cluster: there it also
    brings its embedding, `full`, in the order of the home rows) and its code (clusters mode: every
    routed row) as `emb`. Exact mode: the embeddings themselves, all home."""
    n_groups = int(plan["groups"])
    wanted = np.zeros(n_groups, bool)
    wanted[list(wave)] = True
    got = _batch_rows(parts, out, plan, near, radius, probe)
    ids, hi, lo, valid = got["ids"], got["hi"], got["lo"], got["valid"]
    emb = got.get("emb")
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
        cl = got["cl"]
        code = got.get("code")
        if plan["mode"] == "clusters":
            pl = load_plan(out)
            group_of = pl["cluster_group"]
            grp = np.where(cl >= 0, group_of[np.maximum(cl, 0)], -1)
        else:
            grp = np.zeros((n_near, 1), np.int64)
        r, s = np.nonzero((grp >= 0) & wanted[np.maximum(grp, 0)])
        key = np.unique(grp[r, s].astype(np.int64) * n_near + r)  # each (group, row) once, by group
        gs, rs = key // n_near, key % n_near
        bounds = np.searchsorted(gs, np.arange(n_groups + 1))
        dense = pl["dense"][np.maximum(cl, 0)] & (cl >= 0) if plan["mode"] == "clusters" else np.ones_like(grp, bool)
        for g in np.flatnonzero(wanted).tolist():
            idx = rs[bounds[g]:bounds[g + 1]]
            # its embedding comes along to its best cluster's group and to the groups of its dense clusters
            home = (grp[idx, 0] == g) | ((grp[idx] == g) & dense[idx]).any(1)
            payload[g].update(ids=ids[idx], hi=hi[idx], lo=lo[idx], valid=valid[idx], cl=cl[idx],
                              mine=grp[idx] == g, home=home, full=emb[idx[home]],
                              emb=code[idx] if plan["mode"] == "clusters" else np.zeros((len(idx), 0), np.float16))
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

    def __init__(self, payloads: list[dict], field: str = "emb"):
        parts = [p for p in payloads if len(p.get(field, ()))]
        self.embs = [p[field] for p in parts]
        self.offsets = np.cumsum([0] + [len(e) for e in self.embs])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), D) fp16 rows at the group-level positions idx (sorted)."""
        piece = np.searchsorted(self.offsets, idx, side="right") - 1  # (n,) payload of each row
        cuts = np.flatnonzero(np.diff(piece)) + 1
        return np.concatenate([self.embs[p[0]][c - self.offsets[p[0]]]
                               for c, p in zip(np.split(idx, cuts), np.split(piece, cuts)) if len(c)])


def cross_pairs(q16: np.ndarray, d16: np.ndarray, threshold: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with fp32 cosine(q16[i], d16[j]) >= threshold: bf16 blocks of q rows x all of d,
    candidates within MARGIN verified in fp32 (as block_pairs, for two sets of rows)."""
    import torch

    q32, d32 = torch.from_numpy(np.ascontiguousarray(q16)).float(), torch.from_numpy(np.ascontiguousarray(d16)).float()
    qb, db = q32.to(torch.bfloat16), d32.to(torch.bfloat16)
    out_i, out_j = [], []
    for s in range(0, len(qb), block):
        ci, cj = torch.nonzero(qb[s:s + block] @ db.T >= threshold - MARGIN, as_tuple=True)
        for v in range(0, len(ci), VERIFY_CHUNK):
            gi, gj = ci[v:v + VERIFY_CHUNK] + s, cj[v:v + VERIFY_CHUNK]
            ok = (q32[gi] * d32[gj]).sum(1) >= threshold
            out_i.append(gi[ok].numpy()), out_j.append(gj[ok].numpy())
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def _lowest_shared(cl: np.ndarray, gi: np.ndarray, gj: np.ndarray, cid: int) -> np.ndarray:
    """(m,) bool: the lowest cluster rows gi and gj both joined is cid (it reports the pair: each
    pair is found once over all clusters and groups)."""
    ci, cj = cl[gi], cl[gj]  # (m, A)
    same = (ci[:, :, None] == cj[:, None, :]) & (ci[:, :, None] >= 0)
    return np.where(same, ci[:, :, None], np.iinfo(np.int32).max).min(axis=(1, 2)) == cid


def search_group(group: int, *payloads: dict, out: str, threshold: float, block: int, meta: dict,
                 memory_mb: float | None = None, code_threshold: float | None = None) -> dict:
    """Exact pairs of this group's sha partition and near pairs within its clusters; writes the
    group's pair file (atomic) and returns its counts.

    Per cluster: its home rows (best cluster in this group: their embeddings came along) are
    searched exactly against each other (fp32 cosine >= threshold, stored). Clusters mode
    (`code_threshold`): the visiting rows (their codes only) are searched against all the cluster's
    rows on the codes; those candidate pairs are written to dedup/cand/ before the pair file and
    verified on the embeddings later (verify.py). Dense regions keep their rows home (their
    clusters are neighbours in id, packed into one group), so their many pairs just below the
    threshold never become candidates. Memory: the payloads (fp16 codes and home embeddings, in
    the object store) + one cluster at a time (its fp32 and bf16 copies and a (block, rows) score
    block, whose rows shrink so that it stays within a quarter of `memory_mb`)."""
    t0 = time.time()
    xa, xb = exact_pairs(_cat(payloads, "x_ids", np.int64), _cat(payloads, "x_hi", np.uint64),
                         _cat(payloads, "x_lo", np.uint64))
    ids = _cat(payloads, "ids", np.int64)
    hi, lo, valid = _cat(payloads, "hi", np.uint64), _cat(payloads, "lo", np.uint64), _cat(payloads, "valid", bool)
    cl = _cat(payloads, "cl", np.int32, (1,))
    mine = _cat(payloads, "mine", bool, (1,))
    home = _cat(payloads, "home", bool)
    full_pos = np.cumsum(home) - 1  # group position -> position among the home rows (their embeddings)
    codes_, full = _Rows(list(payloads), "emb"), _Rows(list(payloads), "full")
    na, nb, ns, ca, cb = [], [], [], [], []
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
            h = idx[home[idx]]
            if len(h) >= 2:
                i, j, sim = block_pairs(full.gather(full_pos[h]), threshold, blk)
                keep = _lowest_shared(cl, h[i], h[j], cid)
                na.append(ids[h[i][keep]]), nb.append(ids[h[j][keep]]), ns.append(sim[keep])
            v = idx[~home[idx]]
            if code_threshold is not None and len(v):
                i, j = cross_pairs(codes_.gather(v), codes_.gather(idx), code_threshold, blk)
                gi, gj = v[i], idx[j]
                keep = (home[gj] | (gi < gj)) & (gi != gj)  # visitor pairs once
                keep[keep] = _lowest_shared(cl, gi[keep], gj[keep], cid)
                ca.append(ids[gi[keep]]), cb.append(ids[gj[keep]])
    a_near = np.concatenate(na) if na else np.zeros(0, np.int64)
    b_near = np.concatenate(nb) if nb else np.zeros(0, np.int64)
    s_near = np.concatenate(ns) if ns else np.zeros(0, np.float32)
    n_cand = 0
    if code_threshold is not None:  # visitors' candidates: verified later; the pair file commits the group
        n_cand = verify.write_candidates(out, meta["plan_id"], group, np.concatenate(ca) if ca else np.zeros(0, np.int64),
                                         np.concatenate(cb) if cb else np.zeros(0, np.int64))
    a = np.concatenate([xa, a_near])
    b = np.concatenate([xb, b_near])
    sim = np.concatenate([np.ones(len(xa), np.float32), s_near])
    is_exact = np.concatenate([np.ones(len(xa), bool), np.zeros(len(a_near), bool)])
    counts = {"group": group, "exact": int(len(xa)), "near": int(len(a_near)), "rows": int(len(ids)),
              "candidates": n_cand, "clusters": n_clusters, "largest_cluster": largest}
    write_pairs(out, group, a, b, sim, is_exact, dict(meta, **counts))
    return dict(counts, seconds=round(time.time() - t0, 2))
