"""The manifest: one parquet file per part, exactly one row per input row. Only module that reads
or writes `manifest/` and `embeddings/` (local folders or object-store prefixes, via _sigma.fs).

Stages add columns; each part's parquet metadata records a fingerprint per finished stage, so a
rerun skips parts whose stage fingerprint matches (resume) and recomputes stale ones (config
changed), and a small per-part summary (rows, statuses, selected) so that the driver can report a
whole run from the parquet footers alone, never reading row data. Parts are written by the Ray
worker that computed them, each as one atomic commit (_sigma.fs.write_parquet).

Integrity: every part written records its size and sha256 in a sidecar
`manifest/_sums/part-NNNNN.json`, written just before the part (with the previous record kept,
so a kill between the two writes leaves a part that still verifies). `read_part` checks the bytes
it read against it and raises CorruptPartError naming the file; `part_problem` says why a part
cannot be trusted (the download stage rebuilds such parts). Parts without a record (written by
older code or by hand) are read unverified.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from _sigma import fs

MANIFEST = "manifest"
EMBEDDINGS = "embeddings"
_META_KEY = b"sigma.stages"
_SUMMARY_KEY = b"sigma.summary"
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")  # 5 digits, more from part 100000 on
SUMS = "_sums"


class CorruptPartError(ValueError):
    """A manifest part that is unreadable or differs from the size/sha256 recorded when written."""


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def part_uri(out: str, part: int) -> str:
    return fs.join(fs.normalize(out), MANIFEST, part_name(part))


def manifest_glob(out: str) -> str:
    """The glob DuckDB reads a local manifest with: read_parquet(glob, union_by_name=true)."""
    return fs.join(fs.normalize(out), MANIFEST, "part-*.parquet")


def list_parts(out: str) -> list[int]:
    names = fs.listdir(fs.join(fs.normalize(out), MANIFEST))
    return sorted(int(m.group(1)) for n in names if (m := _PART_RE.match(n)))


def part_files(out: str) -> list[str]:
    return [part_uri(out, p) for p in list_parts(out)]


def manifest_dataset(out: str):
    """The whole manifest as a lazy pyarrow dataset (local or object store) for DuckDB:
    `con.register('manifest', manifest_dataset(out))`. Columns missing in some parts read as null."""
    import pyarrow.dataset as pads

    files = part_files(out)
    if not files:
        raise FileNotFoundError(f"{out}: no manifest parts yet")
    schemas = [fs.read_parquet_schema(f).remove_metadata() for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    fsys, _ = fs.resolve(files[0])
    return pads.dataset([fs.resolve(f)[1] for f in files], schema=schema, filesystem=fsys, format="parquet")


def sums_uri(out: str, part: int) -> str:
    return fs.join(fs.normalize(out), MANIFEST, SUMS, f"part-{part:05d}.json")


def _record(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_sums(out: str, part: int) -> dict | None:
    try:
        return fs.read_json(sums_uri(out, part))
    except (OSError, ValueError):
        return None


def _mismatch(uri: str, data: bytes, rec: dict) -> str | None:
    got = _record(data)
    accepted = [rec] + ([rec["previous"]] if rec.get("previous") else [])
    if any(got["size"] == r["size"] and got["sha256"] == r["sha256"] for r in accepted):
        return None
    if all(got["size"] != r["size"] for r in accepted):
        return f"{uri}: {got['size']} bytes, {rec['size']} recorded when it was written (truncated or overwritten)"
    return f"{uri}: sha256 differs from the one recorded when it was written (corrupt)"


def recorded_problem(uri: str, record_uri: str) -> str | None:
    """Why the file at `uri` cannot be trusted against its size/sha256 record at `record_uri`
    (missing, no usable record, size or sha256 mismatch), or None. Manifest parts and input parts
    (curation/inputs.py) are both checked here."""
    try:
        data = fs.read_bytes(uri)
    except OSError:
        return f"{uri}: missing"
    try:
        rec = fs.read_json(record_uri)
    except (OSError, ValueError):
        rec = None
    if not isinstance(rec, dict) or not {"size", "sha256"} <= set(rec):
        return f"{uri}: no size/sha256 record ({record_uri}), cannot be verified"
    return _mismatch(uri, data, rec)


def part_problem(out: str, part: int) -> str | None:
    """Why part `part` cannot be trusted (missing, no record, size or sha256 mismatch), or None."""
    return recorded_problem(part_uri(out, part), sums_uri(out, part))


def _meta(out: str, part: int) -> dict:
    uri = part_uri(out, part)
    try:
        meta = fs.read_parquet_schema(uri).metadata or {}
    except (OSError, ValueError, pa.ArrowException):  # missing, or unreadable: not done
        return {}
    return meta


def part_fingerprints(out: str, part: int) -> dict[str, str]:
    """{stage: fingerprint} of the stages finished on this part ({} if the part does not exist)."""
    return json.loads(_meta(out, part).get(_META_KEY, b"{}"))


def part_summary(out: str, part: int) -> dict:
    """{rows, status: {status: n}, selected} recorded at the part's last commit ({} if absent)."""
    return json.loads(_meta(out, part).get(_SUMMARY_KEY, b"{}"))


