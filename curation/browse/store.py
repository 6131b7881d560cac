"""One run's manifest in DuckDB: the table every page of the browser queries.

Built once per server start: the manifest (common.manifest.manifest_dataset, local or object
store, no httpfs) is copied into an in-memory table `m` sorted by key, with every column made
scalar (nested ones as their text) plus `bucket` (features.buckets.assign at one resolution, done
per distinct width x height, not per row). Dedup's candidate pairs, when the run has them, become
table `pairs` (a, b, similarity, kind). Then external file access is switched off and the
configuration locked, so user filters can read `m` and `pairs` and nothing else.
Each request runs on its own cursor (DuckDB connections are not shared between threads) with a
time limit.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading
from collections import OrderedDict

import pyarrow as pa
import yaml

from common import fs, manifest
from curation.browse import filters
from curation.browse.filters import FilterError, quote_ident

KEY_RE = re.compile(r"^\d{5,}_\d{6}$")
# Columns the pages and ready-made filters use; added as typed NULLs when a stage has not run yet.
KNOWN = {"status": "VARCHAR", "error": "VARCHAR", "sha256": "VARCHAR", "width": "BIGINT", "height": "BIGINT",
         "aspect_ratio": "DOUBLE", "aesthetic": "DOUBLE", "duplicate_of": "VARCHAR", "dup_kind": "VARCHAR",
         "dup_similarity": "DOUBLE", "selected": "BOOLEAN", "reject_reason": "VARCHAR", "caption": "VARCHAR",
         "caption_long": "VARCHAR", "caption_short": "VARCHAR", "caption_short_derived": "BOOLEAN",
         "caption_status": "VARCHAR", "caption_model": "VARCHAR", "caption_t5_tokens": "BIGINT"}
GRID = ("key", "aesthetic", "width", "height", "status", "reject_reason", "bucket", "selected", "duplicate_of",
        "dup_similarity", "caption_status", "caption")
PAIRS_DIR = ("dedup", "pairs")


class RunError(Exception):
    """The run cannot be browsed (yet): shown as a page, never a traceback."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


def jsonable(v):
    """Values for JSON: non-finite floats as text (JSON has no NaN), bytes as a length."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def part_of(key: str) -> int:
    """Key `PPPPP_RRRRRR` -> manifest part."""
    return int(key.split("_", 1)[0])


def read_config(out: str) -> dict:
    """The run's resolved config (config.resolved.yaml), {} when absent or unreadable."""
    uri = fs.join(out, "config.resolved.yaml")
    try:
        doc = yaml.safe_load(fs.read_text(uri)) if fs.exists(uri) else {}
    except (OSError, yaml.YAMLError):
        return {}
    return (doc or {}).get("resolved") or {}


class _Session:
    def __init__(self, cur, timeout_s: float):
        self.cur, self.timeout_s = cur, timeout_s

    def q(self, sql: str, params: list | dict | None = None) -> pa.Table:
        import duckdb

        try:
            rel = self.cur.sql(sql, params=params or None)  # DDL runs at once; a SELECT on fetch
            return rel.to_arrow_table() if rel is not None else pa.table({})
        except duckdb.InterruptException:
            raise FilterError(f"query stopped after {self.timeout_s:g} s") from None
        except duckdb.Error as e:
            raise FilterError(filters.first_line(e)) from None


