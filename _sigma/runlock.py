"""One writer per output: `<output>/_lock.json` names the run that holds the output.

- Local disks (and NFS, where flock is emulated with POSIX locks): the lock is an OS lock
  (flock) on `_lock.json`, held by the driver's open file. The file is opened with O_NOFOLLOW and
  must be a regular file: a symlink (or FIFO, folder) there is refused, never written through.
  The kernel drops the lock when the driver exits in any way, SIGKILL included, so there is
  never a stale lock to clean up; the file's
  content (host, pid, start time, command) only names the holder for the refusal message.
- Object stores (s3://): a lease object created with a conditional PUT (`If-None-Match: *`, one
  winner), with an expiry that a daemon thread of the holder renews (`If-Match: <etag>`, so a
  lease taken over after expiry is noticed). A SIGKILLed holder's lease blocks reruns until it
  expires (SIGMA_LOCK_TTL seconds, default 60); an expired lease is taken over with `If-Match`
  on its etag (one winner). A lease whose holder ran on this host and whose process is gone
  (SIGKILLed, crashed) is taken over at once, the same way. If renewal fails the holder is
  interrupted (KeyboardInterrupt).
- gs:// outputs: no lock (not implemented; a warning says so).
A second run is refused with LockError (a ConfigError: exit 2) naming the holder.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

from _sigma import fs
from _sigma.config import ConfigError

LOCK_NAME = "_lock.json"


class LockError(ConfigError):
    """The output is held by another run."""


def _holder(command: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command, "token": uuid.uuid4().hex}


def _describe(h: dict) -> str:
    return f"pid {h.get('pid')} on host {h.get('host')} (started {h.get('started')}, {h.get('command') or '?'})"


@contextlib.contextmanager
def run_lock(out: str, command: str = "") -> Iterator[dict]:
    """Hold the output for the duration of the block; yields the holder record."""
    out = fs.normalize(out)
    command = command or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    if fs.scheme(out) == "s3":
        with _s3_lease(out, command) as h:
            yield h
    elif fs.is_remote(out):
        print(f"warning: no run lock on {out} (only local folders and s3:// are locked)", file=sys.stderr)
        yield {}
    else:
        with _local_lock(out, command) as h:
            yield h


@contextlib.contextmanager
def _local_lock(out: str, command: str) -> Iterator[dict]:
    import fcntl

    import errno
    import stat

    path = os.path.join(out, LOCK_NAME)
    try:
        os.makedirs(out, exist_ok=True)
        # Never truncated before the lock is ours; never followed: a symlink planted at _lock.json
        # would make this run write its holder record into the link's target (O_NOFOLLOW: ELOOP).
        # O_NONBLOCK: opening a FIFO planted there cannot hang (refused just below).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"output {out}: {path} is a symbolic link; the run lock is never followed to another "
                              "file (remove the link)") from None
        raise ConfigError(f"output {out}: cannot create or write {path} ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError(f"output {out}: {path} is not a regular file (mode {stat.filemode(mode)}); remove it")
    f = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                h = json.loads(f.read() or "{}")
            except ValueError:
                h = {}
            raise LockError(f"output {out} is in use by another run: {_describe(h)}; lock {path}. Wait for it to "
                            "finish or stop it; the lock is released when that process ends") from None
        h = _holder(command)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(h, indent=2))
        f.flush()
        os.fsync(f.fileno())
        yield h
    finally:
        f.close()  # releases the flock


def _dead_here(h: dict) -> bool:
    """The holder ran on this host and its process no longer exists."""
    if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _s3_client():
    import botocore.session

    return botocore.session.get_session().create_client("s3")


def _ttl() -> float:
    return float(os.environ.get("SIGMA_LOCK_TTL", "60"))


@contextlib.contextmanager
def _s3_lease(out: str, command: str) -> Iterator[dict]:
    from botocore.exceptions import ClientError

    bucket, _, prefix = out.split("://", 1)[1].partition("/")
    key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
    client, ttl = _s3_client(), _ttl()
    h = _holder(command)

    def body() -> bytes:
        return json.dumps({**h, "expires": time.time() + ttl, "ttl": ttl}).encode()

    def conflict(e: ClientError) -> bool:
        return e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    try:
        etag = client.put_object(Bucket=bucket, Key=key, Body=body(), IfNoneMatch="*")["ETag"]
    except ClientError as e:
        if not conflict(e):
            raise ConfigError(f"output {out}: cannot write the lease {out}/{LOCK_NAME}: {e}") from None
        got = client.get_object(Bucket=bucket, Key=key)
        cur = json.loads(got["Body"].read() or b"{}")
        left = float(cur.get("expires", 0)) - time.time()
        if left > 0 and not _dead_here(cur):
            raise LockError(f"output {out} is in use by another run: {_describe(cur)}; lease {out}/{LOCK_NAME} "
                            f"expires in {left:.0f} s unless renewed") from None
        try:  # expired: take it over, one winner
            etag = client.put_object(Bucket=bucket, Key=key, Body=body(), IfMatch=got["ETag"])["ETag"]
        except ClientError as e2:
            if conflict(e2):
                raise LockError(f"output {out}: another run took over the expired lease {out}/{LOCK_NAME}") from None
            raise
    state = {"etag": etag, "lost": None}
    stop = threading.Event()

    def renew() -> None:
        import _thread

        while not stop.wait(ttl / 4):
            try:
                state["etag"] = client.put_object(Bucket=bucket, Key=key, Body=body(), IfMatch=state["etag"])["ETag"]
            except Exception as e:  # noqa: BLE001 - lost lease or store unreachable: stop writing
                if stop.is_set():
                    return
                state["lost"] = str(e)
                print(f"error: lost the run lease {out}/{LOCK_NAME}: {e}; stopping", file=sys.stderr, flush=True)
                _thread.interrupt_main()
                return

    t = threading.Thread(target=renew, name="sigma-lease", daemon=True)
    t.start()
    try:
        yield h
    finally:
        stop.set()
        t.join(timeout=30)
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=bucket, Key=key, IfMatch=state["etag"])
