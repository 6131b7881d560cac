"""One writer per output: a second run is refused naming the holder (local flock, S3 lease), a
SIGKILLed holder leaves no stale lock, and img2dataset's workers die with a SIGKILLed driver."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _sigma.runlock import LockError, run_lock
from curation import demo_data as dd
from curation import run as run_mod
from hostile_web import HostileServer

REPO = Path(__file__).resolve().parents[2]
_HOLD = "import sys, time; from _sigma.runlock import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n"


def _holder(out: str, env=None) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, out], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, **(env or {})))
    assert p.stdout.readline().strip() == "held"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def test_local_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path, capsys):
    out = str(tmp_path / "out")
    holder = _holder(out)
    (tmp_path / "urls.csv").write_text("url,caption\n")  # a missing --input is refused before the lock
    try:
        (tmp_path / "out" / "config.resolved.yaml").write_text("the holder's\n")
        rc = run_mod.main(["--config", str(REPO / "pipelines.yaml"), "--pipeline", "demo", "--output", out,
                           "--input", str(tmp_path / "urls.csv"), "--stages", "download", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {holder.pid} on host" in err and "_lock.json" in err, err
        assert (tmp_path / "out" / "config.resolved.yaml").read_text() == "the holder's\n"  # refused: untouched
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            with run_lock(out):
                pass
    finally:
        _kill(holder)
    with run_lock(out) as h:  # no stale lock after SIGKILL: the kernel dropped the flock
        assert json.loads((tmp_path / "out" / "_lock.json").read_text())["pid"] == os.getpid() == h["pid"]


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "u.csv").write_text("url,caption\n")  # a missing --input is refused first
    rc = run_mod.main(["--config", str(REPO / "pipelines.yaml"), "--pipeline", "demo", "--output",
                       str(tmp_path / "file" / "out"), "--input", str(tmp_path / "u.csv"), "--stages", "download"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot create or write" in err and "Traceback" not in err


def test_s3_lease_refuses_expires_and_is_taken_over(s3_bucket, monkeypatch):
    out = f"{s3_bucket}/run"
    with run_lock(out) as h:
        with pytest.raises(LockError, match=f"pid {h['pid']} on host .* expires in"):
            with run_lock(out):
                pass
    with run_lock(out):  # released on exit: free again at once
        pass
    monkeypatch.setenv("SIGMA_LOCK_TTL", "4")
    holder = _holder(out, {"SIGMA_LOCK_TTL": "4"})
    time.sleep(5)  # longer than the TTL: only renewal (every TTL/4) keeps the lease
    with pytest.raises(LockError, match=f"pid {holder.pid}"):
        with run_lock(out):
            pass
    _kill(holder)
    with run_lock(out) as h:  # its holder ran here and is gone: taken over at once, no wait for expiry
        assert h["pid"] == os.getpid()
    # A holder on another host cannot be checked: its lease blocks until it expires, then is taken over.
    import botocore.session

    bucket, _, prefix = out.split("://", 1)[1].partition("/")
    lease = {"host": "another-host", "pid": 1, "started": "?", "command": "elsewhere", "expires": time.time() + 4}
    botocore.session.get_session().create_client("s3").put_object(
        Bucket=bucket, Key=f"{prefix}/_lock.json", Body=json.dumps(lease).encode())
    with pytest.raises(LockError, match="host another-host .* expires in"):
        with run_lock(out):
            pass
    time.sleep(4.2)
    with run_lock(out) as h:  # expired: taken over
        assert h["pid"] == os.getpid()


_DRIVER = textwrap.dedent("""
    import sys
    from _sigma.config import parse
    from curation.config import PipelineConfig
    from curation.download import run_download
    from curation.inputs import prepare_inputs
    if __name__ == "__main__":
        cfg = parse(PipelineConfig, {"name": "k", "output": sys.argv[2], "input": {"path": sys.argv[1], "part_size": 6},
                                     "download": {"processes": 2, "threads": 2, "timeout": 20, "deadline": 60,
                                                  "allow_private_addresses": True}})
        prepare_inputs(cfg.input, cfg.out)
        run_download(cfg, cfg.out, progress=False)
""")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_img2dataset_workers_die_with_a_sigkilled_driver(tmp_path):
    jpg = dd._jpeg(dd.synthetic("red", "blue", "circle", (64, 64), 1))

    def slow(h):
        time.sleep(1.5)
        h.send_response(200), h.send_header("Content-Length", str(len(jpg))), h.end_headers(), h.wfile.write(jpg)

    with HostileServer({"s.jpg": slow}) as srv:
        pq.write_table(pa.table({"url": [f"{srv.base}/s.jpg?{i}" for i in range(36)]}), tmp_path / "urls.parquet")
        (tmp_path / "driver.py").write_text(_DRIVER)
        env = dict(os.environ, PYTHONPATH=str(REPO), SIGMA_QUIET="1")
        driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "urls.parquet"),
                                   str(tmp_path / "out")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while len(srv.requested) < 3 and time.monotonic() < deadline and driver.poll() is None:
                time.sleep(0.2)
            assert len(srv.requested) >= 3, "img2dataset never started downloading"
            kids = _descendants(driver.pid)
            assert kids, "no worker processes seen"
        finally:
            _kill(driver)
        gone_by = time.monotonic() + 20
        while any(_alive(p) for p in kids) and time.monotonic() < gone_by:
            time.sleep(0.2)
        survivors = [p for p in kids if _alive(p)]
        assert not survivors, f"processes outlived the driver: {survivors}"
        n = len(srv.requested)
        time.sleep(3)
        assert len(srv.requested) == n  # nobody keeps downloading (and writing) after the kill

