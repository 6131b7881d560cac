"""Training shards: the only reader/writer of `<output>/shards/<resolution>/` (local or object store,
through _sigma.fs).

Layout (docs/ARCHITECTURE.md, "Training shards"):
  shard-PPPPP-NNNNNN.tar  WebDataset: per sample `<key>.json`, `<key>.latent.npy` (fp16 (8, h/8, w/8):
                     posterior mean then std), `<key>.t5_long.npy` / `<key>.t5_short.npy` (valid
                     tokens only; a member is absent when that caption is missing): text_dtype
                     "fp16" -> fp16 (n, D); "fp8" -> a structured (n,) array of per-token fp32
                     `scale` + `fp8` uint8 (D,) float8-e4m3 codes (lossy, half the bytes; decode
                     with `decode_tokens`, which every reader here does). PPPPP is the manifest part
                     the samples come from (a shard never spans parts), NNNNNN its shard number there.
  .shard-PPPPP-NNNNNN.json  sidecar: what the shard holds (keys hash, config fingerprint, counts,
                     bytes, sha256, failures). Written AFTER its tar: it is the shard's "done"
                     marker. A shard is reused iff its sidecar matches the plan and the tar on disk
                     has the recorded size (and sha256, when verified): that is the resume rule.
  index.json         written last, from verified sidecars / fresh commits: what training reads.
Tars are byte-deterministic (fixed mtime/uid/mode, samples sorted by key) and each file is one
atomic commit (_sigma.fs: temp + rename locally, one whole-object PUT on object stores).
Readers check each shard against its index entry (size up front, sample count at the end) and raise
`ShardError` naming the shard instead of silently training on what is left of it.

Verified on read (issue 22): every member carries the XXH3-128 checksum of its bytes in its PAX
header (keyword `SIGMA.xxh3_128`; WebDataset / tar readers ignore it), and every reader here checks
a member's bytes against it before decoding them (`iter_shard`, the json members of
`scan_members`, `read_member`): a flipped byte raises ShardError naming the shard and the member.
XXH3 rather than sha256 because it runs at memory speed (several GB/s a core vs ~1), so the check
costs a few percent of the read (benchmarks/shard_verify_bench.py); it guards against corruption,
not tampering: whoever can rewrite a tar can rewrite its headers, and the whole-file sha256 stays
in the sidecar and index.json (the features stage's resume check, `file_sha256`). Shards written
before that (no member sums) are checked whole against index.json's sha256 before their first use
in a process. index.json itself must parse and name only plain file names in its own folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import warnings
from typing import Iterator

import numpy as np
import xxhash

from _sigma import fs

TEXT_DTYPES = ("fp16", "fp8")  # stored T5 tokens (features.text_dtype): see encode_tokens

FORMAT = "sigma-shards/2"  # 2: per-part shard names, sha256 + bytes per shard in sidecars and index
INDEX = "index.json"
MEMBERS = ("json", "latent.npy", "t5_long.npy", "t5_short.npy")  # order inside a sample
_FP8_MAX = 448.0  # largest finite float8-e4m3fn value
PAX_SUM = "SIGMA.xxh3_128"  # PAX keyword of a member's XXH3-128 checksum (hex), written with every member


class ShardError(ValueError):
    """A shard disagrees with its index entry or sidecar (missing, truncated, corrupt, wrong count)."""


def _uri(path) -> str:
    return fs.normalize(os.fspath(path))


def shards_dir(out, resolution: int) -> str:
    return fs.join(_uri(out), "shards", str(resolution))


def shard_name(part: int, i: int = 0) -> str:
    return f"shard-{part:05d}-{i:06d}.tar"


def sidecar_uri(uri) -> str:
    uri = _uri(uri)
    name = fs.basename(uri)
    return fs.join(fs.parent(uri), "." + name[: -len(".tar")] + ".json")


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


def member_sum(data: bytes) -> str:
    """The checksum a member carries (PAX `SIGMA.xxh3_128`): XXH3-128 of its bytes, hex."""
    return xxhash.xxh3_128_hexdigest(data)


def keys_hash(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member, preceded by a PAX header holding its checksum (1 KiB per member: 0.3 % of a
    1024 px sample; deterministic, like the rest of the tar)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.pax_headers = {PAX_SUM: member_sum(data)}
    tar.addfile(info, io.BytesIO(data))


class _Hashing:
    """Write-through file wrapper: sha256 and byte count of what tarfile writes (no second read)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        pass


