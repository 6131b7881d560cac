"""Read the user's URL list, validate it, assign stable keys and split it into parts.

Only module that reads or writes `<output>/input/`. Part i holds rows [i*part_size, (i+1)*part_size)
of the input in its original order, so keys `PPPPP_RRRRRR` are stable across reruns. The input's
content hash is stored; rerunning into the same output with a different URL list is refused
(resume would otherwise mix two datasets).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from common.config import ConfigError

INPUT = "input"
KEY_COL = "sigma_key"  # img2dataset overwrites a column named `key` with its own id
_DONE = "_inputs.json"


class InputError(ConfigError):
    """The URL list cannot be used (missing, empty, malformed, wrong columns)."""


def make_key(part: int, row: int) -> str:
    return f"{part:05d}_{row:06d}"


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = "".join(path.suffixes[-2:]).lower()
    for ext, name in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl"), (".txt", "txt")):
        if ext in suffixes:
            return name
    raise InputError(f"input.path {path}: cannot tell the format from the name; set input.format (parquet|csv|jsonl|txt)")


def _read_one(path: Path, fmt: str) -> pa.Table:
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "csv":
            return pcsv.read_csv(path)
        if fmt == "jsonl":
            return pjson.read_json(path)
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return pa.table({"url": pa.array(lines, pa.string())})
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise InputError(f"input.path {path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None


def read_url_list(cfg) -> pa.Table:
    """Load the URL list named by an InputConfig into a table with url, caption and extras (strings)."""
    if not cfg.path:
        raise InputError("input.path is empty: give --input URL_LIST or set input.path")
    path = Path(cfg.path)
    if not path.exists():
        raise InputError(f"input.path {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))) if path.is_dir() else [path]
    if not files:
        raise InputError(f"input.path {path}: folder holds no files")
    for f in files:
        if f.stat().st_size == 0:
            raise InputError(f"input.path {f}: the URL list is empty (0 bytes)")
    tables = [_read_one(f, _detect_format(f, cfg.format)) for f in files]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    url_col = "url" if (cfg.format == "txt" or _detect_format(files[0], cfg.format) == "txt") else cfg.url_col
    if url_col not in table.column_names:
        raise InputError(f"input.url_col {url_col!r} is not a column of {path}; columns: {table.column_names}")
    if table.num_rows == 0:
        raise InputError(f"input.path {path}: the URL list is empty")
    cols = {"url": _as_str(table.column(url_col))}
    if cfg.caption_col in table.column_names:
        cols["caption"] = _as_str(table.column(cfg.caption_col))
    else:
        cols["caption"] = pa.nulls(table.num_rows, pa.string())
    for c in cfg.extra_cols:
        if c not in table.column_names:
            raise InputError(f"input.extra_cols: {c!r} is not a column of {path}; columns: {table.column_names}")
        cols[c] = table.column(c)
    return pa.table(cols)


def _as_str(col) -> pa.ChunkedArray:
    return pc.cast(col, pa.string()) if col.type != pa.string() else col


def input_hash(table: pa.Table) -> str:
    h = hashlib.sha256()
    for batch in table.select(["url", "caption"]).to_batches(max_chunksize=65536):
        for arr in batch.columns:
            h.update("\x1f".join("" if v is None else v for v in arr.to_pylist()).encode())
            h.update(b"\x1e")
    return h.hexdigest()[:16]


def prepare_inputs(cfg, out: Path) -> dict:
    """Split the URL list into `input/part-NNNNN.parquet` (idempotent; refuses a different input)."""
    out = Path(out)
    d = out / INPUT
    table = read_url_list(cfg)
    digest = input_hash(table)
    done = d / _DONE
    if done.exists():
        info = json.loads(done.read_text())
        if info["hash"] != digest or info["part_size"] != cfg.part_size:
            raise InputError(
                f"{out} was prepared from a different URL list or part_size (hash {info['hash']}, "
                f"part_size {info['part_size']}); use a new --output folder"
            )
        return info
    d.mkdir(parents=True, exist_ok=True)
    n, size = table.num_rows, cfg.part_size
    nparts = (n + size - 1) // size
    for part in range(nparts):
        piece = table.slice(part * size, size)
        keys = pa.array([make_key(part, r) for r in range(piece.num_rows)], pa.string())
        piece = piece.add_column(0, KEY_COL, keys)
        target = d / f"part-{part:05d}.parquet"
        tmp = d / f".part-{part:05d}.tmp{os.getpid()}"
        pq.write_table(piece, tmp)
        os.replace(tmp, target)
    info = {"hash": digest, "rows": n, "parts": nparts, "part_size": size, "source": str(cfg.path)}
    tmp = d / f".{_DONE}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, done)
    return info


def read_input_part(out: Path, part: int) -> pa.Table:
    """One input part with our key as `key`."""
    t = pq.read_table(Path(out) / INPUT / f"part-{part:05d}.parquet")
    return t.rename_columns(["key" if c == KEY_COL else c for c in t.column_names])


def input_info(out: Path) -> dict:
    p = Path(out) / INPUT / _DONE
    return json.loads(p.read_text()) if p.exists() else {}
