"""A real Ray cluster for the tests: `ray start` processes on 127.0.0.1, stopped by their own temp dir.

Head and workers are separate raylets (own ports, own temp dir, own custom resource), so tasks
scheduled SPREAD really land on different nodes. A head started by `ray start` asks clients for a
token: head, workers and `ray job submit` share one (RAY_AUTH_TOKEN).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
_NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
               "runtime-env-agent-port", "node-manager-port", "object-manager-port")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cluster_env() -> dict:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the Makefile / conftest default: an embedded Ray on the
    # loopback address) makes `ray start` refuse worker nodes, even on Linux.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=os.urandom(16).hex())
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` in the job = this venv
    return env


class Cluster:
    """`with Cluster(env) as c:` a head (custom resource head_node) and `workers` worker nodes
    (worker_node), `cpus` CPUs each; c.dashboard is the job-submission address."""

    def __init__(self, env: dict, workers: int = 1, cpus: int = 2):
        self.env, self.workers, self.cpus = env, workers, cpus
        self.port, dash = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.dash_port = dash
        self.dirs: list[Path] = []

    def _start(self, args: list[str], resources: str) -> None:
        tmp = Path("/tmp") / f"rc{self.port}n{len(self.dirs)}"  # short: unix socket paths have a length limit
        self.dirs.append(tmp)
        ports = [f"--{name}={free_port()}" for name in _NODE_PORTS]
        lo = free_port()
        cmd = [RAY, "start", *args, "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
               f"--resources={resources}", f"--temp-dir={tmp}", "--disable-usage-stats", *ports,
               f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            raise RuntimeError(f"ray start failed: {(r.stdout + r.stderr)[-3000:]}")

    def __enter__(self) -> "Cluster":
        try:
            self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dash_port}",
                         "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                         f"--ray-client-server-port={free_port()}"], '{"head_node": 1}')
            for _ in range(self.workers):
                self._start([f"--address=127.0.0.1:{self.port}"], '{"worker_node": 1}')
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, working_dir: Path, entrypoint: list[str], runtime_env_json: str | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir)]
        if runtime_env_json:
            cmd += ["--runtime-env-json", runtime_env_json]
        cmd += ["--", *entrypoint]
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in r.stderr:
                return r
            time.sleep(3)
        return r

    def stop(self) -> None:
        """Stop only this cluster's processes (found by their temp dirs): `ray stop` would also kill
        the test session's own embedded Ray."""
        me = os.getpid()
        marks = [str(d).encode() for d in self.dirs]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid_dir in Path("/proc").iterdir():
                if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
                    continue
                try:
                    cmd = (pid_dir / "cmdline").read_bytes()
                except OSError:
                    continue
                if any(m in cmd for m in marks):
                    try:
                        os.kill(int(pid_dir.name), sig)
                    except OSError:
                        pass
            time.sleep(2)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