def stage_done(out: str, part: int, stage: str, fp: str) -> bool:
    return part_fingerprints(out, part).get(stage) == fp


def read_part(out: str, part: int, columns: list[str] | None = None) -> pa.Table:
    """One part (optionally only `columns` that exist in it), without the footer metadata.
    Verified against its size/sha256 record: CorruptPartError names the file otherwise."""
    uri = part_uri(out, part)
    data = fs.read_bytes(uri)
    rec = _read_sums(out, part)
    problem = _mismatch(uri, data, rec) if rec is not None else None
    if problem:
        raise CorruptPartError(f"{problem}; rerun the download stage, it rebuilds corrupt parts")
    try:
        if columns is not None:
            have = set(pq.read_schema(pa.BufferReader(data)).names)
            columns = [c for c in columns if c in have]
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, ValueError) as e:
        raise CorruptPartError(f"{uri}: unreadable parquet ({str(e).splitlines()[0]}); rerun the download "
                               "stage, it rebuilds corrupt parts") from None
    return table.replace_schema_metadata(None)


def summarize_table(table: pa.Table) -> dict:
    """The per-part summary stored in the footer: what the driver aggregates for a run's report."""
    s: dict = {"rows": table.num_rows}
    if "status" in table.column_names:
        s["status"] = {k: v for k, v in Counter(table.column("status").to_pylist()).items() if k is not None}
    if "selected" in table.column_names:
        s["selected"] = int(pc.sum(pc.cast(table.column("selected"), pa.int64())).as_py() or 0)
    return s


def check_part(table: pa.Table, part: int, expected_rows: int | None = None) -> None:
    """Invariants of one part: unique keys, every row has a status, the input's row count."""
    problems = []
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() != table.num_rows:
        problems.append("duplicate keys")
    if expected_rows is not None and table.num_rows != expected_rows:
        problems.append(f"{table.num_rows} rows for {expected_rows} input rows")
    if "status" in table.column_names and table.column("status").null_count:
        problems.append(f"{table.column('status').null_count} rows without a status")
    if problems:
        raise ValueError(f"manifest part {part}: " + "; ".join(problems))


def write_part(out: str, part: int, table: pa.Table, stage: str, fp: str, keep: dict | None = None,
               expected_rows: int | None = None) -> dict:
    """Write a whole part atomically, recording `stage` as done with fingerprint `fp`.

    `keep` carries the fingerprints of earlier stages (by default those already on disk). Returns
    the part's summary (what the worker reports back to the driver)."""
    if table.num_rows:
        check_part(table, part, expected_rows)
    stages = dict(part_fingerprints(out, part) if keep is None else keep)
    stages[stage] = fp
    summary = summarize_table(table)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(stages).encode(),
                                           _SUMMARY_KEY: json.dumps(summary).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    old = _read_sums(out, part)
    prev = {"size": old["size"], "sha256": old["sha256"]} if old else None
    fs.write_json(sums_uri(out, part), {**_record(data), "previous": prev})  # before the part: see module doc
    fs.write_bytes(part_uri(out, part), data)
    return summary


def merge_columns(base: pa.Table, new: pa.Table) -> pa.Table:
    """Left-join `new` (key + columns) onto `base` by key, replacing columns of the same name.

    Rows of `base` without a match get nulls; row order and count of `base` never change.
    """
    new_cols = [c for c in new.column_names if c != "key"]
    base = base.drop_columns([c for c in new_cols if c in base.column_names])
    if not new_cols:
        return base
    take = pc.index_in(base.column("key"), value_set=new.column("key"))  # (n_base,) int32, null = no match
    picked = new.select(new_cols).take(take)  # null index -> null row
    for name in new_cols:
        base = base.append_column(picked.schema.field(name), picked.column(name))
    return base


