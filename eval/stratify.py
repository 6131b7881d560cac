"""Benchmark selection from our own manifest (used by eval.build_benchmark): eligibility, strata,
seeded draw, greedy rejection of duplicate prompts and near duplicates, aesthetic relaxation.

Scale: one Ray task per manifest part returns only compact per-row arrays of its eligible rows
(int id, rank, aesthetic, prompt words, aspect ratio: ~32 bytes a row); the driver never holds
captions or embeddings of the manifest. Only the pool, a prefix of each stratum's draw order of
O(N) rows, is fetched with its prompts and embeddings (again one task per touched part). The pool
grows (x4) until the result provably equals a greedy pass over every candidate (see `select`).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from _sigma import manifest
from _sigma.partstage import run_tasks

POOL_FACTOR = 2.0  # first pool: 2 x quota (+8) rows per stratum in draw order; grows x4 when needed
BUCKET_RESOLUTION = 1024  # ratio keys are the same at 256/512/1024/2048: strata never depend on eval.resolution
_ROW_COLS = ["key", "caption_long", "caption_short", "caption", "sha256", "width", "height", "aesthetic"]


def key_id(key: str) -> int:
    """Key `PPPPP_RRRRRR` -> part * 1_000_000 + row (the pipeline-wide integer id)."""
    p, r = key.split("_", 1)
    return int(p) * 1_000_000 + int(r)


def id_key(i: int) -> str:
    return f"{int(i) // 1_000_000:05d}_{int(i) % 1_000_000:06d}"


def nearest_bucket(ratio: float, resolution: int = BUCKET_RESOLUTION) -> str:
    """Aspect bucket key (h/w) of _sigma.buckets: the same assignment the training shards use."""
    from _sigma.buckets import nearest_key

    return nearest_key(ratio, resolution)


def normalise_prompt(p: str | None) -> str:
    return re.sub(r"\s+", " ", (p or "").strip().lower())


def rank(seed: int, key: str) -> int:
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


def nearest_buckets(ratios: np.ndarray, resolution: int = BUCKET_RESOLUTION) -> np.ndarray:
    """Vectorised _sigma.buckets.nearest_key (ties go to the smaller key) -> (N,) str."""
    from _sigma.buckets import table

    keys = sorted(table(resolution), key=float)
    vals = np.array([float(k) for k in keys])
    hi = np.clip(np.searchsorted(vals, ratios), 1, len(vals) - 1)
    lo = hi - 1
    pick = np.where(np.abs(ratios - vals[lo]) <= np.abs(vals[hi] - ratios), lo, hi)
    return np.array(keys, dtype=object)[pick]


def length_bins(words: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin of each row, inner edges): quantile bins of prompt word counts."""
    edges = np.quantile(words, np.linspace(0, 1, bins + 1)[1:-1]) if len(words) else np.zeros(0)
    return np.searchsorted(edges, words, side="right"), edges


# --- per-part tasks (Ray workers) ------------------------------------------------------------------

