"""Dedup's worker functions (Ray tasks; plain functions, callable in-process too).

sample_embeddings  parts -> a random sample of their embeddings (for the basis and centroid fit)
fit_plan           samples -> code basis + centroids (fitted on the codes) + cluster -> group map, written to <out>/dedup/plan.*
route              parts -> one payload per search group: exact (id, sha) by sha hash, near
                   (id, sha, clusters, code fp16) to the groups owning the row's clusters
search_group       payloads of one group -> its exact pairs + near candidates within its clusters,
                   written to <out>/dedup/cand/ and <out>/dedup/pairs/part-GGGGG.parquet

Similarities (kernels.py): bf16 score blocks, hits within MARGIN recomputed in fp32; in exact mode
(small inputs, full embeddings) that value decides and is stored, in clusters mode (codes) the
pairs are candidates that verify.py decides on.
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from _sigma import fs, manifest
from curation.dedup import codes, kmeans, verify
from curation.dedup.kernels import block_pairs, cross_pairs
from curation.dedup.pairs import dedup_dir, key_ids, sha_words, write_pairs

SEARCH_ROW_BYTES = 64  # per routed row in a search task besides its code: id, sha words, flags, sort indices


def plan_npz(out: str) -> str:
    return fs.join(dedup_dir(out), "plan.npz")


def plan_json(out: str) -> str:
    return fs.join(dedup_dir(out), "plan.json")


def _part_rows(out: str, part: int, near: bool, keys_only: bool = False):
    """(ids, sha hi, sha lo, sha valid, emb fp16 (n, D) or None) of a part's status-ok rows (with
    an embedding when `near`; `keys_only`: which rows have one, without reading the embeddings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = manifest.read_part(out, part, ["key", "status", "sha256"])
    t = t.filter(pc.fill_null(pc.equal(t.column("status"), "ok"), False))
    emb = None
    if near:
        if keys_only:
            ekeys, e = manifest.read_part_embedding_keys(out, part), None
        else:
            ekeys, e = manifest.read_part_embeddings(out, part)
        if len(ekeys):
            pos = pc.index_in(t.column("key"), value_set=pa.array(ekeys.tolist(), pa.string()))
            t = t.filter(pc.is_valid(pos))
            emb = None if e is None else e[pc.drop_null(pos).to_numpy()]
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
             dense_candidates: float = 0.5, code_cosine: float | None = None) -> dict:
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
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # in place: calibrate's _unit copies nothing
        z = codes.encode(x, basis, np.float32)
        cent = kmeans.fit_centroids(z, n_clusters, seed)
    t_fit = time.time() - t0
    cal = kmeans.calibrate(x, cent, max_assignments, probe, recall_cosine, recall_target, threshold, basis, seed,
                           code_cosine=code_cosine)
    a, radius = cal["assignments"], cal["radius"]
    cl = kmeans.Assigner(cent, a, radius, probe)(z)
    k = len(cent["fine"])
    scale = total_rows / len(x)
    rows = np.bincount(cl[cl >= 0], minlength=k) * scale  # estimated routed rows (codes) per cluster
    dense, per_visitor = codes.dense_clusters(z, cl, rows, cal["code"]["code_threshold"], dense_candidates)
    full = np.where(dense, rows, 0)  # rows that bring their embedding: those routed to a dense cluster
    a_cols = cl.shape[1]
    # a routed row: its code, and ids, sha words, clusters, flags and sort indices in the search
    nbytes = rows * (z.shape[1] * 2 + SEARCH_ROW_BYTES + 5 * a_cols) + full * x.shape[1] * 2
    routed = rows.sum()
    # 1.25: the estimate is a sample's, and packing leaves groups uneven in size
    n_groups = int(max(1, min(k, max(min_groups, np.ceil(1.25 * nbytes.sum() / group_bytes)))))
    # runs of equal search work (rows^2) and bytes, each as a share of the total: groups stay
    # within the memory budget and about even in time
    weight = rows ** 2 / max(float((rows ** 2).sum()), 1.0) + nbytes / max(float(nbytes.sum()), 1.0)
    group = kmeans.pack_groups(weight, n_groups, contiguous=True)
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
    """The batch's status-ok rows: ids, sha words, and (near) their clusters `cl` (n, A) int32 and
    embeddings. Exact mode: all embeddings `emb` (n, D) fp16. Clusters mode: codes `code` (n, d')
    fp16, and the embeddings `dense_emb` of the rows `dense_idx` (sorted positions) that joined a
    dense cluster: the only ones a search group needs (route). Codes, clusters and those
    embeddings are computed once per plan and kept in dedup/assign/<plan>/ (256 + 4A bytes a row,
    + D x 2 for dense rows): later waves and a resumed run read them (and the parts' keys, to
    check them) instead of the parts' embeddings."""
    import io
    import zipfile

    clusters = near and plan["mode"] == "clusters"
    uri = batch_uri(out, plan["plan_id"], parts[0]) if clusters else None
    cached = None
    if clusters:
        try:
            with np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False) as z:
                cached = {k: z[k] for k in ("ids", "code", "cl", "dense_idx", "dense_emb")}
        except FileNotFoundError:
            cached = None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # cut or not ours: recompute
            fs.delete(uri)
            cached = None
    rows = [_part_rows(out, p, near, keys_only=cached is not None) for p in parts]
    got = {k: np.concatenate([r[i] for r in rows]) for i, k in enumerate(("ids", "hi", "lo", "valid"))}
    embs = [r[4] for r in rows if r[4] is not None and len(r[4])]
    del rows
    if not near or not len(got["ids"]):
        return got
    if cached is not None and _cache_ok(cached, got["ids"], plan):
        return dict(got, code=cached["code"], cl=cached["cl"], dense_idx=cached["dense_idx"],
                    dense_emb=cached["dense_emb"])
    if cached is not None:  # stale or broken: read the embeddings and compute again
        fs.delete(uri)
        return _batch_rows(parts, out, plan, near, radius, probe)
    emb = np.concatenate(embs)
    del embs
    if not clusters:  # one cluster (exact all-pairs search)
        return dict(got, emb=emb, cl=np.zeros((len(emb), 1), np.int32))
    cent = load_plan(out)
    code = codes.encode(emb, cent.get("basis"))  # (n, d') fp16
    cl = kmeans.Assigner(cent, int(plan["assignments"]), radius, probe)(code)
    dense_idx = np.flatnonzero((cent["dense"][np.maximum(cl, 0)] & (cl >= 0)).any(1))
    dense_emb = emb[dense_idx]
    del emb
    buf = io.BytesIO()
    np.savez(buf, ids=got["ids"], code=code, cl=cl, dense_idx=dense_idx, dense_emb=dense_emb)
    fs.write_bytes(uri, buf.getvalue())
    return dict(got, code=code, cl=cl, dense_idx=dense_idx, dense_emb=dense_emb)


