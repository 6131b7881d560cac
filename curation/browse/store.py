"""One run's manifest in DuckDB: the table every page of the browser queries.

Built once per server start: the manifest (_sigma.manifest.manifest_dataset, local or object
store, no httpfs) is copied into an in-memory table `m` sorted by key, with every column made
scalar (nested ones as their text) plus `bucket` (_sigma.buckets.assign at one resolution,
done per distinct width x height, not per row). `m` is never written again, so its rowid is the
row's position in key order (paging.py relies on it); ART indexes on key and duplicate_of (and on
the pairs' a and b) make the per-row lookups point reads. Dedup's candidate pairs,
when the run has them, become table `pairs` (a, b, similarity, kind, ra, rb: the rowids of a and b).
Then external file access and Python replacement scans are switched off and the configuration is
locked, so user filters read `m` and `pairs` and nothing else. Each request runs on its own cursor
(DuckDB connections are not shared between threads) with a time limit.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading

import pyarrow as pa
import yaml

from _sigma import fs, manifest
from curation.browse import filters
from curation.browse.filters import FilterError, quote_ident

KEY_RE = re.compile(r"\d{5,}_\d{6}")  # use fullmatch: `$` would let a trailing newline through
# Columns the pages and ready-made filters use; added as typed NULLs when a stage has not run yet.
KNOWN = {"status": "VARCHAR", "error": "VARCHAR", "sha256": "VARCHAR", "width": "BIGINT", "height": "BIGINT",
         "aspect_ratio": "DOUBLE", "aesthetic": "DOUBLE", "duplicate_of": "VARCHAR", "dup_kind": "VARCHAR",
         "dup_similarity": "DOUBLE", "selected": "BOOLEAN", "reject_reason": "VARCHAR", "caption": "VARCHAR",
         "caption_long": "VARCHAR", "caption_short": "VARCHAR", "caption_short_derived": "BOOLEAN",
         "caption_status": "VARCHAR", "caption_model": "VARCHAR", "caption_t5_tokens": "BIGINT",
         "nsfw": "DOUBLE", "watermark": "DOUBLE", "clip_similarity": "DOUBLE", "text_truncated": "BOOLEAN"}
GRID = ("key", "aesthetic", "width", "height", "status", "reject_reason", "bucket", "selected", "duplicate_of",
        "dup_similarity", "caption_status", "caption", "nsfw", "watermark", "clip_similarity")
DERIVED = ("bucket",)
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


def key_list(keys) -> str:
    """SQL literals of row keys: only well-formed keys (digits and '_') pass, so quoting is trivial."""
    return ", ".join(f"'{k}'" for k in keys if isinstance(k, str) and KEY_RE.fullmatch(k))


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

        from curation.browse.paging import Orders

        try:
            self.out = fs.normalize(out)
        except ValueError as e:
            raise RunError(str(e), 400) from None
        try:
            if not fs.isdir(self.out):
                raise RunError(f"no run folder at {self.out}: check --output (a local folder or s3://bucket/prefix)")
            self.parts = manifest.list_parts(self.out)
            if not self.parts:
                raise RunError(f"{self.out} has no manifest yet (no manifest/part-*.parquet): run `python -m "
                               f"curation.run --output {self.out} ...` first (the download stage writes it)", 503)
            self.config = read_config(self.out)
            self.resolution = int(resolution or ((self.config.get("features") or {}).get("resolutions") or [1024])[0])
            self.timeout_s = timeout_s
            self._lock = threading.Lock()
            self.con = duckdb.connect(":memory:")
            self._build()
        except (OSError, pa.ArrowException, duckdb.Error) as e:  # unreachable store, unreadable part, ...
            raise RunError(f"cannot read the run at {self.out}: {type(e).__name__}: {str(e)[:400]}", 503) from None
        self._exec("SET python_enable_replacements = false")
        self._exec("SET enable_external_access = false")
        self._exec("SET lock_configuration = true")
        self.orders = Orders(self)

    # --- build ------------------------------------------------------------------------------
    def _exec(self, sql: str, params: list | None = None) -> list:
        """One statement on the build connection, run to completion (DuckDB 2 keeps a result open
        until it is fetched, and refuses other work on the connection meanwhile)."""
        return self.con.execute(sql, params or []).fetchall()

    def _build(self) -> None:
        ds = manifest.manifest_dataset(self.out)
        have = {f.name for f in ds.schema}
        clash = [c for c in DERIVED if c in have]
        if clash:
            raise RunError(f"the manifest has a column named {clash[0]!r}, which the browser derives itself", 500)
        self.con.register("src", ds)
        sel = []
        for f in ds.schema:
            if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
                continue  # raw bytes have no place in a table of text; none are in the manifest today
            q = quote_ident(f.name)
            sel.append(f"CAST({q} AS VARCHAR) AS {q}" if pa.types.is_nested(f.type) else q)
        sel += [f"NULL::{t} AS {c}" for c, t in KNOWN.items() if c not in have]
        self.has_pairs = self._load_pairs()
        # Small side tables from column-pruned scans (an object-store run reads only these columns).
        sizes = (self._exec("SELECT DISTINCT width, height FROM src WHERE width > 0 AND height > 0")
                 if {"width", "height"} <= have else [])
        self._bucket_table(self.resolution, "wh", sizes)
        self._exec(f"CREATE TABLE m AS SELECT s.*, b.bucket FROM (SELECT {', '.join(sel)} FROM src) s "
                   "LEFT JOIN wh b USING (width, height) ORDER BY key")
        self.con.unregister("src")
        self._exec("CREATE INDEX m_key ON m (key)")
        self._exec("CREATE INDEX m_dup ON m (duplicate_of)")
        self._exec("CREATE TABLE pairs AS SELECT p.a, p.b, p.similarity, p.kind, ma.rowid AS ra, mb.rowid AS rb "
                   "FROM pairs0 p LEFT JOIN m ma ON ma.key = p.a LEFT JOIN m mb ON mb.key = p.b")
        self._exec("DROP TABLE pairs0")
        self._exec("CREATE INDEX pairs_a ON pairs (a)")
        self._exec("CREATE INDEX pairs_b ON pairs (b)")
        self.columns = [(r[0], r[1]) for r in self._exec(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'm' "
            "ORDER BY ordinal_position")]
        self.column_names = [c for c, _ in self.columns]
        self.rows = self._exec("SELECT count(*) FROM m")[0][0]
        for macro in filters.MACROS:
            self._exec(macro)
        self.reasons = [r[0] for r in self._exec(
            "SELECT r, count(*) FROM (SELECT unnest(string_split(reject_reason, ';')) AS r FROM m) "
            "WHERE r <> '' GROUP BY r ORDER BY 2 DESC, 1")]
        r = self._exec("SELECT min(aesthetic) FILTER (WHERE isfinite(aesthetic)), "
                       "max(aesthetic) FILTER (WHERE isfinite(aesthetic)), max(least(width, height)) FROM m")[0]
        self.ranges = {"aes_min": r[0], "aes_max": r[1], "side_max": r[2]}
        f = self._exec("SELECT count(nsfw), count(watermark), count(clip_similarity) FROM m")[0]
        self.ranges["filters"] = {c: bool(n) for c, n in zip(("nsfw", "watermark", "clip_similarity"), f)}
        self.buckets = self._exec("SELECT bucket, count(*) FROM m WHERE bucket IS NOT NULL "
                                  "GROUP BY 1 ORDER BY 2 DESC, 1")

    def _bucket_table(self, resolution: int, name: str, sizes: list[tuple[int, int]]) -> None:
        """Table name(width, height, bucket): _sigma.buckets.assign once per distinct size."""
        from _sigma.buckets import assign

        t = pa.table({"width": pa.array([w for w, _ in sizes], pa.int64()),
                      "height": pa.array([h for _, h in sizes], pa.int64()),
                      "bucket": pa.array([assign(w, h, resolution)[0] for w, h in sizes], pa.string())})
        self.con.register("_wh", t)
        self._exec(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _wh")
        self.con.unregister("_wh")

    def _load_pairs(self) -> bool:
        """pairs0 (a, b, similarity, kind) from <out>/dedup/pairs/*.parquet; the candidate threshold
        from dedup/_done.json (else the lowest near similarity stored)."""
        d = fs.join(self.out, *PAIRS_DIR)
        files = [fs.join(d, n) for n, _ in fs.list_files(d) if n.endswith(".parquet")]
        self.candidate_threshold = None
        if files:
            self.con.register("_pairs", fs.dataset(files))
            self._exec("CREATE TEMP TABLE pairs0 AS SELECT a::VARCHAR AS a, b::VARCHAR AS b, "
                       "similarity::FLOAT AS similarity, kind::VARCHAR AS kind FROM _pairs")
            self.con.unregister("_pairs")
        else:
            self._exec("CREATE TEMP TABLE pairs0 (a VARCHAR, b VARCHAR, similarity FLOAT, kind VARCHAR)")
        done = fs.join(self.out, "dedup", "_done.json")
        if files and fs.exists(done):
            try:
                self.candidate_threshold = float(fs.read_json(done).get("candidate_threshold"))
            except (ValueError, TypeError, OSError):
                pass
        if files and self.candidate_threshold is None:
            self.candidate_threshold = self._exec("SELECT min(similarity) FROM pairs0 WHERE kind = 'near'")[0][0] or 0.9
        return bool(files)

    def bucket_table(self, resolution: int) -> str:
        """Name of the width/height -> bucket table at `resolution` (made on first use)."""
        from _sigma.buckets import TABLES

        if resolution not in TABLES:
            raise FilterError(f"no bucket table for resolution {resolution}; have {sorted(TABLES)}")
        name = f"wh_{resolution}"
        with self._lock:
            if not self._exec("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])[0][0]:
                sizes = self._exec("SELECT width, height FROM wh")  # the distinct sizes of the run
                self._bucket_table(resolution, name, sizes)
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

    def query(self, sql: str, params: list | dict | None = None) -> pa.Table:
        with self.session() as s:
            return s.q(sql, params)

    def filtered(self, where: str, columns: str = "*") -> str:
        """`SELECT columns FROM m WHERE (<filter>)` after the filter's checks (filters.py)."""
        sql = f"SELECT {columns} FROM m WHERE {filters.wrap(filters.normalize(where))}"
        filters.check_single_select(sql)
        return sql

    def count(self, where: str) -> int:
        return self.orders.count(where)

    def page(self, where: str, sort: str = "key", desc: bool = False, offset: int = 0, limit: int = 48) -> dict:
        return self.orders.page(where, sort, desc, offset, limit)

    def dup_counts(self, keys: list[str]) -> tuple[dict, dict]:
        """({key: rows whose duplicate_of is key}, {key: stored candidate pairs with key}) for a page."""
        lit = key_list(keys)
        if not lit:
            return {}, {}
        members = {r["k"]: r["n"] for r in self.query(
            f"SELECT duplicate_of AS k, count(*) AS n FROM m WHERE duplicate_of IN ({lit}) GROUP BY 1").to_pylist()}
        pairs = {r["k"]: r["n"] for r in self.query(
            f"SELECT k, count(*) AS n FROM (SELECT a AS k FROM pairs WHERE a IN ({lit}) UNION ALL "
            f"SELECT b FROM pairs WHERE b IN ({lit})) GROUP BY 1").to_pylist()} if self.has_pairs else {}
        return members, pairs

    def by_keys(self, keys: list[str], columns: str = "*") -> dict[str, dict]:
        """{key: row} for a few keys (an IN list of literals: DuckDB answers it from the key index)."""
        lit = key_list(keys)
        if not lit:
            return {}
        rows = self.query(f"SELECT {columns} FROM m WHERE key IN ({lit})").to_pylist()
        return {r["key"]: r for r in rows}

    def row(self, key: str) -> dict | None:
        """Every column of one row (None when the key is not in the manifest)."""
        r = self.by_keys([key]).get(key)
        return {k: jsonable(v) for k, v in r.items()} if r else None

    def has_key(self, key: str) -> bool:
        return bool(self.by_keys([key], "key"))

    def dup_group(self, key: str) -> dict | None:
        """The row's group: the kept twin, every member pointing at it (with similarity and kind), and
        (with stored pairs) the candidate pairs of the row and of its group with their similarities."""
        r = self.row(key)
        if r is None:
            return None
        kept = r.get("duplicate_of") or key
        cols = "key, aesthetic, width, height, status, selected, reject_reason, duplicate_of, dup_kind, dup_similarity"
        kept_row = self.by_keys([kept], cols).get(kept)
        members = self.query(f"SELECT {cols} FROM m WHERE duplicate_of = ? ORDER BY dup_similarity DESC, key",
                             [kept]).to_pylist()
        out = {"key": key, "kept": jsonable(kept_row) if kept_row else {"key": kept, "missing": True},
               "members": [jsonable(m) for m in members], "pairs": [], "others": [], "has_pairs": self.has_pairs,
               "candidate_threshold": self.candidate_threshold,
               "dedup_threshold": (self.config.get("select") or {}).get("dedup_threshold")}
        if self.has_pairs:
            group = sorted({kept, key, *(m["key"] for m in members)})
            lit = key_list(group)
            pairs = self.query(f"SELECT a, b, similarity, kind FROM pairs WHERE a IN ({lit}) OR b IN ({lit}) "
                               "ORDER BY similarity DESC, a, b LIMIT 200").to_pylist()
            others = sorted(({p["a"] for p in pairs} | {p["b"] for p in pairs}) - set(group))
            info = self.by_keys(others, cols)
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
                "select": sel, "ranges": jsonable(self.ranges),
                "buckets": [{"bucket": b, "rows": n} for b, n in self.buckets]}