class Run:
    def __init__(self, out: str, resolution: int | None = None, timeout_s: float = 30.0):
        import duckdb

        try:
            self.out = fs.normalize(out)
        except ValueError as e:
            raise RunError(str(e), 400) from None
        if not fs.isdir(self.out):
            raise RunError(f"no run folder at {self.out}: check --output (a local folder or s3://bucket/prefix)")
        self.parts = manifest.list_parts(self.out)
        if not self.parts:
            raise RunError(f"{self.out} has no manifest yet (no manifest/part-*.parquet): run "
                           f"`python -m curation.run --output {self.out} ...` first (the download stage writes it)", 503)
        self.config = read_config(self.out)
        self.resolution = int(resolution or (self.config.get("features", {}).get("resolutions") or [1024])[0])
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._counts: OrderedDict[str, int] = OrderedDict()
        self.con = duckdb.connect(":memory:")
        self._build()
        self._exec("SET python_enable_replacements = false")
        self._exec("SET enable_external_access = false")
        self._exec("SET lock_configuration = true")

    # --- build ------------------------------------------------------------------------------
    def _exec(self, sql: str, params: list | None = None) -> list:
        """One statement on the build connection, run to completion (DuckDB 2 keeps a result open
        until it is fetched, and refuses other work on the connection meanwhile)."""
        return self.con.execute(sql, params or []).fetchall()

    def _build(self) -> None:
        ds = manifest.manifest_dataset(self.out)
        self.con.register("src", ds)
        sel, types = [], {}
        for f in ds.schema:
            if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
                continue  # raw bytes have no place in a table of text; none are in the manifest today
            nested = pa.types.is_nested(f.type)
            sel.append(f"CAST({quote_ident(f.name)} AS VARCHAR) AS {quote_ident(f.name)}" if nested
                       else quote_ident(f.name))
        have = {f.name for f in ds.schema}
        sel += [f"NULL::{t} AS {c}" for c, t in KNOWN.items() if c not in have]
        self._exec(f"CREATE TEMP TABLE m0 AS SELECT {', '.join(sel)} FROM src")
        self.con.unregister("src")
        self._bucket_table(self.resolution, name="wh")
        bucket = "b.bucket" if "bucket" not in have else "b.bucket AS aspect_bucket"
        self._exec(f"CREATE TABLE m AS SELECT m0.*, {bucket} FROM m0 LEFT JOIN wh b USING (width, height) "
                         "ORDER BY key")
        self._exec("DROP TABLE m0")
        self.columns = [(r[0], r[1]) for r in self._exec(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'm' "
            "ORDER BY ordinal_position")]
        self.column_names = [c for c, _ in self.columns]
        self.rows = self._exec("SELECT count(*) FROM m")[0][0]
        self.has_pairs = self._load_pairs()
        for macro in filters.MACROS:
            self._exec(macro)
        self.reasons = [r[0] for r in self._exec(
            "SELECT r, count(*) FROM (SELECT unnest(string_split(reject_reason, ';')) AS r FROM m) "
            "WHERE r <> '' GROUP BY r ORDER BY 2 DESC, 1")]
        r = self._exec("SELECT min(aesthetic) FILTER (WHERE isfinite(aesthetic)), "
                       "max(aesthetic) FILTER (WHERE isfinite(aesthetic)), max(least(width, height)) FROM m")[0]
        self.ranges = {"aes_min": r[0], "aes_max": r[1], "side_max": r[2]}
        self.buckets = self._exec("SELECT bucket, count(*) FROM m WHERE bucket IS NOT NULL "
                                  "GROUP BY 1 ORDER BY 2 DESC, 1")

    def _bucket_table(self, resolution: int, name: str) -> None:
        """Table name(width, height, bucket): features.buckets.assign per distinct size."""
        from features.buckets import assign

        sizes = self._exec(f"SELECT DISTINCT width, height FROM {'m0' if name == 'wh' else 'm'} "
                           "WHERE width > 0 AND height > 0")
        t = pa.table({"width": pa.array([w for w, _ in sizes], pa.int64()),
                      "height": pa.array([h for _, h in sizes], pa.int64()),
                      "bucket": pa.array([assign(w, h, resolution)[0] for w, h in sizes], pa.string())})
        self.con.register("_wh", t)
        self._exec(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _wh")
        self.con.unregister("_wh")

    def _load_pairs(self) -> bool:
        d = fs.join(self.out, *PAIRS_DIR)
        files = [fs.join(d, n) for n, _ in fs.list_files(d) if n.endswith(".parquet")]
        self.candidate_threshold = None
        if files:
            self.con.register("_pairs", fs.dataset(files))
            self._exec("CREATE TABLE pairs AS SELECT a, b, similarity::FLOAT AS similarity, kind FROM _pairs")
            self.con.unregister("_pairs")
        else:
            self._exec("CREATE TABLE pairs (a VARCHAR, b VARCHAR, similarity FLOAT, kind VARCHAR)")
        done = fs.join(self.out, "dedup", "_done.json")
        if files and fs.exists(done):
            try:
                self.candidate_threshold = float(fs.read_json(done).get("candidate_threshold"))
            except (ValueError, TypeError, OSError):
                pass
        if files and self.candidate_threshold is None:
            self.candidate_threshold = self._exec(
                "SELECT min(similarity) FROM pairs WHERE kind = 'near'")[0][0] or 0.9
        return bool(files)

    def bucket_table(self, resolution: int) -> str:
        """Name of the width/height -> bucket table at `resolution` (made on first use)."""
        from features.buckets import TABLES

        if resolution not in TABLES:
            raise FilterError(f"no bucket table for resolution {resolution}; have {sorted(TABLES)}")
        name = f"wh_{resolution}"
        with self._lock:
            if not self._exec("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])[0][0]:
                self._bucket_table(resolution, name)
        return name

    # --- queries ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self):
        """A fresh cursor (temp tables live as long as it), interrupted after timeout_s; DuckDB
        errors become FilterError carrying DuckDB's own first lines."""
        cur = self.con.cursor()
        timer = threading.Timer(self.timeout_s, cur.interrupt)
        timer.start()
        try:
            yield _Session(cur, self.timeout_s)
        finally:
            timer.cancel()
            cur.close()

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        with self.session() as s:
            return s.q(sql, params)

    def _filtered(self, where: str) -> str:
        w = filters.normalize(where)
        sql = f"SELECT * FROM m WHERE {filters.wrap(w)}"
        filters.check_single_select(sql)
        return sql

    def count(self, where: str) -> int:
        w = filters.normalize(where)
        with self._lock:
            if w in self._counts:
                self._counts.move_to_end(w)
                return self._counts[w]
        n = self.query(f"SELECT count(*) AS n FROM ({self._filtered(w)})").column("n")[0].as_py()
        with self._lock:
            self._counts[w] = n
            while len(self._counts) > 256:
                self._counts.popitem(last=False)
        return n

    def page(self, where: str, sort: str = "key", desc: bool = False, offset: int = 0, limit: int = 48) -> dict:
        """One page of grid rows under a filter and sort (any column; nulls last; key breaks ties)."""
        if sort not in self.column_names:
            raise FilterError(f"unknown sort column {sort!r}")
        offset, limit = max(0, int(offset)), min(max(1, int(limit)), 500)
        d = "DESC" if desc else "ASC"
        cols = [c for c in GRID if c in self.column_names]
        if sort not in cols:
            cols.append(sort)
        order = f"{quote_ident(sort)} {d} NULLS LAST" + ("" if sort == "key" else f", key {d}")
        sql = (f"SELECT {', '.join(quote_ident(c) for c in cols)} FROM ({self._filtered(where)}) "
               f"ORDER BY {order} LIMIT {limit} OFFSET {offset}")
        rows = self.query(sql).to_pylist()
        total = self.count(where)
        self._annotate_dups(rows)
        return {"count": total, "offset": offset, "limit": limit, "rows": [jsonable(r) for r in rows]}

    def _annotate_dups(self, rows: list[dict]) -> None:
        """dup_members: rows pointing at this one; pairs: candidate pairs it is in (page keys only)."""
        keys = [r["key"] for r in rows]
        if not keys:
            return
        members = {r["k"]: r["n"] for r in self.query(
            "SELECT duplicate_of AS k, count(*) AS n FROM m WHERE duplicate_of IN (SELECT unnest(?::VARCHAR[])) "
            "GROUP BY 1", [keys]).to_pylist()}
        pairs = {}
        if self.has_pairs:
            pairs = {r["k"]: r["n"] for r in self.query(
                "SELECT k, count(*) AS n FROM (SELECT a AS k FROM pairs UNION ALL SELECT b FROM pairs) "
                "WHERE k IN (SELECT unnest(?::VARCHAR[])) GROUP BY 1", [keys]).to_pylist()}
        for r in rows:
            r["dup_members"] = members.get(r["key"], 0)
            r["pairs"] = pairs.get(r["key"], 0)

    def row(self, key: str) -> dict | None:
        """Every column of one row (None when the key is not in the manifest)."""
        if not KEY_RE.match(key or ""):
            return None
        t = self.query("SELECT * FROM m WHERE key = ?", [key]).to_pylist()
        return {k: jsonable(v) for k, v in t[0].items()} if t else None

    def has_key(self, key: str) -> bool:
        return bool(KEY_RE.match(key or "")) and self.query(
            "SELECT count(*) AS n FROM m WHERE key = ?", [key]).column("n")[0].as_py() > 0

    def dup_group(self, key: str) -> dict | None:
        """The row's group: the kept twin, every member pointing at it (with similarity and kind), and
        (with stored pairs) the candidate pairs of the row and of its group with their similarities."""
        r = self.row(key)
        if r is None:
            return None
        kept = r.get("duplicate_of") or key
        cols = "key, aesthetic, width, height, status, selected, reject_reason, duplicate_of, dup_kind, dup_similarity"
        kept_row = self.query(f"SELECT {cols} FROM m WHERE key = ?", [kept]).to_pylist()
        members = self.query(f"SELECT {cols} FROM m WHERE duplicate_of = ? ORDER BY dup_similarity DESC, key",
                             [kept]).to_pylist()
        out = {"key": key, "kept": jsonable(kept_row[0]) if kept_row else {"key": kept, "missing": True},
               "members": [jsonable(m) for m in members], "pairs": [], "has_pairs": self.has_pairs,
               "candidate_threshold": self.candidate_threshold,
               "dedup_threshold": (self.config.get("select") or {}).get("dedup_threshold")}
        if self.has_pairs:
            group = [kept] + [m["key"] for m in members] + [key]
            pairs = self.query(
                "SELECT p.a, p.b, p.similarity, p.kind FROM pairs p WHERE p.a IN (SELECT unnest(?::VARCHAR[])) "
                "OR p.b IN (SELECT unnest(?::VARCHAR[])) ORDER BY p.similarity DESC, p.a, p.b LIMIT 200",
                [group, group]).to_pylist()
            others = sorted(({p["a"] for p in pairs} | {p["b"] for p in pairs}) - set(group))
            info = {x["key"]: x for x in self.query(f"SELECT {cols} FROM m WHERE key IN (SELECT unnest(?::VARCHAR[]))",
                                                   [others]).to_pylist()}
            out["pairs"] = [jsonable(p) for p in pairs]
            out["others"] = [jsonable(info[k]) for k in others if k in info]
        return out

    def info(self) -> dict:
        sel = self.config.get("select") or {}
        t5_max = ((self.config.get("caption") or {}).get("quality") or {}).get("max_t5_tokens", 300)
        return {"out": self.out, "name": self.config.get("name"), "rows": self.rows, "parts": len(self.parts),
                "columns": [{"name": c, "type": t} for c, t in self.columns], "resolution": self.resolution,
                "presets": filters.presets(self.reasons, self.buckets, set(self.column_names), t5_max),
                "has_pairs": self.has_pairs, "candidate_threshold": self.candidate_threshold,
                "select": sel, "ranges": jsonable(self.ranges), "buckets": [{"bucket": b, "rows": n} for b, n in self.buckets]}
