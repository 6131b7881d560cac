"""Fault injection for the resume tests: a real SIGKILL of the driving process at a reproducible point.

`SIGMA_KILL_AT=stage:n` kills this process right after the n-th commit of `stage` has been
reported (a manifest part, a shard, a dedup group, a checkpoint, ...). With an embedded Ray the
whole local cluster goes down with it, as when a user's job is killed. Unset: does nothing.

Known commit, not a race: commits run in Ray tasks, several at once, and a worker can outlive its
SIGKILLed driver for a moment. So with `SIGMA_KILL_MARKER` set, the driver hands its commit tasks a
gate (`gate(stage)`, passed by _sigma.partstage): right before writing, a task claims one of the n
commit slots (files created with O_EXCL beside the marker, keyed by the group it commits, so a
retried task gets its own slot back); a task that finds all n taken blocks until the run is killed
and never commits. Exactly n commits of `stage` exist when the kill lands, however fast the machine.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

_counts: dict[str, int] = {}
_token: str | None = None


def _spec(stage: str) -> int | None:
    """n when SIGMA_KILL_AT names `stage`, else None."""
    spec = os.environ.get("SIGMA_KILL_AT")
    if not spec:
        return None
    name, _, n = spec.partition(":")
    return int(n or 1) if name == stage else None


def after_commit(stage: str) -> None:
    """Driver side, after a commit of `stage` was reported: the n-th one kills this process."""
    n = _spec(stage)
    if n is None:
        return
    _counts[stage] = _counts.get(stage, 0) + 1
    if _counts[stage] >= n:
        marker = os.environ.get("SIGMA_KILL_MARKER")
        if marker:  # lets a test prove that the kill really happened
            with open(marker, "a") as f:
                f.write(f"{stage}:{_counts[stage]}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def gate(stage: str) -> tuple | None:
    """Driver side: what its commit tasks of `stage` pass to `before_commit` (None: no gate).
    The slots live in a folder unique to this driver process."""
    global _token
    n, marker = _spec(stage), os.environ.get("SIGMA_KILL_MARKER")
    if n is None or not marker:
        return None
    if _token is None:
        _token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return (stage, n, f"{marker}.slots-{_token}")


def before_commit(gate_: tuple | None, key) -> None:
    """Task side, right before the commit of group `key` is written: go on if it holds one of the
    gate's n slots, else block until the run is killed (it would be commit n+1)."""
    if gate_ is None:
        return
    stage, n, folder = gate_
    os.makedirs(folder, exist_ok=True)
    key = str(key)
    for k in range(1, n + 1):
        path = os.path.join(folder, f"{stage}-{k}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with open(path) as f:  # read before its owner wrote the key: not ours, which is right
                if f.read() == key:
                    return  # a retry of the same group
            continue
        with os.fdopen(fd, "w") as f:
            f.write(key)
        return
    while True:  # the driver kills the run at its n-th commit; this one must never land
        time.sleep(3600)
