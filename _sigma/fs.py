"""Every data path a user gives goes through this module: a local path or a URI.

Schemes: plain local paths, `file://`, `s3://` (pyarrow's S3 client: endpoint and credentials come
the standard way, `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_PROFILE` or
the AWS config files) and `gs://` (pyarrow's GCS client, application-default credentials). Paths
are plain strings everywhere; no other module builds `pathlib.Path`s for user data.

How outputs are committed:
- local disk: write a temp file beside the target, fsync it, `os.replace` it over the target,
  fsync the folder. A SIGKILL leaves the old file or the new one, never a torn one.
- object stores: there is no rename, but a whole-object PUT (or a multipart upload, which only
  becomes visible when completed) is atomic. The bytes are written to a local spool file first and
  uploaded in one go, only after the writer finished without error, so a killed or failed writer
  leaves the previous object (or none).
Readers therefore never see partial files; "done" markers are written after the data they mark.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import threading
import uuid
from typing import IO, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REMOTE_SCHEMES = ("s3", "gs", "gcs")
_cache: dict[tuple, pafs.FileSystem] = {}
_cache_lock = threading.Lock()


def scheme(uri: str) -> str:
    """'' for local paths, else the URI scheme ('s3', 'gs', 'file', ...)."""
    s = str(uri)
    if "://" not in s:
        return ""
    return s.split("://", 1)[0].lower()


def is_remote(uri: str) -> bool:
    return scheme(uri) in REMOTE_SCHEMES


def normalize(uri: str | os.PathLike) -> str:
    """Canonical form: local paths absolute (and `file://` stripped), URIs without a trailing '/'.

    Workers on other nodes get the same string; a relative local path would mean a different
    folder in each worker's working directory.
    """
    s = os.fspath(uri)
    sch = scheme(s)
    if sch == "file":
        s = urlparse(s).path
        sch = ""
    if not sch:
        return os.path.abspath(os.path.expanduser(s))
    if sch not in REMOTE_SCHEMES:
        raise ValueError(f"{s}: unsupported scheme {sch!r}; use a local path, file://, s3:// or gs://")
    return s.rstrip("/")


def join(base: str, *parts: str) -> str:
    """Join path segments with '/' (URIs) or os.sep rules (local)."""
    if not is_remote(base):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0] if is_remote(uri) else os.path.dirname(str(uri))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it). One client per bucket, reused (creating S3 clients
    costs a round trip)."""
    s = normalize(uri)
    sch = scheme(s)
    if not sch:
        return pafs.LocalFileSystem(), s
    bucket = urlparse(s).netloc
    key = (sch, bucket)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs, _ = pafs.FileSystem.from_uri(f"{sch}://{bucket}")
            _cache[key] = fs
    return fs, s.split("://", 1)[1]


def info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def isfile(uri: str) -> bool:
    return info(uri).type == pafs.FileType.File


def isdir(uri: str) -> bool:
    """Local: a folder. Object store: a prefix with at least one object under it."""
    i = info(uri)
    if i.type == pafs.FileType.Directory:
        return True
    if is_remote(uri) and i.type == pafs.FileType.NotFound:
        return bool(listdir(uri))
    return False


def size(uri: str) -> int | None:
    i = info(uri)
    return i.size if i.type == pafs.FileType.File else None


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under a folder / prefix, sorted; [] when it does not exist."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(basename(i.path) for i in infos)


def list_files(uri: str, recursive: bool = False) -> list[tuple[str, int]]:
    """(path relative to `uri`, size) of every file under `uri`, sorted."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    base = path.rstrip("/") + "/"
    return sorted((i.path[len(base):] if i.path.startswith(base) else basename(i.path), i.size)
                  for i in infos if i.type == pafs.FileType.File)


def makedirs(uri: str) -> None:
    """Create a folder (local); object stores need none."""
    if not is_remote(uri):
        os.makedirs(normalize(uri), exist_ok=True)


def open_input(uri: str) -> pa.NativeFile:
    """Random-access reader (seekable): parquet, tar, npz."""
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def open_stream(uri: str) -> pa.NativeFile:
    """Sequential reader (one GET on object stores)."""
    fs, path = resolve(uri)
    return fs.open_input_stream(path)


def read_bytes(uri: str) -> bytes:
    with open_stream(uri) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[IO[bytes]]:
    """Write a file atomically: yields a binary file; the target appears only when the block ends
    without an exception (see the module docstring for how, per storage)."""
    target = normalize(uri)
    if not is_remote(target):
        d = os.path.dirname(target)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(target)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(d)
        return
    with tempfile.TemporaryFile(prefix="sigma-spool-") as spool:
        yield spool
        spool.flush()
        spool.seek(0)
        fs, path = resolve(target)
        with fs.open_output_stream(path) as out:  # multipart upload, completed on close
            while chunk := spool.read(16 << 20):
                out.write(chunk)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Build a LOCAL folder atomically (model folders): yields a temp folder beside `path`; when the
    block ends without an exception the old folder (if any) is removed and the temp one renamed
    over it, else the temp folder is removed. A reader sees the old folder or the new one."""
    import shutil

    target = os.path.abspath(os.fspath(path))
    d = os.path.dirname(target)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(target)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(d)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj, **kw) -> None:
    write_text(uri, json.dumps(obj, indent=kw.pop("indent", 2), default=str, **kw))


def delete(uri: str) -> bool:
    """Remove one file; False when it was not there."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
        return True
    except (FileNotFoundError, OSError):
        return False


def delete_dir(uri: str) -> None:
    """Remove a folder / every object under a prefix (no error when absent)."""
    fs, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    with open_input(uri) as f:
        return pq.read_table(f, columns=columns)


def read_parquet_schema(uri: str) -> pa.Schema:
    with open_input(uri) as f:
        return pq.read_schema(f)


def write_parquet(uri: str, table: pa.Table, **kw) -> None:
    """One parquet file, atomically (zstd unless told otherwise)."""
    kw.setdefault("compression", "zstd")
    buf = io.BytesIO() if table.nbytes < (256 << 20) else None
    if buf is not None:
        pq.write_table(table, buf, **kw)
        write_bytes(uri, buf.getvalue())
        return
    with atomic_output(uri) as f:
        pq.write_table(table, f, **kw)


def dataset(uris: list[str], **kw):
    """A pyarrow dataset over parquet files (all on one filesystem): DuckDB scans it lazily
    (`con.register(name, dataset)`), so nothing is loaded whole and no DuckDB extension is needed
    for object stores."""
    import pyarrow.dataset as pads

    if not uris:
        raise ValueError("dataset: no files")
    fs, _ = resolve(uris[0])
    return pads.dataset([resolve(u)[1] for u in uris], filesystem=fs, format="parquet", **kw)


def fsspec_url(uri: str) -> str:
    """The same location for fsspec-based libraries (img2dataset, webdataset's gopen)."""
    s = normalize(uri)
    return "gs://" + s.split("://", 1)[1] if scheme(s) == "gcs" else s


def local_path(uri: str) -> str | None:
    """The local path, or None for object-store URIs."""
    return None if is_remote(uri) else normalize(uri)
