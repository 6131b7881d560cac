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

Step 1 is one SQL pass over `m`; step 2 touches only rows that are in a pair (a Python loop over
the pairs that survive step 1 and the threshold). Select has no public resolution function on
main yet; when it has, step 2 should call it instead of `resolve` below.
"""
from __future__ import annotations

import pyarrow as pa

from curation.browse.filters import FilterError

SAMPLES = 6  # rows shown on each side of each margin


def resolve(nodes: list[str], edges: list[tuple[str, str, float, str]]) -> dict[str, tuple[str, float, str]]:
    """Greedy duplicate resolution. nodes: keys in rank order (best first); edges: (a, b, similarity,
    kind) already at or above the threshold. Returns {dropped key: (kept key, similarity, kind)}."""
    rank = {k: i for i, k in enumerate(nodes)}
    adj: dict[str, list[tuple[str, float, str]]] = {}
    for a, b, s, kind in edges:
        adj.setdefault(a, []).append((b, s, kind))
        adj.setdefault(b, []).append((a, s, kind))
    kept: set[str] = set()
    dropped: dict[str, tuple[str, float, str]] = {}
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
         "max_aspect_ratio": _num(q.get("max_aspect_ratio", sel.get("max_aspect_ratio", 4.5)), "max_aspect_ratio", 1, 1e6),
         "min_aspect_ratio": _num(q.get("min_aspect_ratio", sel.get("min_aspect_ratio", 1 / 4.5)), "min_aspect_ratio", 1e-6, 1),
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


FLAGS = """
CREATE TEMP TABLE f0 AS
SELECT key, width, height, aesthetic, coalesce(selected, false) AS was_selected, b.bucket,
       coalesce(status, 'no_status') AS st, coalesce(status = 'ok', false) AS ok,
       width IS NOT NULL AND height IS NOT NULL AS scored,
       coalesce(least(width, height) >= $min_side, false) AS side_ok,
       coalesce(height::DOUBLE / nullif(width, 0) BETWEEN $min_ar AND $max_ar, false) AS ar_ok,
       ($aes IS NULL OR coalesce(aesthetic >= $aes, false)) AS aes_ok,
       height::DOUBLE / nullif(width, 0) AS ratio, least(width, height) AS side,
       width * height AS pixels, duplicate_of
