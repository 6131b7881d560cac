"""`ray job submit` against a real head started on 127.0.0.1 (the cluster path of the main job)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _sigma import manifest
from curation import demo_data as dd

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.slow
def test_job_submit_to_a_real_head(tmp_path, tiny_models):
    items = dd.demo_items(n_synthetic=4)[:8]
    # A head started by `ray start` asks clients for a token; give head and client the same one.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=os.urandom(16).hex())
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` in the job = this venv
    port, dash = _free_port(), _free_port()
    ports = {f"--{name}": _free_port() for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")}
    tmp_ray = Path("/tmp") / f"rayjob{port}"  # short path: unix socket names have a length limit
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={tmp_ray}",
             "--disable-usage-stats", *[f"{k}={v}" for k, v in ports.items()]]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        with dd.DemoServer(items) as srv:
            dd.write_url_list(srv, items, tmp_path / "urls.parquet", with_edge_rows=False)
            out = tmp_path / "out"
            cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO), "--",
                   "python", "-m", "curation.run", "--config", "pipelines.yaml", "--pipeline", "demo",
                   "--input", str(tmp_path / "urls.parquet"), "--output", str(out), "--stages", "download,score,dedup,select",
                   "--no-progress",
                   "--set", f"score.clip_model={tiny_models}/clip/model_config.json",
                   "--set", f"score.clip_pretrained={tiny_models}/clip/open_clip_model.safetensors",
                   "--set", f"score.aesthetic_weights={tiny_models}/aesthetic.pth",
                   # --working-dir uploads no models/ (gitignored): every model path must be absolute
                   "--set", f"score.nsfw_weights={tiny_models}/nsfw.zip",
                   "--set", f"score.watermark_weights={tiny_models}/watermark.pt"]
            for _ in range(20):  # the head's job agent comes up a few seconds after `ray start` returns
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                if "No available agent" not in r.stderr:
                    break
                time.sleep(5)
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
            assert "succeeded" in (r.stdout + r.stderr)
            assert "curation.run summary" in r.stdout
        manifest.check_invariants(out, len(items))
        t = manifest.read_manifest(out, ["status", "aesthetic"]).to_pylist()
        assert all(x["status"] == "ok" and x["aesthetic"] is not None for x in t)
    finally:
        _stop_head(tmp_ray)


def _stop_head(tmp_ray: Path) -> None:
    """Stop only this head: `ray stop` would also kill the test session's own embedded Ray."""
    me = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
                continue
            try:
                cmd = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if str(tmp_ray).encode() in cmd:
                try:
                    os.kill(int(pid_dir.name), sig)
                except OSError:
                    pass
        time.sleep(2)
    shutil.rmtree(tmp_ray, ignore_errors=True)