def _part_candidates(part: int, out: str, prompt: str, seed: int, training: set) -> dict:
    """Eligible rows of one part as compact arrays + why the others are not eligible."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = manifest.read_part(out, part, ["key", "status", "selected", "duplicate_of", "aesthetic", "caption_long",
                                       "caption_short", "caption", "width", "height", "aspect_ratio"])
    n = t.num_rows

    def col(name, typ=pa.string()):
        return t.column(name) if name in t.column_names else pa.nulls(n, typ)

    def ok(mask):
        return pc.fill_null(mask, False)

    def nonempty(c):
        return ok(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(c)), 0))

    short = pc.coalesce(col("caption_short"), col("caption"))
    long = col("caption_long")
    aes = col("aesthetic", pa.float64()).cast(pa.float64())
    emb_keys, _ = manifest.read_part_embeddings(out, part)
    rules = [
        ("status", ok(pc.equal(col("status"), "ok"))),
        ("not_selected", ok(t.column("selected")) if "selected" in t.column_names
         else ok(pc.is_null(col("duplicate_of")))),
        ("no_aesthetic", ok(pc.is_finite(aes))),
        ("missing_caption", pc.and_(nonempty(long), nonempty(short))),
        ("no_embedding", pc.is_in(t.column("key"), pa.array(emb_keys.tolist(), pa.string()))),
        ("in_training_shards", pc.invert(pc.is_in(t.column("key"), pa.array(sorted(training), pa.string())))),
    ]
    alive = pa.array(np.ones(n, bool))
    why: dict[str, int] = {}
    for name, mask in rules:
        failed = pc.sum(pc.and_(alive, pc.invert(mask))).as_py() or 0
        if failed:
            why[name] = failed
        alive = pc.and_(alive, mask)
    text = pc.utf8_trim_whitespace((long if prompt == "caption_long" else short).filter(alive))
    keys = t.column("key").filter(alive).to_pylist()

    def num(name):
        return col(name, pa.float64()).cast(pa.float64()).filter(alive).to_numpy(zero_copy_only=False)

    w, h, ar = num("width"), num("height"), num("aspect_ratio")
    ratio = np.where(np.isfinite(ar) & (ar > 0), ar, np.where((w > 0) & (h > 0), h / np.where(w > 0, w, 1), 1.0))
    return {"rows": n, "why": why,
            "id": np.array([key_id(k) for k in keys], np.int64),
            "rank": np.array([rank(seed, k) for k in keys], np.uint64),
            "aesthetic": aes.filter(alive).to_numpy(zero_copy_only=False).astype(np.float64),
            "words": pc.list_value_length(pc.utf8_split_whitespace(text)).to_numpy(zero_copy_only=False).astype(np.int64),
            "ratio": ratio}


def load_candidates(out: str, ecfg, training: set[str], progress: bool = False) -> tuple[dict, dict]:
    """(candidate arrays, counts): one task per manifest part, concatenated on the driver."""
    parts = manifest.list_parts(out)
    res = run_tasks(_part_candidates, parts, kwargs={"out": out, "prompt": ecfg.prompt, "seed": ecfg.seed,
                                                     "training": set(training)},
                    desc="benchmark candidates", progress=progress)
    why: dict[str, int] = {}
    for r in res:
        for k, v in r["why"].items():
            why[k] = why.get(k, 0) + v
    cols = ("id", "rank", "aesthetic", "words", "ratio")
    empty = {"id": np.int64, "rank": np.uint64, "aesthetic": np.float64, "words": np.int64, "ratio": np.float64}
    cand = {c: (np.concatenate([r[c] for r in res]) if res else np.zeros(0, empty[c])) for c in cols}
    return cand, {"manifest_rows": sum(r["rows"] for r in res), "eligible": len(cand["id"]), "ineligible": why}


def _part_pool(part: int, out: str, keys: list[str], prompt: str) -> dict:
    """The pooled rows of one part: their text, sha256, size and L2-normalised embeddings."""
    want = set(keys)
    t = manifest.read_part(out, part, _ROW_COLS)
    rows = {}
    for r in t.to_pylist():
        if r["key"] in want:
            short = (r.get("caption_short") or r.get("caption") or "").strip()
            long = (r.get("caption_long") or "").strip()
            rows[r["key"]] = {"key": r["key"], "prompt_long": long, "prompt_short": short,
                              "prompt": long if prompt == "caption_long" else short, "sha256": r.get("sha256"),
                              "aesthetic": r.get("aesthetic"), "width": r.get("width"), "height": r.get("height")}
    ek, emb = manifest.read_part_embeddings(out, part)
    vecs = {}
    for i, k in enumerate(ek.tolist()):
        if k in rows:
            v = emb[i].astype(np.float32)
            vecs[k] = v / max(float(np.linalg.norm(v)), 1e-12)
    return {"rows": rows, "emb": vecs}


def fetch_pool(out: str, keys: list[str], prompt: str) -> tuple[dict, dict]:
    """({key: row}, {key: embedding (D,) float32}) of the pooled keys, one task per touched part."""
    by_part: dict[int, list[str]] = {}
    for k in keys:
        by_part.setdefault(int(k.split("_", 1)[0]), []).append(k)
    res = run_tasks(_part_pool_item, [{"part": p, "keys": ks} for p, ks in sorted(by_part.items())],
                    kwargs={"out": out, "prompt": prompt}, desc="benchmark pool", progress=False)
    rows, emb = {}, {}
    for r in res:
        rows.update(r["rows"])
        emb.update(r["emb"])
    return rows, emb


def _part_pool_item(item: dict, out: str, prompt: str) -> dict:
    return _part_pool(item["part"], out, item["keys"], prompt)


# --- the draw (driver) ---------------------------------------------------------------------------

def select(out: str, cand: dict, ecfg, cut: float) -> tuple[list[dict], dict]:
    """Rows at aesthetic >= cut: stratified seeded draw with greedy prompt / near-duplicate rejection.

    Strata = aspect bucket x prompt-length bin; quotas proportional (largest remainder); inside a
    stratum rows come in sha256(seed:key) order. Only a prefix of each stratum (the pool) is
    fetched; the pool grows (x4) until no stratum ran out of pooled rows before its quota while it
    has more, and the total is reached or every candidate is pooled: then the result equals the
    greedy over every candidate. Memory O(N), not O(manifest).
    """
    keep = cand["aesthetic"] >= cut
    ids, rk, words, ratio = cand["id"][keep], cand["rank"][keep], cand["words"][keep], cand["ratio"][keep]
    m = len(ids)
    if m == 0:
        return [], {"after_aesthetic": 0, "rejected": {"duplicate_prompt": 0, "near_duplicate": 0},
                    "quota_filled": 0, "filled_after": 0, "strata": 0, "pool": 0}
    lbin, edges = length_bins(words, ecfg.length_bins)
    bucket = nearest_buckets(ratio)
    stratum = np.array([f"{b}|{lb}" for b, lb in zip(bucket, lbin)], dtype=object)
    members: dict[str, np.ndarray] = {}
    for s in sorted(set(stratum.tolist())):
        idx = np.flatnonzero(stratum == s)
        members[s] = idx[np.lexsort((ids[idx], rk[idx]))]  # draw order: rank, then id
    q = quotas({s: len(v) for s, v in members.items()}, ecfg.n)
    factor = POOL_FACTOR
    while True:
        limit = {s: min(len(v), int(np.ceil(factor * q[s])) + 8) for s, v in members.items()}
        # Strata fill in parallel: the j-th draw of a stratum with quota q comes at "time" (j + 0.5) / q.
        order = sorted(((j + 0.5) / max(q[s], 1e-9), s, id_key(ids[i]), int(i))
                       for s, v in members.items() for j, i in enumerate(v[:limit[s]]))
        rows, emb = fetch_pool(out, [o[2] for o in order], ecfg.prompt)
        order = [o for o in order if o[2] in emb and o[2] in rows]
        chosen, taken, stats = _greedy(order, rows, emb, q, ecfg)
        short = [s for s in members if taken.get(s, 0) < q[s] and limit[s] < len(members[s])]
        complete = all(limit[s] == len(members[s]) for s in members)
        if complete or (not short and len(chosen) >= min(ecfg.n, m)):
            break
        factor *= 4
    for r in chosen:
        i = r.pop("_i")
        r.update(bucket=str(bucket[i]), length_bin=int(lbin[i]),
                 image=f"download/{int(r['key'].split('_', 1)[0]):05d}.tar")
        r["width"], r["height"] = (None if r[c] is None else int(r[c]) for c in ("width", "height"))
    chosen.sort(key=lambda r: r["key"])
    stats.update({"after_aesthetic": m, "strata": len(members), "pool": len(order),
                  "length_bin_edges_words": [float(e) for e in edges]})
    return chosen, stats


def _greedy(order, rows, emb, q, ecfg, chunk: int = 1024):
    """Accept rows in `order` (time, stratum, key, index): a quota pass, then a fill pass for
    strata short of clean rows, in the same order. A row is rejected when its normalised prompt
    was accepted before or its embedding has cosine >= leak_threshold to an accepted one."""
    t = ecfg.leak_threshold
    E = np.stack([emb[o[2]] for o in order]) if order else np.zeros((0, 1), np.float32)  # (P, D)
    acc_emb = np.zeros((min(ecfg.n, len(order)), E.shape[1]), np.float32)
    accepted: list[int] = []
    seen: set[str] = set()
    taken: dict[str, int] = {}
    rejected = {"duplicate_prompt": 0, "near_duplicate": 0}
    done = np.zeros(len(order), bool)

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
                p = normalise_prompt(rows[order[i][2]]["prompt"])
                if p in seen:
                    rejected["duplicate_prompt"] += 1
                    continue
                if prior[li] >= t or any(inner[li, lj] >= t for lj in local):
                    rejected["near_duplicate"] += 1
                    continue
                seen.add(p)
                acc_emb[len(accepted)] = E[i]
                accepted.append(i)
                local.append(li)
                taken[s] = taken.get(s, 0) + 1

    run(use_quota=True)
    pass1 = len(accepted)
    run(use_quota=False)
    chosen = [dict(rows[order[i][2]], _i=order[i][3]) for i in accepted]
    return chosen, taken, {"quota_filled": pass1, "filled_after": len(accepted) - pass1, "rejected": rejected}


def draw(out: str, cand: dict, ecfg) -> tuple[list[dict], dict]:
    """The size target first, then the aesthetic preference: try the preferred cut (quantile
    `aesthetic_quantile` of the eligible scores, never below `aesthetic_min`), and relax it in
    quantile steps towards 0 (or the floor) only while fewer than n rows can be drawn. Returns
    (rows, selection report) with every attempt and, if still short, exactly why."""
    aes = cand["aesthetic"]
    floor = ecfg.aesthetic_min
    q0 = ecfg.aesthetic_quantile
    quantiles = [q0] + [q0 * (1 - k / 4) for k in range(1, 5)] if q0 > 0 else [0.0]
    attempts, chosen, stats, seen_cuts = [], [], {}, set()
    for qv in quantiles:
        cut = float(np.quantile(aes, qv)) if len(aes) else float("-inf")
        if floor is not None:
            cut = max(cut, floor)
        if cut in seen_cuts:
            continue
        seen_cuts.add(cut)
        chosen, stats = select(out, cand, ecfg, cut)
        attempts.append({"quantile": qv, "cut": cut, "after_aesthetic": stats["after_aesthetic"],
                         "chosen": len(chosen), "rejected": dict(stats["rejected"])})
        if len(chosen) >= ecfg.n:
            break
    last = attempts[-1] if attempts else {"cut": None, "after_aesthetic": 0, "chosen": 0,
                                          "rejected": {"duplicate_prompt": 0, "near_duplicate": 0}}
    why = None
    if len(chosen) < ecfg.n:
        bound = f"the floor aesthetic_min = {floor}" if floor is not None else "no aesthetic cut at all"
        why = (f"{len(chosen)} of {ecfg.n} pairs: {len(aes)} eligible rows; with {bound} (cut {last['cut']}) "
               f"{last['after_aesthetic']} rows pass, of which {last['rejected']['duplicate_prompt']} repeat a prompt "
               f"and {last['rejected']['near_duplicate']} are within cosine {ecfg.leak_threshold} of a drawn image")
    stats.update({"aesthetic_preferred_quantile": q0, "aesthetic_floor": floor,
                  "aesthetic_cut": last["cut"], "aesthetic_quantile_used": attempts[-1]["quantile"] if attempts else None,
                  "aesthetic_relaxed": len(attempts) > 1, "attempts": attempts, "short_because": why})
    return chosen, stats
