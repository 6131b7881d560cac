"""Read the user's URL list, validate it, assign stable keys and split it into parts.

Only module that reads or writes `<output>/input/`. The URL list is one file or a folder of files
(local or object store; parquet, csv, jsonl or txt). Each file is read by its own Ray task, twice
and streaming: a first pass counts and hashes its rows (and checks its columns), the driver turns
the per-file counts into part numbers, a second pass writes the file's parts. Parts never span
files: file f holds parts [base_f, base_f + ceil(rows_f / part_size)), part i its rows in
original order, so keys `PPPPP_RRRRRR` (part, row in part) are stable across reruns. The driver
sees counts and hashes only. The list's content hash is stored; rerunning into the same output
with a different URL list is refused (resume would otherwise mix two datasets).

Integrity (as manifest parts): each part's size and sha256 (and the list hash and part size it was
cut with) are recorded in `input/_sums/part-NNNNN.json`, written just before the part; `_inputs.json`
is written last. Every run checks the parts against their records (a task per file) and rebuilds a
missing, truncated, corrupt or unrecorded part from the URL list (the same bytes: the split is
deterministic, so nothing downstream changes). An unreadable `_inputs.json` is rebuilt when the
parts' records name this list, and refused with a one-line InputError otherwise.
"""
from __future__ import annotations

import hashlib
import io
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from _sigma import fs
from _sigma.config import ConfigError
from _sigma.images import KEY_FIELD

INPUT = "input"
KEY_COL = KEY_FIELD  # img2dataset overwrites a column named `key` with its own id
_DONE = "_inputs.json"
_SUMS = "_sums"  # img2dataset reads input/*.parquet only: the records' folder is not an input to it
_SHOW = 20  # rebuilt parts named on stderr
_FORMATS = ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl"), (".txt", "txt"))


class InputError(ConfigError):
    """The URL list cannot be used (missing, empty, malformed, wrong columns)."""


def make_key(part: int, row: int) -> str:
    return f"{part:05d}_{row:06d}"


def _detect_format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = fs.basename(uri).lower()
    for ext, fmt_name in _FORMATS:
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return fmt_name
    raise InputError(f"input.path {uri}: cannot tell the format from the name; set input.format (parquet|csv|jsonl|txt)")


def _batches(uri: str, fmt: str, cfg):
    """Stream a file as record batches with string columns url, caption and the extra columns."""
    if fmt == "parquet":
        f = pq.ParquetFile(fs.open_input(uri))
        names = f.schema_arrow.names
        _check_columns(uri, f.schema_arrow, cfg)
        cols = [cfg.url_col] + ([cfg.caption_col] if cfg.caption_col in names else []) + list(cfg.extra_cols)
        it = f.iter_batches(batch_size=65536, columns=cols)
    elif fmt == "csv":
        types = {cfg.url_col: pa.string(), cfg.caption_col: pa.string()}
        it = pcsv.open_csv(fs.open_stream(uri), convert_options=pcsv.ConvertOptions(column_types=types))
        _check_columns(uri, it.schema, cfg)
    elif fmt == "jsonl":
        it = pjson.open_json(fs.open_stream(uri))
        _check_columns(uri, it.schema, cfg)
    else:
        yield from _txt_batches(uri)
        return
    for b in it:
        yield _normalise(b, cfg)


def _txt_batches(uri: str):
    buf = b""
    with fs.open_stream(uri) as f:
        while True:
            chunk = f.read(8 << 20)
            if chunk:
                buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop() if chunk else b""
            urls = [ln.decode(errors="replace").strip() for ln in lines]
            urls = [u for u in urls if u]
            if urls:
                yield pa.record_batch({"url": pa.array(urls, pa.string()), "caption": pa.nulls(len(urls), pa.string())})
            if not chunk:
                return


def _check_columns(uri: str, schema: pa.Schema, cfg) -> None:
    """The configured columns exist, and url/caption hold scalars a URL or caption string can be
    cast from: a list, struct or map column (parquet, or jsonl objects/arrays) has no such cast."""
    names = schema.names
    if cfg.url_col not in names:
        raise InputError(f"input.url_col {cfg.url_col!r} is not a column of {uri}; columns: {names}")
    for c in cfg.extra_cols:
        if c not in names:
            raise InputError(f"input.extra_cols: {c!r} is not a column of {uri}; columns: {names}")
    for key, col in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col)):
        if col in names:
            t = schema.field(col).type
            if pa.types.is_dictionary(t):
                t = t.value_type
            if pa.types.is_nested(t):
                what = " ".join(str(t).split())[:120]  # a type repr can span lines; the reason is one line
                raise InputError(f"input.{key} {col!r} of {uri} has type {what}: it must hold one string "
                                 "(or number) per row, not a list, struct or map")


