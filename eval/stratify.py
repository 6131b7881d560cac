"""Benchmark selection internals (used by eval.build_benchmark): eligibility, strata, seeded draw,
greedy rejection of duplicate prompts and CLIP near duplicates.

Everything is vectorised over the manifest (pyarrow / numpy) except the greedy pass, which only
sees a pool of O(N) rows: each stratum's draw order is cut after 2 x its quota (+8) rows, and the
pool grows (x4) until the result provably equals a greedy over every candidate (see `select`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from common import manifest

POOL_FACTOR = 2.0  # first pool: 2 x quota (+8) rows per stratum in draw order; grows x4 when needed


def nearest_bucket(ratio: float, resolution: int) -> str:
    """Aspect bucket key (h/w) of features.buckets: the same assignment the training shards use."""
    from features.buckets import nearest_key

    return nearest_key(ratio, resolution)


def normalise_prompt(p: str) -> str:
    return re.sub(r"\s+", " ", p.strip().lower())


def _rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def quotas(sizes: dict, n: int) -> dict:
    """Largest-remainder allocation of n over strata proportional to their sizes (deterministic)."""
    total = sum(sizes.values())
    if total <= n:
        return dict(sizes)
    raw = {s: n * c / total for s, c in sizes.items()}
    q = {s: int(v) for s, v in raw.items()}
    rest = n - sum(q.values())
    for s in sorted(raw, key=lambda s: (-(raw[s] - q[s]), s))[:rest]:
        q[s] += 1
    return q


def _nearest_buckets(ratios: np.ndarray, resolution: int) -> np.ndarray:
    """Vectorised features.buckets.nearest_key (ties go to the smaller key) -> (N,) str."""
    from features.buckets import table

    keys = sorted(table(resolution), key=float)
    vals = np.array([float(k) for k in keys])
    hi = np.clip(np.searchsorted(vals, ratios), 1, len(vals) - 1)
    lo = hi - 1
    pick = np.where(np.abs(ratios - vals[lo]) <= np.abs(vals[hi] - ratios), lo, hi)
    return np.array(keys, dtype=object)[pick]


def _str_col(t, name):
    import pyarrow as pa

    return t.column(name) if name in t.column_names else pa.nulls(t.num_rows, pa.string())


def load_candidates(out: Path, ecfg, exclude: set[str]):
    """Eligible rows as a pyarrow table (vectorised: the manifest may hold tens of millions of rows)
    and the counts of why the others are not eligible (first failing rule per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = ["key", "status", "selected", "duplicate_of", "aesthetic", "caption_long", "caption_short", "caption",
            "sha256", "width", "height", "aspect_ratio"]
    t = manifest.read_manifest(out, cols)
    n = t.num_rows
    false = pa.array(np.zeros(n, bool))

    def ok(mask):
        return pc.fill_null(mask, False) if n else false

    def nonempty(col):
        return ok(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))

    short = pc.coalesce(_str_col(t, "caption_short"), _str_col(t, "caption"))
    long = _str_col(t, "caption_long")
    aes = t.column("aesthetic").cast(pa.float64()) if "aesthetic" in t.column_names else pa.nulls(n, pa.float64())
    rules = [
        ("status", ok(pc.equal(_str_col(t, "status"), "ok"))),
        ("not_selected", ok(t.column("selected")) if "selected" in t.column_names
         else ok(pc.is_null(_str_col(t, "duplicate_of")))),
        ("no_aesthetic", ok(pc.is_finite(aes))),
        ("missing_caption", pc.and_(nonempty(long), nonempty(short))),
        ("in_training_shards", pc.invert(pc.is_in(t.column("key"), pa.array(sorted(exclude), pa.string())))),
    ]
    alive = pa.array(np.ones(n, bool))
    why: dict[str, int] = {}
    for name, mask in rules:
        failed = pc.sum(pc.and_(alive, pc.invert(mask))).as_py() or 0
        if failed:
            why[name] = failed
        alive = pc.and_(alive, mask)
    prompt = long if ecfg.prompt == "caption_long" else short
    cand = pa.table({"key": t.column("key"), "prompt_long": pc.utf8_trim_whitespace(long),
                     "prompt_short": pc.utf8_trim_whitespace(short), "prompt": pc.utf8_trim_whitespace(prompt),
                     "sha256": _str_col(t, "sha256"), "aesthetic": aes,
                     **{c: (t.column(c) if c in t.column_names else pa.nulls(n, pa.float64()))
                        for c in ("width", "height", "aspect_ratio")}}).filter(alive)
    return cand, {"manifest_rows": n, "eligible": cand.num_rows, "ineligible": why}


