"""What-if selection: how many rows select would keep under other thresholds, without rerunning it.

The rule is select's (curation/select.py + the dedup contract of this round):
1. a row passes when status is ok, it is scored (width and height known), min(w, h) >= min_side,
   min_aspect_ratio <= h/w <= max_aspect_ratio, and aesthetic >= aesthetic_min (when set);
2. among passing rows, duplicates are resolved greedily in rank order over the stored candidate
   pairs (`<out>/dedup/pairs/`) with similarity >= dedup_threshold (exact pairs have 1.0): a row
   with an already-kept neighbour is dropped and points at the most similar kept neighbour (no
   chaining: it never points at a dropped row); otherwise it is kept. Rank: dedup.keep = best
   (more pixels, then higher aesthetic, then lower key) or first (lower key).
Without stored pairs the duplicates are the rows' recorded duplicate_of (step 2 cannot move).

The few columns the rule needs are read from `m` by DuckDB once (first what-if; ~30 bytes a row)
into numpy arrays indexed by rowid (= position in key order, so "lower key" is "lower rowid"):
step 1 is then a handful of vectorised comparisons, step 2 a Python loop over the pairs that
survive step 1 and the threshold, counts are bincounts; a slider move costs milliseconds at 1M
rows instead of a dozen table scans. Select has no public resolution function on main yet; when
it has, step 2 should call it instead of `resolve` below.
"""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from curation.browse.filters import FilterError

SAMPLES = 6  # rows shown on each side of each margin


def resolve(nodes: list, edges: list[tuple]) -> dict:
    """Greedy duplicate resolution. nodes: row ids in rank order (best first); edges: (a, b, similarity,
    kind) already at or above the threshold. Returns {dropped id: (kept id, similarity, kind)}."""
    rank = {k: i for i, k in enumerate(nodes)}
    adj: dict = {}  # id -> [(neighbour id, similarity, kind)]
    for a, b, s, kind in edges:
        adj.setdefault(a, []).append((b, s, kind))
        adj.setdefault(b, []).append((a, s, kind))
    kept: set[str] = set()
    dropped: dict = {}
    for k in nodes:
        best = None
        for o, s, kind in adj.get(k, ()):
            if o in kept and (best is None or s > best[1] or (s == best[1] and rank[o] < rank[best[0]])):
                best = (o, s, kind)
        if best is None:
            kept.add(k)
        else:
            dropped[k] = best
    return dropped


def _num(v, name: str, lo: float, hi: float) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise FilterError(f"{name}: expected a number, got {v!r}") from None
    if not lo <= x <= hi:
        raise FilterError(f"{name}: {x:g} is outside {lo:g}..{hi:g}")
    return x


def params(q: dict, run) -> dict:
    """Checked slider values (query-string strings) with the run's config as defaults."""
    sel = run.config.get("select") or {}
    aes = q.get("aesthetic_min", sel.get("aesthetic_min"))
    p = {"aesthetic_min": None if aes in (None, "", "null", "none") else _num(aes, "aesthetic_min", -1e9, 1e9),
         "min_side": int(_num(q.get("min_side", sel.get("min_side", 1024)), "min_side", 0, 1e9)),
         "max_aspect_ratio": _num(q.get("max_aspect_ratio", sel.get("max_aspect_ratio", 4.5)),
                                  "max_aspect_ratio", 1, 1e6),
         "min_aspect_ratio": _num(q.get("min_aspect_ratio", sel.get("min_aspect_ratio", 1 / 4.5)),
                                  "min_aspect_ratio", 1e-6, 1),
         "resolution": int(_num(q.get("resolution", run.resolution), "resolution", 1, 1e5))}
    t = q.get("dedup_threshold", sel.get("dedup_threshold", run.candidate_threshold))
    p["dedup_threshold"] = _num(t, "dedup_threshold", 0, 1) if t not in (None, "") else None
    if run.has_pairs and p["dedup_threshold"] is not None and p["dedup_threshold"] < (run.candidate_threshold or 0):
        raise FilterError(f"dedup_threshold {p['dedup_threshold']:g} is below the stored candidate threshold "
                          f"{run.candidate_threshold:g}: pairs under it were never stored (rerun dedup lower)")
    return p


def set_line(run, p: dict) -> str:
    """The command that makes select do this for real."""
    name = run.config.get("name") or "NAME"
    aes = "null" if p["aesthetic_min"] is None else repr(p["aesthetic_min"])  # repr: exact round trip
    sets = [f"select.aesthetic_min={aes}", f"select.min_side={p['min_side']}",
            f"select.max_aspect_ratio={p['max_aspect_ratio']!r}", f"select.min_aspect_ratio={p['min_aspect_ratio']!r}"]
    if run.has_pairs and p["dedup_threshold"] is not None:
        sets.append(f"select.dedup_threshold={p['dedup_threshold']!r}")
    return (f"python -m curation.run --config pipelines.yaml --pipeline {name} --output {run.out} --stages select "
            + " ".join(f"--set {s}" for s in sets))


