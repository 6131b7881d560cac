"""img2dataset 1.47 glue: our crawler policy, worker lifetime and private temp names.

img2dataset stays the downloader; for the duration of one `img2dataset.download()` call
(`patched(policy)`) four names that `img2dataset.main` looks up are replaced by thin subclasses /
a copy, the way an upstream patch would change them:
- `Downloader` -> PolicyDownloader: pickled to every worker process (spawn) or Ray task; in the
  worker, before each shard, it points `img2dataset.downloader.download_image` (the module-level
  function the shard's threads call) at `curation.crawl.img2dataset_fetch` with our Policy. The
  patch therefore lives in the workers, where the downloads happen, not only in the driver.
- `multiprocessing_distributor` -> the same pool with an initializer: each worker asks the kernel
  for SIGKILL when the driver dies (prctl PR_SET_PDEATHSIG), so a SIGKILLed driver leaves no
  worker that keeps writing into the output while a rerun downloads.
- `LoggerProcess` -> the same, also dying with the driver (it would otherwise poll forever).
- `Reader` -> input files in part-number order (plain sorting puts part-100000 before part-10001,
  which would break shard i == part i) and a temp folder unique to this process
  (`download/_tmp/<host>-<pid>-<random>/`): two processes never share a temp shard name.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import socket
import sys
import threading
import uuid
from multiprocessing import get_context

import fsspec
import img2dataset.downloader as i2d_downloader
from img2dataset.distributor import retrier
from img2dataset.downloader import Downloader
from img2dataset.logger import LoggerProcess
from img2dataset.reader import Reader

from curation import crawl

i2d_main = sys.modules["img2dataset.main"]  # `img2dataset.main` the attribute is the CLI function
_PR_SET_PDEATHSIG = 1
_patch_lock = threading.Lock()


def die_with_parent(parent_pid: int | None) -> None:
    """In a child process: be SIGKILLed when the parent dies (Linux; elsewhere only the check below).
    If the parent is already gone (it died before prctl took effect) exit now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


class PolicyDownloader(Downloader):
    """img2dataset's Downloader whose per-URL fetch is curation.crawl's, in whatever process runs it."""

    def __init__(self, *args, policy: crawl.Policy, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy

    def __call__(self, row):
        # download_image_with_retry looks the function up in its module at call time.
        i2d_downloader.download_image = functools.partial(crawl.img2dataset_fetch, policy=self.policy)
        return super().__call__(row)


def multiprocessing_distributor(processes_count, downloader, reader, _, max_shard_retry):
    """img2dataset.distributor.multiprocessing_distributor with a worker initializer."""
    ctx = get_context("spawn")
    with ctx.Pool(processes_count, maxtasksperchild=5, initializer=die_with_parent,
                  initargs=(os.getpid(),)) as process_pool:

        def run(gen):
            failed_shards = []
            for status, row in process_pool.imap_unordered(downloader, gen):
                if status is False:
                    failed_shards.append(row)
            return failed_shards

        failed_shards = run(reader)
        retrier(run, failed_shards, max_shard_retry)
        process_pool.terminate()
        process_pool.join()


class _Logger(LoggerProcess):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._driver_pid = os.getpid()

    def run(self):
        die_with_parent(self._driver_pid)
        super().run()


def _part_number(path: str) -> tuple[int, str]:
    m = re.search(r"part-(\d+)\.[^/]*$", path)
    return (int(m.group(1)) if m else sys.maxsize, path)


class _Reader(Reader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_files = sorted(self.input_files, key=_part_number)
        self.tmp_path = f"{self.tmp_path}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fs, path = fsspec.core.url_to_fs(self.tmp_path)
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def patched(policy: crawl.Policy):
    """img2dataset.download() inside this block uses our policy, lifetime and temp names."""
    names = {"Downloader": functools.partial(PolicyDownloader, policy=policy),
             "multiprocessing_distributor": multiprocessing_distributor,
             "LoggerProcess": _Logger, "Reader": _Reader}
    with _patch_lock:
        saved = {n: getattr(i2d_main, n) for n in names}
        sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        for n, v in names.items():
            setattr(i2d_main, n, v)
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(i2d_main, n, v)
            if sigint is not None:  # img2dataset installs a SIGINT handler that exits with status 0
                signal.signal(signal.SIGINT, sigint)