def _normalise(b: pa.RecordBatch, cfg) -> pa.RecordBatch:
    def as_str(a):
        return pc.cast(a, pa.string()) if a.type != pa.string() else a

    names = b.schema.names
    cols = {"url": as_str(b.column(names.index(cfg.url_col)))}
    cols["caption"] = (as_str(b.column(names.index(cfg.caption_col))) if cfg.caption_col in names
                       else pa.nulls(b.num_rows, pa.string()))
    for c in cfg.extra_cols:
        cols[c] = b.column(names.index(c))
    return pa.record_batch(cols)


def _row_text(b: pa.RecordBatch) -> str:
    """url \\x1f caption \\x1e per row: a hash over these is independent of batch boundaries."""
    joined = pc.binary_join_element_wise(pc.fill_null(b.column(0), ""), pc.fill_null(b.column(1), ""), "\x1f")
    return "".join(s + "\x1e" for s in joined.to_pylist())


def scan_file(uri: str, fmt: str, cfg) -> dict:
    """Pass 1 (a task per file): rows and content hash, or the reason the file cannot be used."""
    try:
        if fs.size(uri) == 0:
            return {"file": uri, "error": f"input.path {uri}: the URL list is empty (0 bytes)"}
        h, rows = hashlib.sha256(), 0
        for b in _batches(uri, fmt, cfg):
            rows += b.num_rows
            h.update(_row_text(b).encode())
        return {"file": uri, "rows": rows, "hash": h.hexdigest()}
    except InputError as e:
        return {"file": uri, "error": str(e)}
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, ValueError) as e:
        return {"file": uri, "error": f"input.path {uri}: cannot read as {fmt}: {str(e).splitlines()[0]}"}


def split_file(item: dict, out: str, cfg) -> dict:
    """Pass 2 (a task per file): write the file's parts, starting at part item['base'] (only the
    parts in item['only'] when given: a rebuild), each after its size/sha256 record."""
    part, pending, n = item["base"], [], 0
    only = set(item["only"]) if item.get("only") is not None else None

    def flush(rows: list[pa.RecordBatch]) -> None:
        nonlocal part
        if only is None or part in only:
            t = pa.Table.from_batches(rows)
            keys = pa.array([make_key(part, r) for r in range(t.num_rows)], pa.string())
            buf = io.BytesIO()
            pq.write_table(t.add_column(0, KEY_COL, keys), buf, compression="zstd")
            data = buf.getvalue()
            fs.write_json(sums_uri(out, part), {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                                "list": item.get("hash"), "part_size": cfg.part_size})
            fs.write_bytes(part_uri(out, part), data)
        part += 1

    for b in _batches(item["file"], item["format"], cfg):
        while b.num_rows:
            take = min(b.num_rows, cfg.part_size - n)
            pending.append(b.slice(0, take))
            b, n = b.slice(take), n + take
            if n == cfg.part_size:
                flush(pending)
                pending, n = [], 0
    if pending:
        flush(pending)
    return {"file": item["file"], "parts": part - item["base"]}


def part_uri(out: str, part: int) -> str:
    return fs.join(fs.normalize(out), INPUT, f"part-{part:05d}.parquet")


def sums_uri(out: str, part: int) -> str:
    return fs.join(fs.normalize(out), INPUT, _SUMS, f"part-{part:05d}.json")


def _read_record(uri: str) -> dict | None:
    try:
        rec = fs.read_json(uri)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and {"size", "sha256"} <= set(rec) else None


def part_problem(out: str, part: int) -> str | None:
    """Why input part `part` cannot be trusted (missing, no record, size or sha256 mismatch), or None."""
    from _sigma import manifest

    return manifest.recorded_problem(part_uri(out, part), sums_uri(out, part))


def check_file(item: dict, out: str) -> dict:
    """A task per file: {part: why} for the file's parts that cannot be trusted."""
    parts = range(item["base"], item["base"] + item["parts"])
    return {"bad": {p: why for p in parts if (why := part_problem(out, p))}}


def _read_done(done: str) -> tuple[dict | None, str | None]:
    """(_inputs.json, None), (None, None) when absent, (None, why) when present but unusable."""
    try:
        info = fs.read_json(done)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not isinstance(info, dict) or not {"hash", "part_size", "parts"} <= set(info):
        return None, "not an object with hash, part_size and parts"
    return info, None


