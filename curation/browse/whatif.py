"""What-if selection: how many rows select would keep under other thresholds, without rerunning it.

The rule is select's (curation/select.py + the dedup contract of this round):
1. a row passes when status is ok, it is scored (width and height known), min(w, h) >= min_side,
   min_aspect_ratio <= h/w <= max_aspect_ratio, aesthetic >= aesthetic_min (when set), and the
   filters when set: nsfw <= nsfw_max, watermark <= watermark_max, clip_similarity >=
   clip_similarity_min (a row without the score fails a set filter, as in select);
2. duplicates: select's own resolution (curation.dedup.resolve.greedy, the function select runs)
   over the stored candidate pairs (`<out>/dedup/pairs/`) at dedup_threshold (exact pairs always),
   with step 1 as eligibility: byte copies collapse onto their best eligible copy first, then a
   node is dropped when it is at/above the threshold to an already kept one (no chaining). Rank:
   select.dedup_keep = best (more pixels, then higher aesthetic, then lower key) or first (lower
   key). So at the run's own settings the what-if is the run's `selected` column, row for row.
Without stored pairs the duplicates are the rows' recorded duplicate_of (step 2 cannot move).

The few columns the rule needs are read from `m` by DuckDB once (first what-if; ~30 bytes a row)
into numpy arrays indexed by rowid (= position in key order, so "lower key" is "lower rowid"):
step 1 is then a handful of vectorised comparisons, step 2 select's greedy over the rows in pairs
at the threshold, counts are bincounts; a slider move costs milliseconds at 1M
rows instead of a dozen table scans.
"""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from curation.browse.filters import FilterError

SAMPLES = 6  # rows shown on each side of each margin
# The score stage's filter columns: (slider, column, reason, range, kept side) -- select's rules.
FILTERS = (("nsfw_max", "nsfw", "nsfw", (0.0, 1.0), "max"),
           ("watermark_max", "watermark", "watermark", (0.0, 1.0), "max"),
           ("clip_similarity_min", "clip_similarity", "low_clip_similarity", (-1.0, 1.0), "min"))


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
    for name, _, _, (lo, hi), _ in FILTERS:  # optional like aesthetic_min: "null" turns one off
        v = q.get(name, sel.get(name))
        p[name] = None if v in (None, "", "null", "none") else _num(v, name, lo, hi)
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
    was = run.config.get("select") or {}
    for name, *_ in FILTERS:  # only filters in play: a run without them keeps its short line
        if p.get(name) is not None or was.get(name) is not None:
            sets.append(f"select.{name}=" + ("null" if p[name] is None else repr(p[name])))
    if run.has_pairs and p["dedup_threshold"] is not None:
        sets.append(f"select.dedup_threshold={p['dedup_threshold']!r}")
    return (f"python -m curation.run --config pipelines.yaml --pipeline {name} --output {run.out} --stages select "
            + " ".join(f"--set {s}" for s in sets))


class Arrays:
    """Per-row columns of `m` as numpy arrays (index = rowid), the pairs as rowid arrays, and the
    bucket of every row per resolution (made on first use)."""

    def __init__(self, run):
        t = run.query("SELECT width, height, aesthetic, coalesce(selected, false) AS was, "
                      "coalesce(status, 'no_status') AS st, duplicate_of IS NOT NULL AS has_dup, "
                      "nsfw, watermark, clip_similarity FROM m ORDER BY rowid")
        # filter scores, NaN where missing (a set filter fails them, as in select)
        self.filt = {c: t.column(c).cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False).copy()
                     for c in ("nsfw", "watermark", "clip_similarity")}
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
        self.sim32 = self.sim.astype(np.float32)  # as stored: select compares float32 with float32(threshold)
        self.kind = np.asarray(pr.column("kind").to_pylist(), dtype=object)
        self.exact = self.kind == "exact"
        try:  # select ranks ties by key id (part * 1e6 + row); rowid order equals it for 5-digit parts
            from curation.dedup.pairs import key_ids

            self.ids = key_ids(self.keys)
        except ValueError:  # keys of another form (not a pipeline run): key order
            self.ids = np.arange(len(self.keys), dtype=np.int64)
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