class Arrays:
    """Per-row columns of `m` as numpy arrays (index = rowid), the pairs as rowid arrays, and the
    bucket of every row per resolution (made on first use)."""

    def __init__(self, run):
        t = run.query("SELECT width, height, aesthetic, coalesce(selected, false) AS was, "
                      "coalesce(status, 'no_status') AS st, duplicate_of IS NOT NULL AS has_dup FROM m ORDER BY rowid")
        w, h, a = t.column("width"), t.column("height"), t.column("aesthetic")
        self.scored = w.is_valid().to_numpy(zero_copy_only=False) & h.is_valid().to_numpy(zero_copy_only=False)
        self.w = w.fill_null(0).to_numpy().astype(np.int64)
        self.h = h.fill_null(0).to_numpy().astype(np.int64)
        self.aes_null = ~a.is_valid().to_numpy(zero_copy_only=False)
        self.aes = a.fill_null(0.0).to_numpy().astype(np.float64)
        self.was = t.column("was").to_numpy(zero_copy_only=False)
        st = t.column("st").combine_chunks().dictionary_encode()
        self.st_names = st.dictionary.to_pylist()
        self.st = st.indices.to_numpy()
        self.ok = self.st == (self.st_names.index("ok") if "ok" in self.st_names else -1)
        self.has_dup = t.column("has_dup").to_numpy(zero_copy_only=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.ratio = np.where(self.w > 0, self.h / np.maximum(self.w, 1), np.nan)  # h/w, float64 as select
        self.side = np.minimum(self.w, self.h)
        self.pixels = self.w * self.h
        self.keys = run.query("SELECT key FROM m ORDER BY rowid").column("key").combine_chunks()
        pr = run.query("SELECT ra, rb, similarity, kind FROM pairs WHERE ra IS NOT NULL AND rb IS NOT NULL")
        self.ra, self.rb = (pr.column(c).to_numpy().astype(np.int64) for c in ("ra", "rb"))
        self.sim = pr.column("similarity").to_numpy().astype(np.float64)
        self.kind = np.asarray(pr.column("kind").to_pylist(), dtype=object)
        self._buckets: dict[int, tuple[np.ndarray, list]] = {}
        self._run = run
        self._lock = threading.Lock()

    def buckets(self, resolution: int) -> tuple[np.ndarray, list]:
        """(code per row, bucket names); code -1 = no bucket (not scored)."""
        with self._lock:
            if resolution not in self._buckets:
                wh = self._run.bucket_table(resolution)
                b = self._run.query(f"SELECT b.bucket FROM m LEFT JOIN {wh} b USING (width, height) "
                                    "ORDER BY m.rowid").column("bucket").combine_chunks().dictionary_encode()
                codes = b.indices.fill_null(-1).to_numpy().astype(np.int64)
                self._buckets[resolution] = (codes, b.dictionary.to_pylist())
            return self._buckets[resolution]


_arrays_lock = threading.Lock()


def arrays(run) -> Arrays:
    with _arrays_lock:
        if getattr(run, "_whatif_arrays", None) is None:
            run._whatif_arrays = Arrays(run)
        return run._whatif_arrays


def _first(mask: np.ndarray, vals: np.ndarray, n: int, desc: bool = False) -> np.ndarray:
    """Rowids of the n rows under `mask` with the smallest (largest) vals, ties by lower rowid."""
    idx = np.flatnonzero(mask & ~np.isnan(vals))
    v = -vals[idx] if desc else vals[idx]
    if len(v) > n:
        kth = np.partition(v, n - 1)[n - 1]
        cand = np.flatnonzero(v <= kth)  # ascending, so a stable sort breaks ties by rowid
        return idx[cand[np.argsort(v[cand], kind="stable")][:n]]
    return idx[np.argsort(v, kind="stable")]


def whatif(run, q: dict) -> dict:
    p = params(q, run)
    A = arrays(run)
    keep = (run.config.get("dedup") or {}).get("keep", "best")
    drop_dups = (run.config.get("select") or {}).get("drop_duplicates", True)
    # Step 1, as select.py words it: reasons only for ok rows; size/aspect only when scored.
    side_ok = A.side >= p["min_side"]
    ar_ok = ~((A.ratio > p["max_aspect_ratio"]) | (A.ratio < p["min_aspect_ratio"])) & (A.w > 0)
    aes_ok = (np.ones_like(A.ok) if p["aesthetic_min"] is None
              else ~(A.aes_null | (A.aes < p["aesthetic_min"])))  # NaN passes, as `a < min` in select.py
    passes = A.ok & A.scored & side_ok & ar_ok & aes_ok
    # Step 2: greedy over the pairs among passing rows at the threshold.
    dropped: dict = {}
    if drop_dups and run.has_pairs and p["dedup_threshold"] is not None:
        e = (A.sim >= p["dedup_threshold"]) & passes[A.ra] & passes[A.rb]
        ra, rb, sim, kind = A.ra[e], A.rb[e], A.sim[e], A.kind[e]
        nodes = np.unique(np.concatenate([ra, rb]))
        if keep == "best":  # more pixels, then higher aesthetic (missing last), then lower key
            order = np.lexsort((nodes, -np.where(A.aes_null[nodes], -1e9, A.aes[nodes]), -A.pixels[nodes]))
        else:
            order = np.argsort(nodes, kind="stable")
        dropped = resolve(nodes[order].tolist(), list(zip(ra.tolist(), rb.tolist(), sim.tolist(), kind.tolist())))
    elif drop_dups:
        dropped = {int(r): (None, None, "recorded") for r in np.flatnonzero(passes & A.has_dup)}
    would = passes.copy()
    would[list(dropped)] = False
    reasons = {A.st_names[c]: int(n) for c, n in enumerate(np.bincount(A.st[~A.ok], minlength=len(A.st_names))) if n}
    okr = A.ok
    reasons.update(not_scored=int((okr & ~A.scored).sum()), too_small=int((okr & A.scored & ~side_ok).sum()),
                   aspect_ratio=int((okr & A.scored & ~ar_ok).sum()), low_aesthetic=int((okr & ~aes_ok).sum()),
                   duplicate=len(dropped))
    codes, names = A.buckets(p["resolution"])
    nb = len(names)
    bw = np.bincount(codes[would & (codes >= 0)], minlength=nb)
    bn = np.bincount(codes[A.was & (codes >= 0)], minlength=nb)
    buckets = sorted(({"bucket": names[i], "would": int(bw[i]), "was": int(bn[i])}
                      for i in range(nb) if bw[i] or bn[i]),
                     key=lambda b: float(b["bucket"]))
    totals = {"would": int(would.sum()), "was": int(A.was.sum()), "gained": int((would & ~A.was).sum()),
              "lost": int((A.was & ~would).sum()), "rows": int(len(would)), "passes": int(passes.sum())}
    margins = _margins(A, p, passes, would, side_ok, ar_ok, aes_ok, dropped)
    return {"params": p, **totals,
            "reasons": [{"reason": k, "n": n} for k, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0])) if n],
            "buckets": buckets, "margins": margins,
            "dedup": {"dropped": len(dropped), "source": "pairs" if run.has_pairs else "duplicate_of",
                      "applied": bool(drop_dups), "keep": keep},
            "set_line": set_line(run, p)}