def _records_agree(out: str, digest: str, part_size: int, done: str, why: str) -> None:
    """With `_inputs.json` unusable: go on (rebuilding it) only if every recorded part was cut from
    this list with this part size; InputError otherwise (naming the file)."""
    d = fs.join(out, INPUT, _SUMS)
    recs = [_read_record(fs.join(d, n)) for n in fs.listdir(d) if n.startswith("part-") and n.endswith(".json")]
    parts = [n for n in fs.listdir(fs.join(out, INPUT)) if n.startswith("part-") and n.endswith(".parquet")]
    head = f"{done} is unreadable ({why})"
    if any(r is not None and (r.get("list"), r.get("part_size")) != (digest, part_size) for r in recs):
        raise InputError(f"{head} and {out} was prepared from a different URL list or part_size; use a new "
                         "--output folder")
    if parts and not any(r is not None and r.get("list") for r in recs):
        raise InputError(f"{head} and its parts carry no record of the URL list they were cut from: delete "
                         f"{fs.join(out, INPUT)} to rebuild it from this list (if it is the same one), or use a new "
                         "--output folder")
    print(f"input: {head}; the parts' records name this URL list: rebuilding it", file=sys.stderr, flush=True)


def _files(cfg) -> list[str]:
    if not cfg.path:
        raise InputError("input.path is empty: give --input URL_LIST or set input.path")
    path = fs.normalize(cfg.path)
    if fs.isfile(path):
        return [path]
    if not fs.isdir(path):
        raise InputError(f"input.path {path}: no such file or folder")
    files = [fs.join(path, n) for n, _ in fs.list_files(path) if not n.startswith((".", "_"))]
    if not files:
        raise InputError(f"input.path {path}: folder holds no files")
    return files


def prepare_inputs(cfg, out: str, progress: bool = False) -> dict:
    """Split the URL list into `input/part-NNNNN.parquet` (idempotent; refuses a different input)."""
    from _sigma.partstage import run_tasks

    out = fs.normalize(out)
    files = _files(cfg)
    fmts = [_detect_format(f, cfg.format) for f in files]
    scans = run_tasks(lambda item, cfg: scan_file(item[0], item[1], cfg), list(zip(files, fmts)),
                      kwargs={"cfg": cfg}, desc="input scan", progress=progress)
    for s in scans:
        if "error" in s:
            raise InputError(s["error"])
    total = sum(s["rows"] for s in scans)
    if total == 0:
        raise InputError(f"input.path {cfg.path}: the URL list is empty")
    digest = hashlib.sha256("".join(s["hash"] for s in scans).encode()).hexdigest()[:16]
    done = fs.join(out, INPUT, _DONE)
    info, why = _read_done(done)
    if info is not None and (info["hash"] != digest or info["part_size"] != cfg.part_size):
        raise InputError(
            f"{out} was prepared from a different URL list or part_size (hash {info['hash']}, "
            f"part_size {info['part_size']}); use a new --output folder"
        )
    if why is not None:
        _records_agree(out, digest, cfg.part_size, done, why)
    items, base = [], 0
    for f, fmt, s in zip(files, fmts, scans):
        nparts = -(-s["rows"] // cfg.part_size)
        items.append({"file": f, "format": fmt, "base": base, "rows": s["rows"], "parts": nparts, "hash": digest})
        base += nparts
    # Every part against its record (a fresh output: all missing), then (re)write what fails.
    checks = run_tasks(check_file, items, kwargs={"out": out}, desc="input check", progress=progress)
    bad = {p: w for c in checks for p, w in c["bad"].items()}
    if info is not None and not bad:
        return info
    shown = [p for p in sorted(bad) if info is not None or not bad[p].endswith(": missing")]
    for i, p in enumerate(shown):
        if i == _SHOW:
            print(f"input: ... and {len(shown) - _SHOW} more parts rebuilt", file=sys.stderr, flush=True)
            break
        print(f"input: part {p} is rebuilt from the URL list: {bad[p]}", file=sys.stderr, flush=True)
    redo = [dict(i, only=sorted(p for p in bad if i["base"] <= p < i["base"] + i["parts"])) for i in items]
    run_tasks(split_file, [i for i in redo if i["only"]], kwargs={"out": out, "cfg": cfg}, desc="input split",
              progress=progress)
    info = {"hash": digest, "rows": total, "parts": base, "part_size": cfg.part_size, "source": str(cfg.path),
            "files": [{"file": i["file"], "rows": i["rows"], "first_part": i["base"]} for i in items]}
    fs.write_json(done, info)
    return info


def read_input_part(out: str, part: int) -> pa.Table:
    """One input part with our key as `key`."""
    t = fs.read_parquet(part_uri(out, part))
    return t.rename_columns(["key" if c == KEY_COL else c for c in t.column_names])


def input_rows(out: str, part: int) -> int:
    with fs.open_input(part_uri(out, part)) as f:
        return pq.ParquetFile(f).metadata.num_rows


def input_info(out: str) -> dict:
    p = fs.join(fs.normalize(out), INPUT, _DONE)
    return fs.read_json(p) if fs.exists(p) else {}
