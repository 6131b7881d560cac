"""Select's duplicate resolution over dedup's stored pairs: one worker task, no similarity search.

Input: every stored pair at/above select.dedup_threshold (exact pairs always) and, for the rows in
them only, the select fields (status, width, height, aesthetic) read from their manifest parts.
A row is *eligible* when select's own criteria (curation.select.reject_reasons) pass it.

1. Exact copies (connected components of the exact edges, scipy) collapse onto one node, its
   representative being the best-ranked eligible copy: copies share their bytes, hence their
   embedding and every near pair, which dedup stored for one copy only.
2. Near edges between nodes keep their stored similarity; components of this graph (scipy) are
   reported as duplicate groups.
3. Greedy in rank order over eligible nodes: a node is kept unless it is at/above the threshold
   to an already kept node; then it is a duplicate of the most similar kept node (ties: the
   better-ranked). Nothing chains (A~B, B~C, A!~C keeps C when B is dropped for A), and ineligible
   nodes never keep anyone out. An ineligible node at/above the threshold to a kept node also
   names it (select lists `duplicate` among its other reasons).
4. Rows: copies of a kept node -> (representative, exact, 1.0); members of a dropped or
   ineligible node -> (kept node's representative, near, stored similarity). So every row with a
   duplicate_of points at a selected row.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from _sigma import fs, manifest
from curation.dedup.pairs import ROW_BASE, id_keys, key_ids, read_pairs

NONE, EXACT, NEAR = 0, 1, 2


def rank_positions(ids: np.ndarray, pixels: np.ndarray, aesthetic: np.ndarray, keep: str) -> np.ndarray:
    """0 = best. best: most pixels, then highest aesthetic (missing last), then lowest id; first: lowest id."""
    if keep == "first":
        order = np.argsort(ids, kind="stable")
    else:
        aes = np.where(np.isnan(aesthetic), -np.inf, aesthetic)
        order = np.lexsort((ids, -aes, -pixels.astype(np.float64)))
    pos = np.empty(len(ids), np.int64)
    pos[order] = np.arange(len(ids))
    return pos


def greedy(n: int, eligible: np.ndarray, rank: np.ndarray, exact_edges: tuple, near_edges: tuple) -> dict:
    """Resolve n rows (local indices). exact_edges (a, b); near_edges (a, b, sim float32).

    Returns dup_of (n,) local index or -1, kind (n,) NONE|EXACT|NEAR, sim (n,) float32, plus
    counts (groups = near components of >= 2 nodes, largest)."""
    from scipy.sparse import coo_matrix, csr_matrix
    from scipy.sparse.csgraph import connected_components

    ea, eb = exact_edges
    na, nb, ns = near_edges
    if n == 0:
        return {"dup_of": np.zeros(0, np.int64), "kind": np.zeros(0, np.int8), "sim": np.zeros(0, np.float32),
                "groups": 0, "largest_group": 0}
    _, node = connected_components(coo_matrix((np.ones(len(ea)), (ea, eb)), shape=(n, n)), directed=False)
    m = int(node.max()) + 1 if n else 0
    first = np.lexsort((rank, ~eligible, node))  # per node: eligible first, then best rank
    head = np.ones(n, bool)
    head[1:] = node[first][1:] != node[first][:-1]
    rep = np.empty(m, np.int64)
    rep[node[first][head]] = first[head]
    s_elig, s_rank = eligible[rep], rank[rep]
    # near edges between nodes, each once with its stored similarity (the highest if several)
    sa, sb = node[na], node[nb]
    keep = sa != sb
    sa, sb, ns = np.minimum(sa, sb)[keep], np.maximum(sa, sb)[keep], ns[keep]
    order = np.lexsort((-ns, sb, sa))
    sa, sb, ns = sa[order], sb[order], ns[order]
    uniq = np.ones(len(sa), bool)
    uniq[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    sa, sb, ns = sa[uniq], sb[uniq], ns[uniq]
    adj = csr_matrix((np.concatenate([ns, ns]), (np.concatenate([sa, sb]), np.concatenate([sb, sa]))), shape=(m, m))
    n_comp, comp = connected_components(adj, directed=False)
    sizes = np.bincount(comp, minlength=n_comp)
    indptr, indices, weights = adj.indptr, adj.indices, adj.data
    kept = s_elig.copy()  # eligible nodes are kept unless dropped below
    dup = np.full(m, -1, np.int64)
    dsim = np.full(m, np.nan, np.float32)
    degree = np.diff(indptr)
    for u in np.flatnonzero(s_elig & (degree > 0))[np.argsort(s_rank[s_elig & (degree > 0)], kind="stable")]:
        nbrs, w = indices[indptr[u]:indptr[u + 1]], weights[indptr[u]:indptr[u + 1]]
        live = kept[nbrs] & (s_rank[nbrs] < s_rank[u])  # kept and already decided
        if live.any():
            cand, cw = nbrs[live], w[live]
            best = np.lexsort((s_rank[cand], -cw))[0]
            kept[u], dup[u], dsim[u] = False, cand[best], cw[best]
    # ineligible nodes: the most similar kept neighbour, if any (information; never a reason to drop it)
    src = np.repeat(np.arange(m), degree)
    mask = ~s_elig[src] & kept[indices]
    if mask.any():
        u, v, w = src[mask], indices[mask], weights[mask]
        order = np.lexsort((s_rank[v], -w, u))
        u, v, w = u[order], v[order], w[order]
        firsts = np.ones(len(u), bool)
        firsts[1:] = u[1:] != u[:-1]
        dup[u[firsts]], dsim[u[firsts]] = v[firsts], w[firsts]
    dup_of = np.full(n, -1, np.int64)
    kind = np.zeros(n, np.int8)
    sim = np.full(n, np.nan, np.float32)
    s = node
    near_row = dup[s] >= 0
    dup_of[near_row], kind[near_row], sim[near_row] = rep[dup[s[near_row]]], NEAR, dsim[s[near_row]]
    copy_row = ~near_row & kept[s] & (rep[s] != np.arange(n))
    dup_of[copy_row], kind[copy_row], sim[copy_row] = rep[s[copy_row]], EXACT, 1.0
    return {"dup_of": dup_of, "kind": kind, "sim": sim, "groups": int((sizes >= 2).sum()),
            "largest_group": int(sizes.max()) if len(sizes) else 0}


def _fields(out: str, part: int, wanted: np.ndarray) -> pa.Table:
    t = manifest.read_part(out, part, ["key", "status", "width", "height", "aesthetic", "nsfw", "watermark",
                                       "clip_similarity"])  # every column select's criteria read
    ids = key_ids(t.column("key"))
    return t.filter(pa.array(np.isin(ids, wanted))).append_column("_id", pa.array(ids[np.isin(ids, wanted)]))


def resolve(out: str, scfg, target: str, fp: str) -> dict:
    """Resolve duplicates at scfg.dedup_threshold; write `target`/part-NNNNN.parquet (key,
    duplicate_of, dup_kind, dup_similarity) for parts with such rows, then `target`/_done.json."""
    from curation.select import reject_reasons

    a, b, sim, exact = read_pairs(out, scfg.dedup_threshold)
    ids = np.unique(np.concatenate([a, b]))
    parts = np.unique(ids // ROW_BASE).tolist()
    with ThreadPoolExecutor(8) as ex:
        tables = list(ex.map(lambda p: _fields(out, p, ids[ids // ROW_BASE == p]), parts))
    t = pa.concat_tables(tables, promote_options="permissive") if tables else None
    eligible = np.zeros(len(ids), bool)
    pixels, aes = np.zeros(len(ids)), np.full(len(ids), np.nan)
    if t is not None and t.num_rows:  # rows missing from the manifest stay ineligible
        pos = np.searchsorted(ids, t.column("_id").to_numpy())
        eligible[pos] = np.array([r is None for r in reject_reasons(t, scfg)])
        num = lambda c: t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) if c in t.column_names \
            else np.full(t.num_rows, np.nan)  # noqa: E731
        pixels[pos] = np.nan_to_num(num("width") * num("height"))
        aes[pos] = num("aesthetic")
    rank = rank_positions(ids, pixels, aes, scfg.dedup_keep)
    loc = lambda x: np.searchsorted(ids, x)  # noqa: E731
    res = greedy(len(ids), eligible, rank, (loc(a[exact]), loc(b[exact])),
                 (loc(a[~exact]), loc(b[~exact]), sim[~exact]))
    rows = np.flatnonzero(res["dup_of"] >= 0)
    written = []

    def write(p: int) -> None:
        r = rows[ids[rows] // ROW_BASE == p]
        fs.write_parquet(fs.join(target, f"part-{p:05d}.parquet"), pa.table({
            "key": id_keys(ids[r]), "duplicate_of": id_keys(ids[res["dup_of"][r]]),
            "dup_kind": pa.array(np.where(res["kind"][r] == EXACT, "exact", "near"), pa.string()),
            "dup_similarity": pa.array(res["sim"][r], pa.float32())}))
        written.append(p)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(write, np.unique(ids[rows] // ROW_BASE).tolist()))
    kept_dups = int((eligible[rows]).sum())
    info = {"fingerprint": fp, "parts": sorted(written), "rows_in_pairs": int(len(ids)), "pairs": int(len(a)),
            "duplicates": kept_dups, "groups": res["groups"], "largest_group": res["largest_group"]}
    fs.write_json(fs.join(target, "_done.json"), info)
    return info
