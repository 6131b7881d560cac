"""What img2dataset left under `<output>/download/`, and whether a rerun may reuse it.

Per shard (= part) a record `download/_sums/NNNNN.json` (in a subfolder: img2dataset takes every
`download/*.json` for a finished shard's stats):
- `{"fingerprint": fp, "files": null}`: the claim, written before img2dataset is asked for the
  shard with download settings `fp`;
- `{"fingerprint": fp, "files": {"tar"|"parquet"|"stats": {"size", "sha256"}}}`: written by the
  part's commit once img2dataset finished the shard (its stats file is written last).
`check_part` (one Ray task per part, at the start of every download stage) decides: reuse the
shard, rebuild only the manifest part, or fetch the shard again: when it was never fetched,
fetched with other settings, or a file is missing, shorter/longer or (verify: sha256) differs
from its record. The old files are deleted first, so img2dataset's incremental mode (which skips
shards that have a stats file) fetches it again. The reason, naming the file, is reported.
"""
from __future__ import annotations

import hashlib

from _sigma import fs, manifest
from _sigma.images import DOWNLOAD, download_tar, download_tar_problem

SUMS = "_sums"
_FILES = (("tar", "{:05d}.tar"), ("parquet", "{:05d}.parquet"), ("stats", "{:05d}_stats.json"))


def download_dir(out: str) -> str:
    return fs.join(fs.normalize(out), DOWNLOAD)


def shard_files(out: str, part: int) -> dict[str, str]:
    return {name: fs.join(download_dir(out), pat.format(part)) for name, pat in _FILES}


def shard_done(out: str, part: int) -> bool:
    return fs.exists(shard_files(out, part)["stats"])


def sums_uri(out: str, part: int) -> str:
    return fs.join(download_dir(out), SUMS, f"{part:05d}.json")


def read_record(out: str, part: int) -> dict | None:
    try:
        return fs.read_json(sums_uri(out, part))
    except (OSError, ValueError):
        return None


def file_record(uri: str, hashing: bool = True) -> dict | None:
    """{size, sha256} of a file (streamed, 8 MiB at a time), {size} without hashing, None if absent."""
    size = fs.size(uri)
    if size is None:
        return None
    if not hashing:
        return {"size": size}
    h, n = hashlib.sha256(), 0
    with fs.open_stream(uri) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"size": n, "sha256": h.hexdigest()}


def record(out: str, part: int, fp: str) -> dict:
    """After img2dataset finished the shard: store its files' sizes and checksums."""
    rec = {"fingerprint": fp, "files": {k: file_record(u) for k, u in shard_files(out, part).items()}}
    fs.write_json(sums_uri(out, part), rec)
    return rec


def shard_problem(out: str, part: int, fp: str, verify: str = "sha256") -> tuple[str, str | None]:
    """('ok' | 'commit' | 'fetch', reason naming the file or None when nothing was wrong)."""
    files = shard_files(out, part)
    rec = read_record(out, part)
    if rec is None:
        if any(fs.exists(u) for u in files.values()):
            return "fetch", f"{files['tar']}: no size/sha256 record (written by an older version or another run)"
        return "fetch", None  # never fetched
    if rec.get("fingerprint") != fp:
        return "fetch", f"download settings changed since {files['tar']} was fetched"
    if rec.get("files") is None:  # claimed: img2dataset finished it (stats written last) or not
        return ("commit", None) if shard_done(out, part) else ("fetch", None)
    for name, uri in files.items():
        want, got = rec["files"].get(name), file_record(uri, hashing=verify == "sha256")
        if got is None:
            return "fetch", f"{uri}: missing"
        if want is None or got["size"] != want["size"]:
            return "fetch", f"{uri}: {got['size']} bytes, {want and want['size']} recorded (truncated or replaced)"
        if verify == "sha256" and got["sha256"] != want["sha256"]:
            return "fetch", f"{uri}: sha256 differs from the one recorded after the download (corrupt)"
    return "ok", None


def check_part(part: int, out: str, fp: str, verify: str = "sha256") -> dict:
    """On a worker: {part, fetch, commit, reason}. Deletes a shard that must be fetched again and
    claims it for `fp`; a manifest part that is missing, corrupt or stale is rebuilt (commit)."""
    state, reason = shard_problem(out, part, fp, verify)
    if state == "fetch":
        for uri in shard_files(out, part).values():
            fs.delete(uri)
        fs.write_json(sums_uri(out, part), {"fingerprint": fp, "files": None})
        return {"part": part, "fetch": True, "commit": True, "reason": reason}
    if state == "commit" or not fs.exists(manifest.part_uri(out, part)):
        return {"part": part, "fetch": False, "commit": True, "reason": None}
    problem = manifest.part_problem(out, part)
    stale = manifest.part_fingerprints(out, part).get("download") != fp if not problem else True
    return {"part": part, "fetch": False, "commit": stale, "reason": problem}


def tar_problem(out: str, part: int) -> str | None:
    """Why part's download tar cannot be read completely (for the rows whose image is missing)."""
    problem = download_tar_problem(out, part)
    if problem:
        return problem
    rec = read_record(out, part)
    want = rec and rec.get("files") and rec["files"].get("tar")
    got = file_record(download_tar(out, part), hashing=False)
    if want and got and got["size"] != want["size"]:
        return f"{download_tar(out, part)}: {got['size']} bytes, {want['size']} recorded after the download (truncated)"
    return None