def _row(cand, i: int, bucket: str, length_bin: int) -> dict:
    r = {c: cand.column(c)[i].as_py() for c in ("key", "prompt", "prompt_long", "prompt_short", "sha256",
                                                 "aesthetic", "width", "height")}
    r.update(image=f"download/{int(r['key'].split('_', 1)[0]):05d}.tar", bucket=bucket, length_bin=length_bin)
    for c in ("width", "height"):
        r[c] = None if r[c] is None else int(r[c])
    return r


def _pool_embeddings(out: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """CLIP embeddings (float32, L2-normalised) of `keys` only, one embeddings part at a time."""
    want = set(keys)
    found: dict[str, np.ndarray] = {}
    for part in sorted({int(k.split("_", 1)[0]) for k in keys}):
        ek, emb = manifest.read_embeddings(out, parts=[part])
        for i, k in enumerate(ek.tolist()):
            if k in want:
                v = emb[i].astype(np.float32)
                found[k] = v / max(float(np.linalg.norm(v)), 1e-12)
    return found


def select(out: Path, cand, ecfg) -> tuple[list[dict], dict]:
    """Aesthetic cut, stratified seeded draw, greedy prompt/near-duplicate rejection.

    Only a prefix of each stratum's draw order (the pool) is materialised with its embeddings; the
    pool grows (x4) until the result provably equals running the greedy over every candidate: no
    stratum ran out of pooled rows before its quota while it has more, and the total is reached
    or every candidate is pooled. So memory is O(N), not O(manifest).
    """
    import pyarrow.compute as pc

    if cand.num_rows == 0:
        return [], {"after_aesthetic": 0}
    aes = cand.column("aesthetic").to_numpy(zero_copy_only=False)
    cut = ecfg.aesthetic_min if ecfg.aesthetic_min is not None else float(np.quantile(aes, ecfg.aesthetic_quantile))
    cand = cand.filter(pc.greater_equal(cand.column("aesthetic"), cut))
    m = cand.num_rows
    keys = cand.column("key").to_pylist()
    words = pc.list_value_length(pc.utf8_split_whitespace(cand.column("prompt"))).to_numpy(zero_copy_only=False)
    edges = np.quantile(words, np.linspace(0, 1, ecfg.length_bins + 1)[1:-1]) if m else np.zeros(0)
    lbin = np.searchsorted(edges, words, side="right")
    w = cand.column("width").to_numpy(zero_copy_only=False).astype(np.float64)
    h = cand.column("height").to_numpy(zero_copy_only=False).astype(np.float64)
    ar = cand.column("aspect_ratio").to_numpy(zero_copy_only=False).astype(np.float64)
    ratio = np.where(np.isfinite(ar) & (ar > 0), ar, np.where((w > 0) & (h > 0), h / np.where(w > 0, w, 1), 1.0))
    bucket = _nearest_buckets(ratio, ecfg.resolution)
    rank = np.array([_rank(ecfg.seed, k) for k in keys], dtype=np.uint64)
    stratum = np.array([f"{b}|{lb}" for b, lb in zip(bucket, lbin)], dtype=object)
    members: dict[str, np.ndarray] = {}
    for s in sorted(set(stratum.tolist())):
        idx = np.flatnonzero(stratum == s)
        order_in = np.lexsort((np.array(keys, dtype=object)[idx].astype(str), rank[idx]))
        members[s] = idx[order_in]  # candidate indices of stratum s in draw order
    q = quotas({s: len(v) for s, v in members.items()}, ecfg.n)
    factor = POOL_FACTOR
    while True:
        limit = {s: min(len(v), int(np.ceil(factor * q[s])) + 8) for s, v in members.items()}
        # Strata fill in parallel: the j-th draw of a stratum with quota q comes at "time" (j + 0.5) / q.
        order = sorted(((j + 0.5) / max(q[s], 1e-9), s, keys[i], int(i))
                       for s, v in members.items() for j, i in enumerate(v[:limit[s]]))
        emb = _pool_embeddings(out, [o[2] for o in order])
        no_emb = sum(1 for o in order if o[2] not in emb)
        order = [o for o in order if o[2] in emb]
        result = _greedy(order, emb, q, ecfg, [cand, bucket, lbin])
        chosen, taken, stats = result
        short = [s for s in members if taken.get(s, 0) < q[s] and limit[s] < len(members[s])]
        complete = all(limit[s] == len(members[s]) for s in members)
        if (not short and (len(chosen) >= min(ecfg.n, m) or complete)) or complete:
            break
        factor *= 4
    chosen.sort(key=lambda r: r["key"])
    stats.update({"aesthetic_cut": cut, "after_aesthetic": m, "strata": len(members), "pool": len(order),
                  "no_embedding_in_pool": no_emb, "length_bin_edges_words": [float(e) for e in edges]})
    return chosen, stats


def _greedy(order, emb, q, ecfg, ctx, chunk: int = 1024):
    """Accept rows in `order` (time, stratum, key, index): quota pass, then a fill pass."""
    cand, bucket, lbin = ctx
    E = np.stack([emb[o[2]] for o in order]) if order else np.zeros((0, 1), np.float32)  # (P, D)
    acc_emb = np.zeros((min(ecfg.n, len(order)), E.shape[1]), np.float32)
    accepted: list[int] = []
    seen: set[str] = set()
    taken: dict[str, int] = {}
    rejected = {"duplicate_prompt": 0, "near_duplicate": 0}
    done = np.zeros(len(order), bool)
    prompts = cand.column("prompt")

    def run(use_quota: bool):
        for start in range(0, len(order), chunk):
            idx = [i for i in range(start, min(start + chunk, len(order))) if not done[i]]
            if len(accepted) >= ecfg.n:
                return
            if not idx:
                continue
            block = E[idx]  # (c, D)
            prior = (block @ acc_emb[:len(accepted)].T).max(axis=1) if accepted else np.full(len(idx), -1.0)
            inner = block @ block.T  # (c, c)
            local: list[int] = []
            for li, i in enumerate(idx):
                if len(accepted) >= ecfg.n:
                    return
                s = order[i][1]
                if use_quota and taken.get(s, 0) >= q[s]:
                    continue
                done[i] = True
                p = normalise_prompt(prompts[order[i][3]].as_py())
                if p in seen:
                    rejected["duplicate_prompt"] += 1
                    continue
                if prior[li] >= ecfg.dedup_threshold or any(inner[li, lj] >= ecfg.dedup_threshold for lj in local):
                    rejected["near_duplicate"] += 1
                    continue
                seen.add(p)
                acc_emb[len(accepted)] = E[i]
                accepted.append(i)
                local.append(li)
                taken[s] = taken.get(s, 0) + 1

    run(use_quota=True)
    pass1 = len(accepted)
    run(use_quota=False)  # strata that ran out of clean rows: fill from the others, same order
    chosen = [_row(cand, order[i][3], str(bucket[order[i][3]]), int(lbin[order[i][3]])) for i in accepted]
    return chosen, taken, {"quota_filled": pass1, "filled_after": len(accepted) - pass1, "rejected": rejected}