def write_shard(uri, samples: list[dict], summary: dict) -> dict:
    """Write one shard, then its sidecar. samples: dicts with key, meta (dict), latent (npy bytes),
    t5_long / t5_short (npy bytes or None). `summary` (plan info, failures) goes to the sidecar,
    completed with samples, bytes, sha256 and per-bucket counts; returns the completed summary.

    Commit order: the old sidecar is removed first, the tar is committed (atomically), the sidecar
    last, so a sidecar on disk always describes the tar next to it."""
    uri = _uri(uri)
    fs.delete(sidecar_uri(uri))
    buckets: dict[str, int] = {}
    with fs.atomic_output(uri) as f:
        w = _Hashing(f)
        with tarfile.open(fileobj=w, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for s in sorted(samples, key=lambda s: s["key"]):
                key = s["key"]
                _add(tar, f"{key}.json", json.dumps(s["meta"], sort_keys=True, ensure_ascii=False).encode())
                _add(tar, f"{key}.latent.npy", s["latent"])
                for kind in ("t5_long", "t5_short"):
                    if s.get(kind) is not None:
                        _add(tar, f"{key}.{kind}.npy", s[kind])
                b = str(s["meta"]["bucket"])
                buckets[b] = buckets.get(b, 0) + 1
    summary = dict(summary, name=fs.basename(uri), samples=len(samples), bytes=w.n, sha256=w.h.hexdigest(),
                   buckets=dict(sorted(buckets.items(), key=lambda kv: float(kv[0]))))
    fs.write_json(sidecar_uri(uri), summary, sort_keys=True)
    return summary


def read_sidecar(uri) -> dict | None:
    try:
        return fs.read_json(sidecar_uri(uri))
    except (OSError, ValueError):
        return None


def file_sha256(uri) -> str:
    h = hashlib.sha256()
    with fs.open_stream(_uri(uri)) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_shard(uri, expect_hash: str, fingerprint: str, verify: str = "sha256") -> tuple[dict | None, str | None]:
    """(sidecar, None) if the shard is complete, holds exactly the planned keys under this config
    and its bytes are the ones recorded (size; with verify="sha256" also the checksum), else
    (None, why): missing | stale | truncated | corrupt. Never trusts a tar without checking it."""
    side = read_sidecar(uri)
    if side is None:
        return None, "missing"
    if side.get("keys_hash") != expect_hash or side.get("fingerprint") != fingerprint or "sha256" not in side:
        return None, "stale"
    size = fs.size(_uri(uri))
    if size is None:
        return None, "missing"
    if size != side.get("bytes"):
        return None, "truncated"
    if verify == "sha256" and file_sha256(uri) != side["sha256"]:
        return None, "corrupt"
    return side, None


def clean_dir(d, keep: set[str]) -> list[str]:
    """Remove leftover temp files and shards (with sidecars) not in `keep`; returns what was removed."""
    d = _uri(d)
    removed = []
    for name, _ in fs.list_files(d):
        stale_tmp = ".tmp" in name
        stale_shard = name.startswith("shard-") and name.endswith(".tar") and name not in keep
        stale_side = name.startswith(".shard-") and name.endswith(".json") and name[1:-5] + ".tar" not in keep
        if stale_tmp or stale_shard or stale_side:
            fs.delete(fs.join(d, name))
            removed.append(name)
    return removed


def build_index(resolution: int, shards: list[dict], vae: dict, t5: dict, extra: dict | None = None) -> dict:
    """index.json content from the shard summaries (in shard order): per shard name, samples,
    bytes, sha256, buckets and the number of rows that failed (their keys stay in the sidecar)."""
    buckets: dict[str, int] = {}
    entries = []
    for s in shards:
        entries.append({"name": s["name"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"],
                        "buckets": s["buckets"], "failed": s.get("n_failed", len(s.get("failed", [])))})
        for b, n in s["buckets"].items():
            buckets[b] = buckets.get(b, 0) + n
    index = {"format": FORMAT, "resolution": resolution, "vae": vae, "t5": t5, "shards": entries,
             "buckets": dict(sorted(buckets.items(), key=lambda kv: float(kv[0]))),
             "samples": sum(e["samples"] for e in entries), "bytes": sum(e["bytes"] for e in entries),
             "failed": sum(e["failed"] for e in entries)}
    index.update(extra or {})
    return index


def write_index(d, index: dict) -> str:
    uri = fs.join(_uri(d), INDEX)
    fs.write_json(uri, index, indent=1)
    return uri


def delete_index(d) -> None:
    fs.delete(fs.join(_uri(d), INDEX))


def check_name(name, where: str) -> str:
    """A shard name from an index: a plain, visible `*.tar` file name, so that joining it to its
    folder stays inside that folder (no separator, no `..`, no absolute path). ShardError otherwise."""
    ok = (isinstance(name, str) and name.endswith(".tar") and not name.startswith(".")
          and "/" not in name and "\\" not in name and "\0" not in name and name == name.strip())
    if not ok:
        raise ShardError(f"{where}: shard name {name!r} is not a file name in its folder (refused: a name must "
                         "not lead outside the shards folder)")
    return name


def shard_uri(d, name: str, where: str | None = None) -> str:
    """The shard `name` of folder `d`, checked by `check_name`."""
    d = _uri(d)
    return fs.join(d, check_name(name, where or fs.join(d, INDEX)))


def read_index(d) -> dict:
    """index.json of a shards folder, checked: valid JSON, a known format, a list of shard entries
    (each a dict with a safe name). ShardError naming the file otherwise."""
    uri = fs.join(_uri(d), INDEX)
    try:
        data = fs.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no shard index (the features stage has not finished)") from None
    try:
        index = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(f"{uri}: not valid JSON ({e}; {len(data)} bytes): truncated or corrupt, rerun the "
                         "features stage, which writes it last") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ShardError(f"{uri}: not a shard index (expected an object with a `shards` list)")
    if not str(index.get("format", "")).startswith("sigma-shards/"):
        raise ShardError(f"{uri}: unknown format {index.get('format')!r}")
    for e in index["shards"]:
        if not isinstance(e, dict):
            raise ShardError(f"{uri}: shard entry {e!r} is not an object")
        check_name(e.get("name"), uri)
    return index


def failed_rows(d) -> list[dict]:
    """Rows that could not be featurised ({key, error}), from the sidecars of the indexed shards."""
    d = _uri(d)
    out = []
    for s in read_index(d)["shards"]:
        side = read_sidecar(shard_uri(d, s["name"])) or {}
        out += side.get("failed", [])
    return sorted(out, key=lambda f: f["key"])


def _check_size(uri: str, expect: dict) -> None:
    size = fs.size(uri)
    if size is None:
        raise ShardError(f"shard {uri}: missing, the index lists it with {expect.get('samples')} samples")
    if expect.get("bytes") is not None and size != expect["bytes"]:
        raise ShardError(f"shard {uri}: {size} bytes on disk, the index says {expect['bytes']} "
                         "(truncated or rewritten: rerun the features stage)")


_whole_ok: set[tuple[str, str]] = set()  # (uri, sha256) of member-sum-less shards verified in this process
_whole_lock = threading.Lock()
_unverifiable_warned: set[str] = set()


def _verify_whole(uri: str, expect: dict | None) -> None:
    """A shard written without member sums: its sha256 against the index entry, once per process
    (ShardError on a mismatch). An entry without a sha256 (index format 1) cannot be checked:
    warned once, read as it is."""
    want = (expect or {}).get("sha256")
    if not want:
        if uri not in _unverifiable_warned:
            _unverifiable_warned.add(uri)
            warnings.warn(f"shard {uri}: no member checksums and no sha256 in its index entry: read unverified "
                          "(rerun the features stage to rewrite it with checksums)", stacklevel=3)
        return
    with _whole_lock:
        if (uri, want) in _whole_ok:
            return
    if file_sha256(uri) != want:
        raise ShardError(f"shard {uri}: sha256 differs from index.json (corrupt: rerun the features stage)")
    with _whole_lock:
        _whole_ok.add((uri, want))


def _check_member(uri: str, name: str, data: bytes, want: str | None) -> None:
    if want is None:
        raise ShardError(f"shard {uri}: member {name} has no checksum while the shard's others have one "
                         "(corrupt header)")
    if member_sum(data) != want:
        raise ShardError(f"shard {uri}: member {name}: checksum differs from the one written with it (corrupt: "
                         "rerun the features stage)")


def _split(name: str) -> tuple[str, str]:
    key, _, suffix = name.rsplit("/", 1)[-1].partition(".")
    return key, suffix


def iter_shard(uri, expect: dict | None = None, verify: bool = True) -> Iterator[dict]:
    """Decoded samples of one tar, in order: key, meta, latent, t5_long, t5_short (arrays or None;
    T5 members decoded by `decode_tokens`). With `expect` (the shard's index entry) the size is
    checked first and the sample count at the end; a tar that ends early raises ShardError. Each
    member is checked against its checksum before it is decoded (verify=False: not, for the
    benchmark's baseline); a shard without member sums is first checked whole against `expect`."""
    uri = _uri(uri)
    if expect is not None:
        _check_size(uri, expect)
    cur: dict | None = None
    n = 0
    summed: bool | None = None  # decided by the first member: per-member sums, or a whole-shard check
    with fs.open_input(uri) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, suffix = _split(m.name)
                    if cur is None or cur["key"] != key:
                        if cur is not None:
                            n += 1
                            yield cur
                        cur = {"key": key, "meta": None, "latent": None, "t5_long": None, "t5_short": None}
                    data = tar.extractfile(m).read()
                    if verify:
                        want = m.pax_headers.get(PAX_SUM)
                        if summed is None:
                            summed = want is not None
                            if not summed:
                                _verify_whole(uri, expect)
                        if summed:
                            _check_member(uri, m.name, data, want)
                    if suffix == "json":
                        cur["meta"] = json.loads(data)
                    elif suffix.startswith("t5_"):
                        cur[suffix[: -len(".npy")]] = decode_tokens(load_npy(data))
                    else:
                        cur[suffix[: -len(".npy")]] = load_npy(data)
        except (tarfile.TarError, EOFError) as e:
            raise ShardError(f"shard {uri}: unreadable or ends early after {n} samples ({e})") from e
    if cur is not None:
        n += 1
        yield cur
    if expect is not None and n != expect["samples"]:
        raise ShardError(f"shard {uri}: {n} samples, the index says {expect['samples']}")


# --- random access (training): member spans from the tar headers, through _sigma.fs -------------
def scan_members(uri: str, buffer_bytes: int = 8 << 20, verify: bool = True) -> list[dict]:
    """Every sample of one shard (local path or URI), in tar order, without reading its arrays:
    {"key", "meta" (the decoded json member, None if absent), "members": {suffix: (offset, size,
    checksum or None)}}. Reads the tar headers and json members through a buffered reader, so on an
    object store a run of small members costs one ranged GET per `buffer_bytes`, not one per
    header; json members are checked against their checksum (when the shard has member sums).
    Callers check the count against the shard's index entry (training.data does; iter_shard does
    it itself)."""
    uri = _uri(uri)
    groups: dict[str, dict] = {}
    with fs.open_input(uri) as raw:
        fh = io.BufferedReader(raw, buffer_size=buffer_bytes)
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, suffix = m.name.rsplit("/", 1)[-1].partition(".")
                g = groups.setdefault(key, {"key": key, "meta": None, "members": {}})
                g["members"][suffix] = (m.offset_data, m.size, m.pax_headers.get(PAX_SUM))
        for g in groups.values():
            if "json" in g["members"]:
                off, size, want = g["members"]["json"]
                fh.seek(off)
                data = fh.read(size)
                if verify and want is not None:
                    _check_member(uri, f"{g['key']}.json", data, want)
                g["meta"] = json.loads(data)
    return list(groups.values())


def scan_shard(d, entry: dict) -> list[dict]:
    """`scan_members` of the shard `entry` (its index entry: name, samples, bytes) of folder `d`,
    checked against the entry before anything is trained on it: size, every sample complete (json,
    latent and at least one T5 member), sample count, json members against their checksum (the
    arrays are checked by `read_member` when read); a shard without member sums is checked whole
    against the entry's sha256 (once per process). Raises ShardError naming the shard."""
    uri = shard_uri(d, entry.get("name"))
    _check_size(uri, entry)
    try:
        found = scan_members(uri)
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - a tar error names the shard, whatever the reader raised
        raise ShardError(f"shard {uri}: unreadable tar ({type(e).__name__}: {e})") from None
    for g in found:
        mem = g["members"]
        if g["meta"] is None or "latent.npy" not in mem or not ({"t5_long.npy", "t5_short.npy"} & set(mem)):
            raise ShardError(f"shard {uri}: sample {g['key']!r} is incomplete (members {sorted(mem)})")
    if entry.get("samples") is not None and len(found) != entry["samples"]:
        raise ShardError(f"shard {uri}: {len(found)} samples, the index says {entry['samples']} (truncated or "
                         "rewritten: rerun the features stage)")
    sums = {span[2] is not None for g in found for span in g["members"].values()}
    if sums == {True, False}:
        raise ShardError(f"shard {uri}: some members have no checksum while others do (corrupt headers)")
    if sums == {False}:
        _verify_whole(uri, entry)
    return found


def open_shard(uri: str):
    """A random-access handle of one shard for `read_member` (close it when done)."""
    return fs.open_input(_uri(uri))


def read_member(handle, span: tuple, name: str = "", verify: bool = True) -> np.ndarray:
    """The npy member at span (offset, size[, checksum]) of an open shard -> its array (T5 members
    are still encoded: pass them through `decode_tokens`). One positional read (a ranged GET
    remotely); the bytes are checked against the member's checksum before they are decoded
    (ShardError naming `name`, e.g. "<shard uri>: member <key>.latent.npy")."""
    off, size = span[0], span[1]
    data = handle.read_at(size, off)
    if len(data) != size:
        raise EOFError(f"member at {off}: {len(data)} of {size} bytes (truncated shard)")
    if verify and len(span) > 2 and span[2] is not None and member_sum(data) != span[2]:
        raise ShardError(f"shard {name or '?'}: checksum differs from the one written with it (corrupt: rerun the "
                         "features stage)")
    return load_npy(data)


def iter_samples(d, verify: bool = True) -> Iterator[dict]:
    """Every sample of a resolution's shards, in index order, each shard checked against its entry
    and each member against its checksum (see iter_shard)."""
    d = _uri(d)
    for s in read_index(d)["shards"]:
        yield from iter_shard(shard_uri(d, s["name"]), s, verify=verify)


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


def shard_keys(out) -> set[str]:
    """Keys present in any resolution's shards of `<out>` (tar headers only, no data read)."""
    root = fs.join(_uri(out), "shards")
    keys: set[str] = set()
    for res in fs.listdir(root):
        for name, _ in fs.list_files(fs.join(root, res)):
            if name.startswith("shard-") and name.endswith(".tar"):
                keys.update(g["key"] for g in scan_members(fs.join(root, res, name)))
    return keys