def _margins(A: Arrays, p: dict, passes, would, side_ok, ar_ok, aes_ok, dropped: dict) -> list[dict]:
    """Rows on each side of each threshold: what a small move of a slider would add or remove."""
    n, out = SAMPLES, []
    base = A.ok & A.scored

    def rows(rids):
        keys = A.keys.take(pa.array(rids, pa.int64())).to_pylist() if len(rids) else []
        return [{"key": k, "aesthetic": None if A.aes_null[r] else float(A.aes[r]), "width": int(A.w[r]),
                 "height": int(A.h[r]), "ratio": float(A.ratio[r]), "side": int(A.side[r])} for k, r in zip(keys, rids)]

    def add(name, side, rids):
        out.append({"margin": name, "side": side, "rows": rows(list(map(int, rids)))})

    if p["aesthetic_min"] is not None:
        add("aesthetic_min", "just kept", _first(would, A.aes, n))
        add("aesthetic_min", "just rejected",
            _first(base & side_ok & ar_ok & ~aes_ok & ~A.aes_null, A.aes, n, desc=True))
    add("min_side", "just kept", _first(would, A.side.astype(np.float64), n))
    add("min_side", "just rejected", _first(base & ar_ok & aes_ok & ~side_ok, A.side.astype(np.float64), n, desc=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        extreme = np.maximum(A.ratio / p["max_aspect_ratio"], p["min_aspect_ratio"] / A.ratio)  # > 1: outside
    add("aspect ratio", "just kept", _first(would, extreme, n, desc=True))
    add("aspect ratio", "just rejected", _first(base & side_ok & aes_ok & ~ar_ok, extreme, n))
    if dropped and p["dedup_threshold"] is not None:
        near = sorted((v[1] if v[1] is not None else 1.0, r, v[0]) for r, v in dropped.items())[:n]
        ids = [r for _, r, _ in near] + [k for _, _, k in near if k is not None]
        key = dict(zip(ids, A.keys.take(pa.array(ids, pa.int64())).to_pylist()))
        out.append({"margin": "dedup_threshold", "side": "just dropped (duplicate of a kept row)",
                    "rows": [{"key": key[r], "kept": key.get(k), "similarity": sim} for sim, r, k in near]})
        under = (A.sim < p["dedup_threshold"]) & would[A.ra] & would[A.rb]
        top = _first(under, A.sim, n, desc=True)
        out.append({"margin": "dedup_threshold", "side": "both kept, most similar pairs under the threshold",
                    "rows": [{"key": a, "other": b, "similarity": float(s)} for a, b, s in zip(
                        A.keys.take(pa.array(A.ra[top])).to_pylist(), A.keys.take(pa.array(A.rb[top])).to_pylist(),
                        A.sim[top])]})
    return out
