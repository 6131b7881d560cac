"""Exact verification of the code search's candidate pairs (codes.py): the cosine that select
compares is always the fp32 dot product of the stored fp16 embeddings, never a code estimate.

    <out>/dedup/cand/<plan>/group-GGGGG.npy   (m, 2) int64 candidate ids (a < b) of search group G,
                                              written before that group's pair file

A distributed join in two steps, so that no task reads more than its own parts and the driver
holds counts only:
1. fetch (one task per batch of parts): reads every candidate file (16 bytes a pair), keeps the
   pairs with an end in its parts, reads those parts' embeddings once and sends each end's
   embedding to bucket hash(a, b) % V (V payloads, num_returns = V + 1).
2. verify_bucket (V tasks): joins both ends of each pair, computes the fp32 cosine, writes the
   pairs at >= the candidate threshold as pair file G + v (atomic, plan id in its metadata).
Shipped: 2 x candidates x D x 2 bytes (10M rows with 2 % near copies: ~1 GB), V chosen so that a
bucket holds at most half of dedup.task_memory_mb.
"""
from __future__ import annotations

import io
import math
import time

import numpy as np

from _sigma import fs, manifest
from curation.dedup.pairs import ROW_BASE, dedup_dir, key_ids, write_pairs


def cand_uri(out: str, plan_id: str, group: int) -> str:
    return fs.join(dedup_dir(out), "cand", plan_id, f"group-{group:05d}.npy")


def write_candidates(out: str, plan_id: str, group: int, a: np.ndarray, b: np.ndarray) -> int:
    """Group `group`'s candidate pairs as (m, 2) int64 (a < b), atomically; returns m."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0) if len(a) else np.zeros((0, 2), np.int64)
    buf = io.BytesIO()
    np.save(buf, pairs)
    fs.write_bytes(cand_uri(out, plan_id, group), buf.getvalue())
    return int(len(pairs))


def candidates_ok(uri: str) -> bool:
    """Whether a candidate file is whole: a (m, 2) int64 .npy whose size matches its header (read
    from the header only; a truncated or foreign file makes its search group run again)."""
    try:
        with fs.open_input(uri) as f:
            head = f.read(256)
        buf = io.BytesIO(head)
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)
        return (len(shape) == 2 and shape[1] == 2 and dtype == np.dtype("<i8") and not fortran
                and fs.info(uri).size == buf.tell() + shape[0] * 16)
    except (FileNotFoundError, OSError, ValueError):
        return False


def read_candidates(out: str, plan_id: str, n_groups: int) -> np.ndarray:
    got = []
    for g in range(n_groups):
        got.append(np.load(io.BytesIO(fs.read_bytes(cand_uri(out, plan_id, g))), allow_pickle=False))
    return np.concatenate(got) if got else np.zeros((0, 2), np.int64)


def n_buckets(n_cand: int, dim: int, memory_mb: float, cpus: int) -> int:
    """Verify tasks: each holds both ends of its pairs (2 x D x 2 bytes a pair) in half its budget."""
    return max(1, min(max(cpus, math.ceil(4 * n_cand * dim / (0.5 * memory_mb * 2 ** 20))), 4096))


def _bucket(a: np.ndarray, b: np.ndarray, v: int) -> np.ndarray:
    h = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ b.astype(np.uint64)
    return ((h >> np.uint64(17)) % np.uint64(v)).astype(np.int64)


def fetch(parts: list[int], *, out: str, plan_id: str, n_groups: int, buckets: int) -> list:
    """V payloads {a, b, side (0: emb is a's, 1: b's), emb (m, D) fp16} + stats."""
    cand = read_candidates(out, plan_id, n_groups)
    mine = np.asarray(sorted(parts), np.int64)
    ends = [(side, np.flatnonzero(np.isin(cand[:, side] // ROW_BASE, mine))) for side in (0, 1)]
    need = np.unique(np.concatenate([cand[idx, side] for side, idx in ends]))
    ids, embs = [], []
    for p in parts:
        if not np.any(need // ROW_BASE == p):
            continue
        keys, e = manifest.read_part_embeddings(out, p)
        kid = key_ids(keys)
        keep = np.isin(kid, need)
        ids.append(kid[keep]), embs.append(e[keep])
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float16)
    order = np.argsort(ids, kind="stable")
    ids, emb = ids[order], emb[order]
    payload = [{} for _ in range(buckets)]
    cols: dict[str, list] = {"a": [], "b": [], "side": [], "row": []}
    for side, idx in ends:
        row = np.searchsorted(ids, cand[idx, side])
        found = (row < len(ids)) & (ids[np.minimum(row, max(len(ids) - 1, 0))] == cand[idx, side]) if len(ids) else \
            np.zeros(len(idx), bool)
        idx, row = idx[found], row[found]
        cols["a"].append(cand[idx, 0]), cols["b"].append(cand[idx, 1])
        cols["side"].append(np.full(len(idx), side, np.int8)), cols["row"].append(row)
    a, b, side, row = (np.concatenate(cols[k]) for k in ("a", "b", "side", "row"))
    v = _bucket(a, b, buckets)
    order = np.argsort(v, kind="stable")
    bounds = np.searchsorted(v[order], np.arange(buckets + 1))
    for k in range(buckets):
        sel = order[bounds[k]:bounds[k + 1]]
        payload[k] = {"a": a[sel], "b": b[sel], "side": side[sel], "emb": emb[row[sel]]}
    return [*payload, {"ends": int(len(a)), "candidates_read": int(len(cand))}]


def verify_bucket(bucket: int, *payloads: dict, out: str, index: int, threshold: float, meta: dict) -> dict:
    """Both ends of each candidate pair of this bucket -> fp32 cosine; pairs at >= threshold are
    written as pair file `index` (kind near). Returns counts (pairs missing an end: rows without an
    embedding, never expected)."""
    import torch

    t0 = time.time()
    parts = [p for p in payloads if len(p.get("a", ()))]
    if parts:
        a, b = np.concatenate([p["a"] for p in parts]), np.concatenate([p["b"] for p in parts])
        side, emb = np.concatenate([p["side"] for p in parts]), np.concatenate([p["emb"] for p in parts])
    else:
        a = b = np.zeros(0, np.int64)
        side, emb = np.zeros(0, np.int8), np.zeros((0, 1), np.float16)
    order = np.lexsort((side, b, a))
    a, b, side = a[order], b[order], side[order]
    both = np.flatnonzero((a[:-1] == a[1:]) & (b[:-1] == b[1:]) & (side[:-1] == 0) & (side[1:] == 1))
    ea = torch.from_numpy(emb[order[both]]).float()
    eb = torch.from_numpy(emb[order[both + 1]]).float()
    sim = (ea * eb).sum(1).numpy() if len(both) else np.zeros(0, np.float32)
    ok = sim >= threshold  # float32, as select compares the stored values
    pa, pb = a[both][ok], b[both][ok]
    counts = {"bucket": bucket, "candidates": int(len(both)), "near": int(ok.sum()),
              "missing": int(len(np.unique(np.stack([a, b], 1), axis=0)) - len(both)) if len(a) else 0}
    write_pairs(out, index, pa, pb, sim[ok], np.zeros(len(pa), bool), dict(meta, **counts, verify=True))
    return dict(counts, seconds=round(time.time() - t0, 2))
