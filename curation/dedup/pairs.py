"""What dedup leaves on disk, and the key <-> integer id mapping both dedup and select use.

    <out>/dedup/pairs/part-GGGGG.parquet   a, b (string keys, a < b), similarity float32, kind exact|near
    <out>/dedup/plan.json, plan.npz        the k-means centroids and cluster -> search group map
    <out>/dedup/_done.json                 written last: {fingerprint, rows, pairs, exact, near, ...}

Exact pairs are star edges from each sha256 group's lowest key (similarity 1.0); near pairs are
every pair of status-ok rows with cosine >= dedup.candidate_threshold (found once, by the search
group that owns the lowest cluster both rows share). Each pair file carries the fingerprint and the
plan id it was computed with in its parquet metadata, so a killed run keeps its finished groups.
Inside the workers keys are int64 ids, `part * 1_000_000 + row` (key `PPPPP_RRRRRR`).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from _sigma import fs

ROW_BASE = 1_000_000  # rows per part are < 1e6 (InputConfig.part_size)
PAIR_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("similarity", pa.float32()), ("kind", pa.string())])
_META = b"sigma.dedup"
_PAIR_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def dedup_dir(out: str) -> str:
    return fs.join(fs.normalize(out), "dedup")


def pairs_dir(out: str) -> str:
    return fs.join(dedup_dir(out), "pairs")


def pair_file(out: str, group: int) -> str:
    return fs.join(pairs_dir(out), f"part-{group:05d}.parquet")


def done_uri(out: str) -> str:
    return fs.join(dedup_dir(out), "_done.json")


def read_done(out: str) -> dict | None:
    """The finished run's marker, or None (never finished, or being redone)."""
    try:
        return fs.read_json(done_uri(out))
    except (FileNotFoundError, OSError, ValueError):
        return None


def pair_files(out: str) -> list[str]:
    return [fs.join(pairs_dir(out), n) for n in fs.listdir(pairs_dir(out)) if _PAIR_RE.match(n)]


def pair_file_meta(uri: str) -> dict:
    try:
        return json.loads((fs.read_parquet_schema(uri).metadata or {}).get(_META, b"{}"))
    except (FileNotFoundError, OSError, ValueError):
        return {}


# --- keys <-> ids ------------------------------------------------------------------------------

def key_ids(keys) -> np.ndarray:
    """int64 ids of keys `PPPPP_RRRRRR` (vectorised); ValueError naming a key of another form."""
    keys = pa.array(keys, pa.string()) if not isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    split = pc.split_pattern(keys, "_", max_splits=1)
    try:
        if pc.min(pc.list_value_length(split)).as_py() != 2:
            raise ValueError
        part = pc.cast(pc.list_element(split, 0), pa.int64()).to_numpy(zero_copy_only=False)
        row = pc.cast(pc.list_element(split, 1), pa.int64()).to_numpy(zero_copy_only=False)
    except (ValueError, pa.ArrowInvalid):
        bad = next(k for k in keys.to_pylist() if not re.fullmatch(r"\d{5,}_\d{6}", k or ""))
        raise ValueError(f"manifest key {bad!r} is not of the form PPPPP_RRRRRR") from None
    return part * ROW_BASE + row


def id_keys(ids: np.ndarray) -> pa.Array:
    """Inverse of key_ids (the format of curation.inputs.make_key)."""
    return pa.array([f"{i // ROW_BASE:05d}_{i % ROW_BASE:06d}" for i in np.asarray(ids, np.int64).tolist()],
                    pa.string())


def sha_words(sha) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hi, lo, valid): the first 128 bits of each sha256 hex digest as two uint64 (collisions
    among 128-bit prefixes are negligible); rows without a well-formed digest are not valid."""
    sha = pa.array(sha, pa.string()) if not isinstance(sha, (pa.Array, pa.ChunkedArray)) else sha
    n = len(sha)
    hi, lo = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    if n == 0:
        return hi, lo, np.zeros(0, bool)
    valid = pc.fill_null(pc.match_substring_regex(sha, r"^[0-9a-fA-F]{64}$"), False)
    valid = valid.to_numpy(zero_copy_only=False).astype(bool)
    if valid.any():
        digests = pc.utf8_slice_codeunits(sha.filter(pa.array(valid)), 0, 32).to_pylist()
        words = np.frombuffer(bytes.fromhex("".join(digests)), dtype=">u8").reshape(-1, 2)
        hi[valid], lo[valid] = words[:, 0], words[:, 1]
    return hi, lo, valid


# --- pair files --------------------------------------------------------------------------------

def write_pairs(out: str, group: int, a: np.ndarray, b: np.ndarray, sim: np.ndarray, exact: np.ndarray,
                meta: dict) -> None:
    """One search group's pairs (ids), oriented a < b as key strings, atomically."""
    ka, kb = id_keys(a), id_keys(b)
    swap = pc.greater(ka, kb)
    table = pa.table({"a": pc.if_else(swap, kb, ka), "b": pc.if_else(swap, ka, kb),
                      "similarity": pa.array(np.asarray(sim, np.float32)),
                      "kind": pa.array(np.where(exact, "exact", "near"), pa.string())}, schema=PAIR_SCHEMA)
    table = table.replace_schema_metadata({_META: json.dumps(meta).encode()})
    fs.write_parquet(pair_file(out, group), table)


def read_pairs(out: str, min_similarity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a ids, b ids, similarity float32, exact bool) of every stored pair at/above min_similarity
    (exact pairs always), each pair once (a pair stored twice keeps its exact kind)."""
    tables = []
    for uri in pair_files(out):
        t = fs.read_parquet(uri)
        tables.append(t.filter(pc.or_(pc.equal(t.column("kind"), "exact"),
                                      pc.greater_equal(t.column("similarity"), np.float32(min_similarity)))))
    if not tables:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32), np.zeros(0, bool)
    t = pa.concat_tables(tables)
    a, b = key_ids(t.column("a")), key_ids(t.column("b"))
    a, b = np.minimum(a, b), np.maximum(a, b)
    sim = t.column("similarity").to_numpy().astype(np.float32)
    exact = pc.equal(t.column("kind"), "exact").to_numpy(zero_copy_only=False).astype(bool)
    order = np.lexsort((~exact, b, a))  # per (a, b): the exact copy first
    a, b, sim, exact = a[order], b[order], sim[order], exact[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], sim[first], exact[first]