def _cache_ok(c: dict, ids: np.ndarray, plan: dict) -> bool:
    """A cached batch is reused only when it is this batch's rows, in order, with shapes and cluster
    ids the plan allows (a file under dedup/assign/ may be stale, cut or tampered with)."""
    n, a = len(ids), int(plan["assignments"])
    di = c["dense_idx"]
    return (np.array_equal(c["ids"], ids) and c["code"].shape == (n, int(plan["code_dims"]))
            and c["cl"].shape == (n, a) and c["cl"].dtype == np.int32
            and bool(((c["cl"] >= -1) & (c["cl"] < int(plan["clusters"]))).all())
            and di.ndim == 1 and (not len(di) or (di.min() >= 0 and di.max() < n and (np.diff(di) > 0).all()))
            and c["dense_emb"].shape == (len(di), int(plan.get("dim", 768))) and c["dense_emb"].dtype == np.float16
            and c["code"].dtype == np.float16)


def route(parts: list[int], *, out: str, plan: dict, wave: tuple, exact: bool = True, near: bool = True,
          radius: float = 0.0, probe: int = 1) -> list:
    """Read the parts' status-ok rows and split them into one payload per search group of this
    `wave` (the others get empty payloads: the object store holds one wave at a time).

    Returns G payloads + a small stats dict (num_returns = G + 1). Exact payload: rows with a
    sha256, in group hash(sha) % G. Near payload: each row once per group that owns one of its
    clusters, with all its clusters (for the "lowest shared cluster reports the pair" rule), `mine`
    (A,) marking the clusters of that group, `home` (one of its clusters in that group is dense:
    there it also brings its embedding, `full`, in the order of the home rows) and its code
    (clusters mode: every routed row) as `emb`. Exact mode: the embeddings themselves, all home."""
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
    n_near = len(got["cl"]) if "cl" in got else 0
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
            # its embedding comes along to the groups of its dense clusters only (exact mode: everywhere)
            home = ((grp[idx] == g) & dense[idx]).any(1)
            if plan["mode"] == "clusters":
                full = got["dense_emb"][np.searchsorted(got["dense_idx"], idx[home])]
            else:
                full = emb[idx[home]]
            payload[g].update(ids=ids[idx], hi=hi[idx], lo=lo[idx], valid=valid[idx], cl=cl[idx],
                              mine=grp[idx] == g, home=home, full=full,
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

    Per cluster: its home rows (those whose embeddings came along: every row of a dense cluster;
    exact mode: all) are searched exactly against each other (fp32 cosine >= threshold, stored).
    Clusters mode (`code_threshold`): the other rows (their codes only) are searched against all
    the cluster's rows on the codes; those candidate pairs are written to dedup/cand/ before the
    pair file and verified on the embeddings later (verify.py). Dense clusters, where many pairs
    sit just below the threshold, are thus searched exactly and never flood the candidates;
    sparse ones cost 2d' bytes a routed row instead of 2D. Memory: the payloads (fp16 codes and
    home embeddings, in the object store) + one cluster at a time (its fp32 and bf16 copies and a
    (block, rows) score block, whose rows shrink so that it stays within a quarter of `memory_mb`)."""
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
                cv = codes_.gather(v)
                i, j, _ = block_pairs(cv, code_threshold, blk)  # visitor pairs, each once (i < j)
                gi, gj = [v[i]], [v[j]]
                if len(h):  # visitors x home rows
                    i, j = cross_pairs(cv, codes_.gather(h), code_threshold, blk)
                    gi.append(v[i]), gj.append(h[j])
                gi, gj = np.concatenate(gi), np.concatenate(gj)
                keep = _lowest_shared(cl, gi, gj, cid)
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
