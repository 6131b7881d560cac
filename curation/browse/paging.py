"""Paging over `m` that stays fast at millions of rows.

`m` is sorted by key and never modified, so its rowid is the position in key order: the default
view (no filter, sorted by key) is a rowid range, read from zone maps without a scan. Any other
(filter, sort, direction) is materialised once as a table of keys in display order (`CREATE TABLE
o_<hash> AS SELECT key FROM m WHERE <filter> ORDER BY <sort>, key`, its rowid = the position):
one sort on first use (the filter's count comes with it), then every page, first, middle or last,
is a rowid range of that table plus one IN-list lookup of its keys in `m` through the key index.
The most recent MAX_ORDERS orderings are kept (~20 MB per million rows each), older ones dropped.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from curation.browse import filters
from curation.browse.filters import FilterError, quote_ident

MAX_ORDERS = 8
MAX_LIMIT = 500


class Orders:
    def __init__(self, run):
        self.run = run
        self._lru: OrderedDict[str, int] = OrderedDict()  # table name -> rows
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _table(self, where: str, sort: str, desc: bool) -> tuple[str, int]:
        """(name, rows) of the key table for this ordering, built on first use."""
        d = "DESC" if desc else "ASC"
        order = f"{quote_ident(sort)} {d} NULLS LAST" + ("" if sort == "key" else f", key {d}")
        name = "o_" + hashlib.sha1(f"{where}\0{sort}\0{d}".encode()).hexdigest()[:16]
        with self._guard:
            if name in self._lru:
                self._lru.move_to_end(name)
                return name, self._lru[name]
        sql = self.run.filtered(where, "key")  # refused filters stop here, before any lock
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # one build per ordering, however many requests ask for it at once
            with self._guard:
                if name in self._lru:
                    return name, self._lru[name]
            try:
                with self.run.session() as s:
                    s.q(f"CREATE TABLE {name} AS {sql} ORDER BY {order}")
                    n = s.q(f"SELECT count(*) AS n FROM {name}").column("n")[0].as_py()
            except BaseException:
                with self._guard:
                    self._locks.pop(name, None)
                raise
            with self._guard:
                self._lru[name] = n
                while len(self._lru) > MAX_ORDERS:
                    old, _ = self._lru.popitem(last=False)
                    self._locks.pop(old, None)
                    self.run.query(f"DROP TABLE IF EXISTS {old}")
        return name, n

    def count(self, where: str) -> int:
        w = filters.normalize(where)
        return self.run.rows if w == "true" else self._table(w, "key", False)[1]

    def page(self, where: str, sort: str = "key", desc: bool = False, offset: int = 0, limit: int = 48) -> dict:
        """One page of grid rows under a filter and a sort (any column; nulls last; key breaks ties)."""
        from curation.browse.store import GRID, jsonable

        run = self.run
        if sort not in run.column_names:
            raise FilterError(f"unknown sort column {sort!r}")
        offset, limit = max(0, int(offset)), min(max(1, int(limit)), MAX_LIMIT)
        w = filters.normalize(where)
        if w == "true" and sort == "key":  # the table's own order: a rowid range
            total = run.rows
            lo, hi = (offset, offset + limit - 1) if not desc else (total - offset - limit, total - offset - 1)
            keys = run.query("SELECT key FROM m WHERE rowid BETWEEN $lo AND $hi ORDER BY rowid",
                             {"lo": max(lo, 0), "hi": hi}).column("key").to_pylist()
            keys = keys[::-1] if desc else keys
        else:
            name, total = self._table(w, sort, desc)
            keys = run.query(f"SELECT key FROM {name} WHERE rowid BETWEEN $lo AND $hi ORDER BY rowid",
                             {"lo": offset, "hi": offset + limit - 1}).column("key").to_pylist()
        cols = [c for c in GRID if c in run.column_names] + ([sort] if sort not in GRID else [])
        found = run.by_keys(keys, ", ".join(quote_ident(c) for c in cols))
        members, pairs = run.dup_counts(keys)
        rows = [jsonable({**found[k], "dup_members": members.get(k, 0), "dup_pairs": pairs.get(k, 0)})
                for k in keys if k in found]
        return {"count": total, "offset": offset, "limit": limit, "rows": rows}
