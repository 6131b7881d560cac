"""Training shards: the only reader/writer of `<output>/shards/<resolution>/`.

Layout (docs/ARCHITECTURE.md, "Training shards"):
  shard-NNNNNN.tar   WebDataset: per sample `<key>.json`, `<key>.latent.npy` (fp16 (8, h/8, w/8):
                     posterior mean then std), `<key>.t5_long.npy` / `<key>.t5_short.npy` (valid
                     tokens only; a member is absent when that caption is missing): text_dtype
                     "fp16" -> fp16 (n, D); "fp8" -> a structured (n,) array of per-token fp32
                     `scale` + `fp8` uint8 (D,) float8-e4m3 codes (lossy, half the bytes; decode
                     with `decode_tokens`, which every reader here does)
  .shard-NNNNNN.json sidecar written just before the tar is renamed into place: what the shard
                     holds (keys hash, config fingerprint, counts, failures). A shard is done iff
                     its tar exists and its sidecar matches the plan: that is the resume rule.
  index.json         written last, from the sidecars: what training reads.
Tars are byte-deterministic (fixed mtime/uid/mode, samples sorted by key) and written atomically.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from features.config import TEXT_DTYPES

FORMAT = "sigma-shards/1"
INDEX = "index.json"
MEMBERS = ("json", "latent.npy", "t5_long.npy", "t5_short.npy")  # order inside a sample
_FP8_MAX = 448.0  # largest finite float8-e4m3fn value


def shards_dir(out: Path, resolution: int) -> Path:
    return Path(out) / "shards" / str(resolution)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def sidecar_path(path: Path) -> Path:
    return path.with_name("." + path.name[: -len(".tar")] + ".json")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def token_bytes(n_tokens: int, dim: int, text_dtype: str = "fp16") -> int:
    """Payload bytes of n stored T5 tokens (npy header aside): fp16 2 per element; fp8 1 per
    element + a 4-byte scale per token."""
    return n_tokens * (dim * 2 if text_dtype == "fp16" else dim + 4)


def encode_tokens(tokens: np.ndarray, text_dtype: str = "fp16") -> bytes:
    """T5 valid tokens (n, D) -> npy bytes in the shard's text dtype.

    fp8: each token row is scaled so its largest |value| maps to 448 (float8-e4m3fn's max), then
    rounded to e4m3 (3 mantissa bits: <= 6.25 % relative error per element, ~2-3 % RMS). The
    per-token fp32 scale keeps rows with different magnitudes (EOS vs words) at full relative
    precision; T5's few large-magnitude channels only cost the small ones subnormal range."""
    if text_dtype == "fp16":
        return npy_bytes(np.asarray(tokens, np.float16))
    if text_dtype != "fp8":
        raise ValueError(f"text_dtype: got {text_dtype!r}, allowed: {' | '.join(TEXT_DTYPES)}")
    import torch

    t = torch.from_numpy(np.asarray(tokens, np.float32))  # (n, D)
    scale = (t.abs().amax(dim=1, keepdim=True) / _FP8_MAX).clamp_min(1e-30)  # (n, 1)
    codes = (t / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy()  # (n, D) uint8
    out = np.empty(t.shape[0], np.dtype([("scale", "<f4"), ("fp8", "u1", (t.shape[1],))]))
    out["scale"], out["fp8"] = scale[:, 0].numpy(), codes
    return npy_bytes(out)


def decode_tokens(arr: np.ndarray) -> np.ndarray:
    """A stored T5 member (as np.load gives it) -> float (n, D): fp16 as stored, fp8 dequantised
    to float32 (codes * scale)."""
    if arr.dtype.names is None:
        return arr
    import torch

    codes = torch.from_numpy(np.ascontiguousarray(arr["fp8"])).view(torch.float8_e4m3fn)  # (n, D)
    return (codes.float() * torch.from_numpy(arr["scale"].astype(np.float32))[:, None]).numpy()


def keys_hash(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[dict], summary: dict) -> dict:
    """Write one shard atomically. samples: dicts with key, meta (dict), latent (npy bytes),
    t5_long / t5_short (npy bytes or None). `summary` (plan info, failures) goes to the sidecar,
    completed with samples, bytes and per-bucket counts; returns the completed summary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    buckets: dict[str, int] = {}
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in sorted(samples, key=lambda s: s["key"]):
            key = s["key"]
            _add(tar, f"{key}.json", json.dumps(s["meta"], sort_keys=True, ensure_ascii=False).encode())
            _add(tar, f"{key}.latent.npy", s["latent"])
            for kind in ("t5_long", "t5_short"):
                if s.get(kind) is not None:
                    _add(tar, f"{key}.{kind}.npy", s[kind])
            b = str(s["meta"]["bucket"])
            buckets[b] = buckets.get(b, 0) + 1
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    summary = dict(summary, name=path.name, samples=len(samples), bytes=tmp.stat().st_size,
                   buckets=dict(sorted(buckets.items(), key=lambda kv: float(kv[0]))))
    _atomic_text(sidecar_path(path), json.dumps(summary, sort_keys=True))  # sidecar first ...
    os.replace(tmp, path)  # ... then the tar: a tar on disk always has its sidecar
    return summary


def read_sidecar(path: Path) -> dict | None:
    p = sidecar_path(Path(path))
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def shard_done(path: Path, expect_hash: str, fingerprint: str) -> dict | None:
    """The sidecar if the shard is complete and holds exactly the planned keys under this config."""
    if not Path(path).exists():
        return None
    side = read_sidecar(path)
    if side and side.get("keys_hash") == expect_hash and side.get("fingerprint") == fingerprint:
        return side
    return None


def clean_dir(d: Path, keep: set[str]) -> list[str]:
    """Remove stale temp files and shards (with sidecars) not in `keep`; returns what was removed."""
    removed = []
    if not d.exists():
        return removed
    for p in sorted(d.iterdir()):
        stale_tmp = ".tmp" in p.name
        stale_shard = p.name.startswith("shard-") and p.name.endswith(".tar") and p.name not in keep
        stale_side = p.name.startswith(".shard-") and p.name.endswith(".json") and p.name[1:-5] + ".tar" not in keep
        if stale_tmp or stale_shard or stale_side:
            p.unlink()
            removed.append(p.name)
    return removed


def build_index(resolution: int, shards: list[dict], vae: dict, t5: dict, extra: dict | None = None) -> dict:
    """index.json content from the shard summaries (in shard order)."""
    buckets: dict[str, int] = {}
    entries = []
    for s in shards:
        entries.append({"name": s["name"], "samples": s["samples"], "bytes": s["bytes"], "buckets": s["buckets"]})
        for b, n in s["buckets"].items():
            buckets[b] = buckets.get(b, 0) + n
    index = {"format": FORMAT, "resolution": resolution, "vae": vae, "t5": t5, "shards": entries,
             "buckets": dict(sorted(buckets.items(), key=lambda kv: float(kv[0]))),
             "samples": sum(e["samples"] for e in entries), "bytes": sum(e["bytes"] for e in entries)}
    index.update(extra or {})
    return index


def write_index(d: Path, index: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _atomic_text(d / INDEX, json.dumps(index, indent=1, sort_keys=False))
    return d / INDEX


def read_index(d) -> dict:
    """index.json of a shards folder: a local path or a URI (common.fs)."""
    from common import fs

    p = fs.join(fs.normalize(d), INDEX)
    if not fs.exists(p):
        raise FileNotFoundError(f"{p}: no shard index (the features stage has not finished)")
    index = fs.read_json(p)
    if not str(index.get("format", "")).startswith("sigma-shards/"):
        raise ValueError(f"{p}: unknown format {index.get('format')!r}")
    return index


def iter_shard(path: Path) -> Iterator[dict]:
    """Decoded samples of one tar, in order: key, meta, latent, t5_long, t5_short (arrays or None;
    T5 members decoded by `decode_tokens`)."""
    cur: dict | None = None
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, suffix = m.name.rsplit("/", 1)[-1].partition(".")
            if cur is None or cur["key"] != key:
                if cur is not None:
                    yield cur
                cur = {"key": key, "meta": None, "latent": None, "t5_long": None, "t5_short": None}
            data = tar.extractfile(m).read()
            if suffix == "json":
                cur["meta"] = json.loads(data)
            elif suffix.startswith("t5_"):
                cur[suffix[: -len(".npy")]] = decode_tokens(load_npy(data))
            else:
                cur[suffix[: -len(".npy")]] = load_npy(data)
    if cur is not None:
        yield cur


# --- random access (training): member spans from the tar headers, through common.fs -------------
def scan_members(uri: str, buffer_bytes: int = 8 << 20) -> list[dict]:
    """Every sample of one shard (local path or URI), in tar order, without reading its arrays:
    {"key", "meta" (the decoded json member, None if absent), "members": {suffix: (offset, size)}}.
    Reads the tar headers and json members through a buffered reader, so on an object store a run
    of small members costs one ranged GET per `buffer_bytes`, not one per header."""
    from common import fs

    groups: dict[str, dict] = {}
    with fs.open_input(uri) as raw:
        fh = io.BufferedReader(raw, buffer_size=buffer_bytes)
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, suffix = m.name.rsplit("/", 1)[-1].partition(".")
                g = groups.setdefault(key, {"key": key, "meta": None, "members": {}})
                g["members"][suffix] = (m.offset_data, m.size)
        for g in groups.values():
            if "json" in g["members"]:
                off, size = g["members"]["json"]
                fh.seek(off)
                g["meta"] = json.loads(fh.read(size))
    return list(groups.values())


def open_shard(uri: str):
    """A random-access handle of one shard for `read_member` (close it when done)."""
    from common import fs

    return fs.open_input(uri)


def read_member(handle, span: tuple[int, int]) -> np.ndarray:
    """The npy member at span (offset, size) of an open shard -> its array (T5 members are still
    encoded: pass them through `decode_tokens`). One positional read (a ranged GET remotely)."""
    off, size = span
    data = handle.read_at(size, off)
    if len(data) != size:
        raise EOFError(f"member at {off}: {len(data)} of {size} bytes (truncated shard)")
    return load_npy(data)


def iter_samples(d: Path) -> Iterator[dict]:
    """Every sample of a resolution's shards, in index order."""
    for s in read_index(d)["shards"]:
        yield from iter_shard(Path(d) / s["name"])


def repad(tokens: list[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Valid-token arrays [(n_i, D)] -> (y (B, L, D) float32 zero-padded, mask (B, L) int64):
    the DiT's caption input, L = `length` (e.g. 300 as PixArt) or the longest in the batch."""
    n = [t.shape[0] for t in tokens]
    L = length or max(n)
    y = np.zeros((len(tokens), L, tokens[0].shape[1]), np.float32)
    mask = np.zeros((len(tokens), L), np.int64)
    for i, t in enumerate(tokens):
        y[i, : n[i]] = t
        mask[i, : n[i]] = 1
    return y, mask


def shard_keys(out: Path) -> set[str]:
    """Keys present in any resolution's shards of `<out>` (tar headers only, no data read)."""
    keys: set[str] = set()
    for tar_path in sorted((Path(out) / "shards").glob("*/shard-*.tar")):
        with tarfile.open(tar_path, "r:") as tar:
            keys.update(m.name.rsplit("/", 1)[-1].partition(".")[0] for m in tar if m.isfile())
    return keys