def update_part(out: str, part: int, new: pa.Table, stage: str, fp: str) -> pa.Table:
    """Add/replace a stage's columns on a part (joined by key) and mark the stage done."""
    merged = merge_columns(read_part(out, part), new)
    write_part(out, part, merged, stage, fp)
    return merged


def run_summary(out: str, parts: Iterable[int] | None = None) -> dict:
    """Rows, statuses and selected counts over parts, from the footers only."""
    rows, status, selected, have_sel = 0, Counter(), 0, False
    for p in (list_parts(out) if parts is None else parts):
        s = part_summary(out, p)
        rows += s.get("rows", 0)
        status.update(s.get("status", {}))
        if "selected" in s:
            have_sel, selected = True, selected + s["selected"]
    return {"rows": rows, "status": dict(status), "selected": selected if have_sel else None}


def read_manifest(out: str, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest as one table (columns missing in some parts become nulls).

    For tests, reports over small runs and interactive use: stage code works part by part on
    workers and never calls this."""
    parts = list_parts(out)
    if not parts:
        return pa.table({"key": pa.array([], pa.string())})
    tables = [read_part(out, p, columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive")


def check_invariants(out: str, expected_rows: int | None = None) -> dict:
    """One row per input row, unique keys, every row has a status (from the footers)."""
    s = run_summary(out)
    problems = []
    if expected_rows is not None and s["rows"] != expected_rows:
        problems.append(f"{s['rows']} manifest rows for {expected_rows} input rows")
    missing = s["rows"] - sum(s["status"].values())
    if s["status"] and missing:
        problems.append(f"{missing} rows without a status")
    if problems:
        raise AssertionError("manifest invariant broken: " + "; ".join(problems))
    return {"rows": s["rows"]}


# --- CLIP image embeddings: embeddings/part-NNNNN.npz (keys: str, embeddings: float16 L2-normalised)

def embeddings_uri(out: str, part: int) -> str:
    return fs.join(fs.normalize(out), EMBEDDINGS, f"part-{part:05d}.npz")


def write_embeddings(out: str, part: int, keys: Iterable[str], emb: np.ndarray) -> None:
    keys = np.asarray(list(keys), dtype=str)
    emb = np.asarray(emb, dtype=np.float16).reshape(len(keys), -1) if len(keys) else np.zeros((0, 0), np.float16)
    buf = io.BytesIO()
    np.savez(buf, keys=keys, embeddings=emb)
    fs.write_bytes(embeddings_uri(out, part), buf.getvalue())


def read_part_embeddings(out: str, part: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys (n,) str, embeddings (n, D) float16) of one part; empty arrays when it has none."""
    uri = embeddings_uri(out, part)
    if not fs.exists(uri):
        return np.zeros((0,), dtype=str), np.zeros((0, 0), dtype=np.float16)
    with np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False) as z:
        return z["keys"], z["embeddings"]


def read_part_embedding_keys(out: str, part: int) -> np.ndarray:
    """The keys (n,) str of one part's embeddings, without reading the embeddings (the npz member
    alone, through a random-access reader)."""
    uri = embeddings_uri(out, part)
    if not fs.exists(uri):
        return np.zeros((0,), dtype=str)
    with fs.open_input(uri) as f, np.load(f, allow_pickle=False) as z:
        return z["keys"]


def embedding_parts(out: str) -> list[int]:
    names = fs.listdir(fs.join(fs.normalize(out), EMBEDDINGS))
    return sorted(int(m.group(1)) for n in names if (m := re.match(r"^part-(\d{5,})\.npz$", n)))


def read_embeddings(out: str, parts: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys (N,) str, embeddings (N, D) float16) over the given parts (default: all). Tests and
    small outputs only: stage code reads one part per worker (read_part_embeddings)."""
    keys, embs = [], []
    for p in (embedding_parts(out) if parts is None else parts):
        k, e = read_part_embeddings(out, p)
        if len(k):
            keys.append(k)
            embs.append(e)
    if not keys:
        return np.zeros((0,), dtype=str), np.zeros((0, 0), dtype=np.float16)
    return np.concatenate(keys), np.concatenate(embs)