FROM m LEFT JOIN {wh} b USING (width, height)
"""


def whatif(run, q: dict) -> dict:
    p = params(q, run)
    wh = run.bucket_table(p["resolution"])
    keep = (run.config.get("dedup") or {}).get("keep", "best")
    drop_dups = (run.config.get("select") or {}).get("drop_duplicates", True)
    with run.session() as s:
        s.q(FLAGS.format(wh=wh), {"min_side": p["min_side"], "min_ar": p["min_aspect_ratio"],
                                  "max_ar": p["max_aspect_ratio"], "aes": p["aesthetic_min"]})
        s.q("CREATE TEMP TABLE f1 AS SELECT *, ok AND scored AND side_ok AND ar_ok AND aes_ok AS passes FROM f0")
        dropped: dict[str, tuple[str, float | None, str]] = {}
        if drop_dups and run.has_pairs and p["dedup_threshold"] is not None:
            order = "pixels DESC NULLS LAST, aesthetic DESC NULLS LAST, key" if keep == "best" else "key"
            s.q("CREATE TEMP TABLE e AS SELECT p.a, p.b, p.similarity, p.kind FROM pairs p "
                "JOIN f1 fa ON fa.key = p.a AND fa.passes JOIN f1 fb ON fb.key = p.b AND fb.passes "
                "WHERE p.similarity >= $t", {"t": p["dedup_threshold"]})
            edges = s.q("SELECT a, b, similarity, kind FROM e")
            nodes = s.q(f"SELECT key FROM f1 WHERE key IN (SELECT a FROM e UNION SELECT b FROM e) ORDER BY {order}")
            dropped = resolve(nodes.column("key").to_pylist(),
                              list(zip(*(edges.column(c).to_pylist() for c in ("a", "b", "similarity", "kind")))))
        elif drop_dups:
            dropped = {r["key"]: (r["duplicate_of"], None, "recorded") for r in
                       s.q("SELECT key, duplicate_of FROM f1 WHERE passes AND duplicate_of IS NOT NULL").to_pylist()}
        s.cur.register("_dropped", pa.table({"key": pa.array(list(dropped), pa.string())}))
        s.q("CREATE TEMP TABLE f AS SELECT f1.*, passes AND d.key IS NULL AS would FROM f1 "
            "LEFT JOIN _dropped d USING (key)")
        totals = s.q("SELECT count(*) FILTER (WHERE would) AS would, count(*) FILTER (WHERE was_selected) AS was, "
                     "count(*) FILTER (WHERE would AND NOT was_selected) AS gained, "
                     "count(*) FILTER (WHERE was_selected AND NOT would) AS lost, count(*) AS rows, "
                     "count(*) FILTER (WHERE passes) AS passes FROM f").to_pylist()[0]
        reasons = s.q("""
            SELECT reason, count(*) AS n FROM (
              SELECT st AS reason FROM f WHERE NOT ok
              UNION ALL SELECT 'not_scored' FROM f WHERE ok AND NOT scored
              UNION ALL SELECT 'too_small' FROM f WHERE ok AND scored AND NOT side_ok
              UNION ALL SELECT 'aspect_ratio' FROM f WHERE ok AND scored AND NOT ar_ok
              UNION ALL SELECT 'low_aesthetic' FROM f WHERE ok AND NOT aes_ok
              UNION ALL SELECT 'duplicate' FROM _dropped)
            GROUP BY 1 ORDER BY 2 DESC, 1""").to_pylist()
        buckets = s.q("SELECT bucket, count(*) FILTER (WHERE would) AS would, count(*) FILTER (WHERE was_selected) AS was "
                      "FROM f WHERE bucket IS NOT NULL AND (would OR was_selected) GROUP BY 1 "
                      "ORDER BY try_cast(bucket AS DOUBLE)").to_pylist()
        margins = _margins(s, p, dropped)
        s.cur.unregister("_dropped")
    return {"params": p, **totals, "reasons": reasons, "buckets": buckets, "margins": margins,
            "dedup": {"dropped": len(dropped), "source": "pairs" if run.has_pairs else "duplicate_of",
                      "applied": bool(drop_dups), "keep": keep},
            "set_line": set_line(run, p)}


def _margins(s, p: dict, dropped: dict) -> list[dict]:
    """Rows on each side of each threshold: what a small move of the slider would add or remove."""
    cols = "key, aesthetic, width, height, ratio, side"
    n = SAMPLES
    out = []

    def add(name, side, sql, params=None):
        rows = s.q(sql, params or {}).to_pylist()
        out.append({"margin": name, "side": side, "rows": rows})

    if p["aesthetic_min"] is not None:
        add("aesthetic_min", "just kept", f"SELECT {cols} FROM f WHERE would ORDER BY aesthetic, key LIMIT {n}")
        add("aesthetic_min", "just rejected", f"SELECT {cols} FROM f WHERE ok AND scored AND side_ok AND ar_ok "
            f"AND NOT aes_ok AND aesthetic IS NOT NULL ORDER BY aesthetic DESC, key LIMIT {n}")
    add("min_side", "just kept", f"SELECT {cols} FROM f WHERE would ORDER BY side, key LIMIT {n}")
    add("min_side", "just rejected", f"SELECT {cols} FROM f WHERE ok AND scored AND ar_ok AND aes_ok AND NOT side_ok "
        f"ORDER BY side DESC, key LIMIT {n}")
    add("aspect ratio", "just kept", f"SELECT {cols} FROM f WHERE would ORDER BY greatest(ratio / $max, $min / ratio) "
        f"DESC, key LIMIT {n}", {"max": p["max_aspect_ratio"], "min": p["min_aspect_ratio"]})
    add("aspect ratio", "just rejected", f"SELECT {cols} FROM f WHERE ok AND scored AND side_ok AND aes_ok AND NOT ar_ok "
        f"ORDER BY greatest(ratio / $max, $min / ratio), key LIMIT {n}",
        {"max": p["max_aspect_ratio"], "min": p["min_aspect_ratio"]})
    if dropped and p["dedup_threshold"] is not None:
        near = sorted(((v[1] if v[1] is not None else 1.0), k, v[0]) for k, v in dropped.items())[:n]
        out.append({"margin": "dedup_threshold", "side": "just dropped (duplicate of a kept row)",
                    "rows": [{"key": k, "kept": kept, "similarity": sim} for sim, k, kept in near]})
        rows = s.q("SELECT p.a AS key, p.b AS other, p.similarity FROM pairs p JOIN f fa ON fa.key = p.a AND fa.would "
                   f"JOIN f fb ON fb.key = p.b AND fb.would WHERE p.similarity < $t ORDER BY p.similarity DESC, p.a "
                   f"LIMIT {n}", {"t": p["dedup_threshold"]}).to_pylist()
        out.append({"margin": "dedup_threshold", "side": "both kept, most similar pairs under the threshold",
                    "rows": rows})
    return out
