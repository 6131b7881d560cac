"""Fault injection for the resume tests: a real SIGKILL of the driving process at a reproducible point.

`SIGMA_KILL_AT=stage:n` kills this process right after the n-th commit of `stage` has been
reported (a manifest part, a shard, a dedup group, a checkpoint, ...). With an embedded Ray the
whole local cluster goes down with it, as when a user's job is killed. Unset: does nothing.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def after_commit(stage: str) -> None:
    spec = os.environ.get("SIGMA_KILL_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != stage:
        return
    _counts[stage] = _counts.get(stage, 0) + 1
    if _counts[stage] >= int(n or 1):
        marker = os.environ.get("SIGMA_KILL_MARKER")
        if marker:  # lets a test prove that the kill really happened
            with open(marker, "a") as f:
                f.write(f"{stage}:{_counts[stage]}\n")
        os.kill(os.getpid(), signal.SIGKILL)
