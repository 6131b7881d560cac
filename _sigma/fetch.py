"""Model weights from object storage: `s3://` / `gs://` URIs of a file or a folder, fetched once per
node into a local cache.

Every model field (open_clip config + weights, the aesthetic predictor, T5, VAE, captioner, DiT
checkpoints, FID weights, reward models) goes through `local_model(value)` at its loading site:
a local path or a hub name comes back unchanged; a URI comes back as the path of a complete local
copy. Loaders (transformers, diffusers, open_clip, torch.jit) then read a plain local path.

The cache (`$SIGMA_MODEL_CACHE`, default `~/.cache/sigma-pipeline/models`, one per node):
- keyed by what the object store says about the objects: for each file its relative path, size and
  checksum (S3: the ETag; GCS: size + mtime, pyarrow exposes no hash). A re-uploaded model gets a
  new key, an unchanged one is reused without reading a byte.
- `<cache>/<key>/` appears only complete: files are downloaded into a temp folder beside it, each
  file's size is checked and its sha256 computed while streaming (and compared with the sums the
  upload command writes, `_sigma_sums.json`, when present), a completion marker `COMPLETE.json` is
  written last, and the folder is renamed into place in one `os.replace`. A killed download leaves a
  temp folder that is never read (removed by the next fetch of that key), never a torn model.
- concurrent actors of one node take an exclusive file lock (`<key>.lock`, flock) around the
  download: the first downloads, the others wait and then use its copy.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass

from _sigma import fs

SUMS_NAME = "_sigma_sums.json"  # {relative path: {"size": n, "sha256": hex}} written by sigma-upload-models
MARKER = "COMPLETE.json"
_CHUNK = 8 << 20


class ModelSourceError(FileNotFoundError):
    """A model URI that names nothing, or whose bytes do not match what was listed / recorded."""


class ModelAccessError(OSError):
    """The object store could not be asked (endpoint, credentials, permissions)."""


@dataclass(frozen=True)
class Remote:
    """What the object store says a model URI is: one file, or the files under a prefix."""

    uri: str
    is_file: bool
    files: tuple[tuple[str, int, str], ...]  # (path relative to uri ('' for a file), size, checksum)

    @property
    def key(self) -> str:
        blob = json.dumps([fs.normalize(self.uri), self.is_file, list(self.files)]).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def is_uri(value) -> bool:
    return isinstance(value, str) and fs.is_remote(value)


def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(
        os.environ.get("SIGMA_MODEL_CACHE") or os.path.join("~", ".cache", "sigma-pipeline", "models")))


def _s3_listing(uri: str) -> list[tuple[str, int, str]]:
    """(key, size, ETag) of the object `uri` itself and of every object under `uri/`, through
    botocore (pyarrow's client does not expose ETags). Endpoint and credentials the standard way."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = fs.normalize(uri).split("://", 1)[1].partition("/")
    client = _s3_client()
    out = []
    try:
        try:
            if prefix:
                h = client.head_object(Bucket=bucket, Key=prefix)
                out.append((prefix, int(h["ContentLength"]), h["ETag"].strip('"')))
        except ClientError as e:  # 404: not one object, maybe a folder (403 without ListBucket rights)
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound", "403"):
                raise
        if out:
            return out
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix.rstrip("/") + "/" if prefix else "")
        for page in pages:
            for o in page.get("Contents", ()):
                if o["Key"].endswith("/"):  # a "folder" marker some tools write: no file
                    continue
                out.append((o["Key"], int(o["Size"]), o["ETag"].strip('"')))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code == "NoSuchBucket":
            return []
        raise ModelAccessError(f"{uri}: {code}: {e.response.get('Error', {}).get('Message', e)}") from None
    except BotoCoreError as e:
        raise ModelAccessError(f"{uri}: {e}") from None
    return out


_clients: dict = {}
_clients_lock = threading.Lock()


def _s3_client():
    import botocore.session

    pid = os.getpid()
    with _clients_lock:  # one per process: botocore clients are thread-safe, not fork-safe
        if pid not in _clients:
            _clients[pid] = botocore.session.get_session().create_client("s3")
        return _clients[pid]


def describe(uri: str) -> Remote:
    """List a model URI; raises ModelSourceError when nothing is there."""
    u = fs.normalize(uri)
    root = u.split("://", 1)[1]
    if fs.scheme(u) == "s3":
        listed = _s3_listing(u)
        files = [(k[len(root.partition("/")[2]):].lstrip("/"), s, e) for k, s, e in listed]
    else:  # gs: pyarrow's listing (size + mtime stand in for a checksum)
        i = fs.info(u)
        if i.type.name == "File":
            files = [("", i.size, str(i.mtime_ns))]
        else:
            fsys, path = fs.resolve(u)
            import pyarrow.fs as pafs

            infos = fsys.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            files = [(x.path[len(path.rstrip("/")) + 1:], x.size, str(x.mtime_ns))
                     for x in infos if x.type == pafs.FileType.File]
    if not files:
        raise ModelSourceError(f"{uri}: no such object or folder")
    is_file = len(files) == 1 and files[0][0] == ""
    files = sorted(f for f in files if f[0] != SUMS_NAME)
    return Remote(u, is_file, tuple(files))