def resolve_rows(A: Arrays, eligible: np.ndarray, threshold: float, keep: str):
    """Per row (rowid): (duplicate_of rowid or -1, similarity, kind) as select resolves them:
    curation.dedup.resolve.greedy over the pairs select reads (exact ones always, near ones with
    float32 similarity >= float32(threshold)), ranked by resolve.rank_positions."""
    from curation.dedup.resolve import EXACT, greedy, rank_positions

    e = A.exact | (A.sim32 >= np.float32(threshold))
    ra, rb, sim, exact = A.ra[e], A.rb[e], A.sim32[e], A.exact[e]
    nodes = np.unique(np.concatenate([ra, rb]))  # rowids of the rows in a pair, ascending
    loc = lambda x: np.searchsorted(nodes, x)  # noqa: E731 - rowid -> local index
    aes = np.where(A.aes_null[nodes], np.nan, A.aes[nodes])
    rank = rank_positions(A.ids[nodes], A.pixels[nodes].astype(np.float64), aes, keep)
    res = greedy(len(nodes), eligible[nodes], rank, (loc(ra[exact]), loc(rb[exact])),
                 (loc(ra[~exact]), loc(rb[~exact]), sim[~exact]))
    n = len(A.ok)
    dup_of, dsim = np.full(n, -1, np.int64), np.full(n, np.nan, np.float64)
    kind = np.full(n, None, dtype=object)
    hit = res["dup_of"] >= 0
    dup_of[nodes[hit]] = nodes[res["dup_of"][hit]]
    dsim[nodes[hit]] = res["sim"][hit]
    kind[nodes[hit]] = np.where(res["kind"][hit] == EXACT, "exact", "near")
    return dup_of, dsim, kind


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
    keep = (run.config.get("select") or {}).get("dedup_keep", "best")  # select's rank (SelectConfig.dedup_keep)
    drop_dups = (run.config.get("select") or {}).get("drop_duplicates", True)
    # Step 1, as select.py words it: reasons only for ok rows; size/aspect only when scored.
    side_ok = A.side >= p["min_side"]
    ar_ok = ~((A.ratio > p["max_aspect_ratio"]) | (A.ratio < p["min_aspect_ratio"])) & (A.w > 0)
    aes_ok = (np.ones_like(A.ok) if p["aesthetic_min"] is None
              else ~(A.aes_null | np.isnan(A.aes) | (A.aes < p["aesthetic_min"])))  # NaN fails, as in select.py
    filt_ok = {}
    for name, col, _, _, side in FILTERS:
        if p.get(name) is not None:
            v = A.filt[col]
            with np.errstate(invalid="ignore"):
                filt_ok[name] = ~np.isnan(v) & ((v <= p[name]) if side == "max" else (v >= p[name]))
    passes = A.ok & A.scored & side_ok & ar_ok & aes_ok
    for m in filt_ok.values():
        passes &= m
    # Step 2: select's resolution over the stored pairs (see the module docstring).
    dropped: dict = {}  # eligible rows dropped as duplicates: {row: (kept row or None, similarity, kind)}
    if drop_dups and run.has_pairs and p["dedup_threshold"] is not None:
        dup_of, dsim, dkind = resolve_rows(A, passes, p["dedup_threshold"], keep)
        n_dup = int((dup_of >= 0).sum())  # select says `duplicate` for every row with a duplicate_of
        dropped = {int(r): (int(dup_of[r]), float(dsim[r]), dkind[r]) for r in np.flatnonzero(passes & (dup_of >= 0))}
    elif drop_dups:
        n_dup = int(A.has_dup.sum())
        dropped = {int(r): (None, None, "recorded") for r in np.flatnonzero(passes & A.has_dup)}
    else:
        n_dup = 0
    would = passes.copy()
    would[list(dropped)] = False
    reasons = {A.st_names[c]: int(n) for c, n in enumerate(np.bincount(A.st[~A.ok], minlength=len(A.st_names))) if n}
    okr = A.ok
    reasons.update(not_scored=int((okr & ~A.scored).sum()), too_small=int((okr & A.scored & ~side_ok).sum()),
                   aspect_ratio=int((okr & A.scored & ~ar_ok).sum()), low_aesthetic=int((okr & ~aes_ok).sum()),
                   duplicate=n_dup)
    for name, _, reason, _, _ in FILTERS:  # select words these only for scored rows
        if name in filt_ok:
            reasons[reason] = int((okr & A.scored & ~filt_ok[name]).sum())
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
    margins += _filter_margins(A, p, would, passes, side_ok & ar_ok & aes_ok, filt_ok)
    return {"params": p, **totals,
            "reasons": [{"reason": k, "n": n} for k, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0])) if n],
            "buckets": buckets, "margins": margins,
            "dedup": {"dropped": len(dropped), "source": "pairs" if run.has_pairs else "duplicate_of",
                      "applied": bool(drop_dups), "keep": keep},
            "set_line": set_line(run, p)}


def _filter_margins(A: Arrays, p: dict, would, passes, base_ok, filt_ok: dict) -> list[dict]:
    """Per set filter: the kept rows nearest its threshold and the rejected rows (by it alone)
    nearest it."""
    out = []
    for name, col, _, _, side in FILTERS:
        if name not in filt_ok:
            continue
        v = A.filt[col]
        others = A.ok & A.scored & base_ok
        for m in (filt_ok[o] for o in filt_ok if o != name):
            others = others & m
        kept = _first(would, v, SAMPLES, desc=(side == "max"))
        lost = _first(others & ~filt_ok[name], v, SAMPLES, desc=(side != "max"))
        for label, rids in (("just kept", kept), ("just rejected", lost)):
            rids = list(map(int, rids))
            keys = A.keys.take(pa.array(rids, pa.int64())).to_pylist() if rids else []
            out.append({"margin": name, "side": label, "rows": [
                {"key": k, col: float(v[r]), "aesthetic": None if A.aes_null[r] else float(A.aes[r]),
                 "width": int(A.w[r]), "height": int(A.h[r]), "ratio": float(A.ratio[r]), "side": int(A.side[r])}
                for k, r in zip(keys, rids)]})
    return out


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
