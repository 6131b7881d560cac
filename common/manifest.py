"""The manifest: one parquet file per part, exactly one row per input row. Only module that reads
or writes `manifest/` and `embeddings/`.

Stages add columns; each part's parquet metadata records a fingerprint per finished stage, so a
rerun skips parts whose stage fingerprint matches (resume) and recomputes stale ones (config
changed). Every write is temp file + os.replace, so a SIGKILL leaves either the old or the new
part, never a torn one.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest"
EMBEDDINGS = "embeddings"
_META_KEY = b"sigma.stages"
_PART_RE = re.compile(r"part-(\d{5})\.parquet$")


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def part_path(out: Path, part: int) -> Path:
    return Path(out) / MANIFEST / part_name(part)


def manifest_glob(out: Path) -> str:
    """The one glob DuckDB needs: read_parquet(glob, union_by_name=true)."""
    return str(Path(out) / MANIFEST / "part-*.parquet")


def list_parts(out: Path) -> list[int]:
    d = Path(out) / MANIFEST
    if not d.exists():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _PART_RE.match(p.name)))


def _atomic_write_table(table: pa.Table, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, target)


def part_fingerprints(out: Path, part: int) -> dict[str, str]:
    """{stage: fingerprint} of the stages finished on this part ({} if the part does not exist)."""
    p = part_path(out, part)
    if not p.exists():
        return {}
    meta = pq.read_schema(p).metadata or {}
    return json.loads(meta.get(_META_KEY, b"{}"))


def stage_done(out: Path, part: int, stage: str, fp: str) -> bool:
    return part_fingerprints(out, part).get(stage) == fp


def read_part(out: Path, part: int, columns: list[str] | None = None) -> pa.Table:
    table = pq.read_table(part_path(out, part), columns=columns)
    return table.replace_schema_metadata(None)


def write_part(out: Path, part: int, table: pa.Table, stage: str, fp: str, keep: dict | None = None) -> None:
    """Write a whole part, recording `stage` as done with fingerprint `fp`.

    `keep` carries the fingerprints of earlier stages (by default those already on disk).
    """
    if table.num_rows and len(set(table.column("key").to_pylist())) != table.num_rows:
        raise ValueError(f"manifest part {part}: duplicate keys")
    stages = dict(part_fingerprints(out, part) if keep is None else keep)
    stages[stage] = fp
    table = table.replace_schema_metadata({_META_KEY: json.dumps(stages).encode()})
    _atomic_write_table(table, part_path(out, part))
    _maybe_kill(stage)


_writes: dict[str, int] = {}


def _maybe_kill(stage: str) -> None:
    """Fault injection for the resume tests: SIGMA_KILL_AT=stage:n SIGKILLs this process right
    after the n-th part commit of `stage` (a real SIGKILL, at a reproducible point)."""
    spec = os.environ.get("SIGMA_KILL_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == stage:
        _writes[stage] = _writes.get(stage, 0) + 1
        if _writes[stage] >= int(n or 1):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def merge_columns(base: pa.Table, new: pa.Table) -> pa.Table:
    """Left-join `new` (key + columns) onto `base` by key, replacing columns of the same name.

    Rows of `base` without a match get nulls; row order and count of `base` never change.
    """
    new_cols = [c for c in new.column_names if c != "key"]
    base = base.drop_columns([c for c in new_cols if c in base.column_names])
    if not new_cols:
        return base
    index = {k: i for i, k in enumerate(new.column("key").to_pylist())}
    take = pa.array([index.get(k) for k in base.column("key").to_pylist()], type=pa.int64())
    picked = new.select(new_cols).take(take)  # null index -> null row
    for name in new_cols:
        base = base.append_column(picked.schema.field(name), picked.column(name))
    return base


def update_part(out: Path, part: int, new: pa.Table, stage: str, fp: str) -> pa.Table:
    """Add/replace a stage's columns on a part (joined by key) and mark the stage done."""
    merged = merge_columns(read_part(out, part), new)
    write_part(out, part, merged, stage, fp)
    return merged


def read_manifest(out: Path, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest as one table (columns missing in some parts become nulls)."""
    parts = list_parts(out)
    if not parts:
        return pa.table({"key": pa.array([], pa.string())})
    tables = []
    for p in parts:
        t = read_part(out, p)
        if columns is not None:
            t = t.select([c for c in columns if c in t.column_names])
        tables.append(t)
    return pa.concat_tables(tables, promote_options="permissive")


def check_invariants(out: Path, expected_rows: int | None = None) -> dict:
    """Invariant: one row per input row, unique keys, every row has a status."""
    t = read_manifest(out, ["key", "status"])
    keys = t.column("key").to_pylist()
    problems = []
    if len(set(keys)) != len(keys):
        problems.append(f"{len(keys) - len(set(keys))} duplicate keys")
    if expected_rows is not None and len(keys) != expected_rows:
        problems.append(f"{len(keys)} manifest rows for {expected_rows} input rows")
    if "status" in t.column_names and t.column("status").null_count:
        problems.append(f"{t.column('status').null_count} rows without a status")
    if problems:
        raise AssertionError("manifest invariant broken: " + "; ".join(problems))
    return {"rows": len(keys)}


# --- CLIP image embeddings: embeddings/part-NNNNN.npz (keys: str, embeddings: float16 L2-normalised)

def embeddings_path(out: Path, part: int) -> Path:
    return Path(out) / EMBEDDINGS / f"part-{part:05d}.npz"


def write_embeddings(out: Path, part: int, keys: Iterable[str], emb: np.ndarray) -> None:
    keys = np.asarray(list(keys), dtype=str)
    emb = np.asarray(emb, dtype=np.float16).reshape(len(keys), -1) if len(keys) else np.zeros((0, 0), np.float16)
    target = embeddings_path(out, part)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, keys=keys, embeddings=emb)
    os.replace(tmp, target)


def read_embeddings(out: Path, parts: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys (N,) str, embeddings (N, D) float16) over the given parts (default: all)."""
    d = Path(out) / EMBEDDINGS
    if parts is None:
        files = sorted(d.glob("part-*.npz")) if d.exists() else []
    else:
        files = [embeddings_path(out, p) for p in parts if embeddings_path(out, p).exists()]
    keys, embs = [], []
    for f in files:
        with np.load(f) as z:
            if len(z["keys"]):
                keys.append(z["keys"])
                embs.append(z["embeddings"])
    if not keys:
        return np.zeros((0,), dtype=str), np.zeros((0, 0), dtype=np.float16)
    return np.concatenate(keys), np.concatenate(embs)