def exists(uri: str) -> bool:
    """True when a model URI names a file or a non-empty folder (check_paths)."""
    try:
        describe(uri)
        return True
    except ModelSourceError:
        return False


def read_config(uri: str, name: str = "config.json") -> dict:
    """A model folder's config file straight from the object store (no weights fetched)."""
    return fs.read_json(fs.join(fs.normalize(uri), name))


def local_model(value, cache_dir: str | None = None) -> str:
    """The local path a loader should read for a model field: `value` itself for a local path or a
    hub name, the cached copy's path for an s3:// / gs:// URI (file: the file, folder: the folder)."""
    if not is_uri(value):
        return value
    return fetch(str(value), cache_dir)[0]


def fetch(uri: str, cache_dir: str | None = None) -> tuple[str, bool]:
    """(local path, downloaded_now) of a model URI; see the module docstring."""
    remote = describe(uri)
    root = cache_dir or cache_root()
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, remote.key)
    name = fs.basename(remote.uri)
    path = os.path.join(final, "data", name) if remote.is_file else os.path.join(final, "data")
    if os.path.isfile(os.path.join(final, MARKER)):
        return path, False
    with _locked(final + ".lock"):
        if os.path.isfile(os.path.join(final, MARKER)):  # another actor finished while we waited
            return path, False
        _clear_stale(root, remote.key)
        tmp = os.path.join(root, f".tmp-{remote.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _download(remote, tmp, name)
            if os.path.exists(final):  # a folder without its marker (written by hand?): never trusted
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fs._fsync_dir(root)
    return path, True


@contextlib.contextmanager
def _locked(lock_path: str):
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _clear_stale(root: str, key: str) -> None:
    """Temp folders of this key left by a killed download (we hold the key's lock: none is live)."""
    for n in os.listdir(root):
        if n.startswith(f".tmp-{key}-"):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def _download(remote: Remote, tmp: str, name: str) -> None:
    data = os.path.join(tmp, "data")
    os.makedirs(data)
    sums = _recorded_sums(remote)
    got = {}
    for rel, size, check in remote.files:
        src = remote.uri if remote.is_file else fs.join(remote.uri, rel)
        dst = os.path.join(data, name if remote.is_file else rel)
        if not os.path.abspath(dst).startswith(os.path.abspath(data) + os.sep):
            raise ModelSourceError(f"{src}: refused: its name leaves the model folder")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        h, n = hashlib.sha256(), 0
        with fs.open_stream(src) as f, open(dst, "wb") as out:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if n != size:
            raise ModelSourceError(f"{src}: got {n} bytes, the listing said {size} (changed during the download?)")
        want = sums.get(rel or name, {}).get("sha256")
        if want and want != h.hexdigest():
            raise ModelSourceError(f"{src}: sha256 {h.hexdigest()} does not match {SUMS_NAME} ({want})")
        got[rel or name] = {"size": n, "checksum": check, "sha256": h.hexdigest()}
    with open(os.path.join(tmp, MARKER), "w") as f:  # last: its presence means every byte is there
        json.dump({"uri": remote.uri, "is_file": remote.is_file, "files": got}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _recorded_sums(remote: Remote) -> dict:
    """The upload command's sums: beside a file (`<parent>/_sigma_sums.json`) or in the folder."""
    where = fs.join(fs.parent(remote.uri) if remote.is_file else remote.uri, SUMS_NAME)
    try:
        return fs.read_json(where)
    except (FileNotFoundError, OSError, ValueError):
        return {}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def source_problem(what: str, value: str | None) -> str | None:
    """None when a model source can be used, else a one-line reason: a URI that names nothing, a
    local-looking path that does not exist, or (offline: HF_HUB_OFFLINE=1) a hub name that is not in
    the local hub cache. Online, hub names are asked once (no retries), so a typo fails in a second."""
    if not value:
        return None
    v = str(value)
    if is_uri(v):
        try:
            return None if exists(v) else f"{what} {v}: no such object or folder"
        except ModelAccessError as e:
            return f"{what} {v}: cannot be listed ({e})"
    if "://" in v:
        return f"{what} {v}: unsupported scheme; use a local path, a hub name, s3:// or gs://"
    if os.path.exists(os.path.expanduser(v)):
        return None
    if v.startswith((".", "/", "~")) or v.count("/") != 1:
        return f"{what} {v}: no such file or folder"
    return _hub_problem(what, v)


def _hub_problem(what: str, repo: str) -> str | None:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        cached = any(isinstance(try_to_load_from_cache(repo, f), str)
                     for f in ("config.json", "model_index.json", "tokenizer_config.json", "open_clip_config.json"))
    except HFValidationError:
        return f"{what} {repo}: neither a local path nor a valid hub name"
    if cached:
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{what} {repo}: not a local path, and not in the hub cache (HF_HUB_OFFLINE is set)"
    try:
        HfApi().model_info(repo, timeout=10)
    except Exception as e:  # noqa: BLE001 - any hub answer but success means the name is unusable here
        return f"{what} {repo}: not a local path, and the hub says: {str(e).splitlines()[0][:160]}"
    return None
