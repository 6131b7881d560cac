"""Test-wide environment: offline hubs, loopback Ray, tiny models built once per machine."""
import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
}.items():
    os.environ.setdefault(_k, _v)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_DIR = Path(os.environ.get("SIGMA_TINY_MODELS", REPO / "models" / "tiny"))


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """Path of the tiny random-weight models (built by `python -m curation.tiny_models` if absent)."""
    from curation.tiny_models import ensure_tiny_models

    return ensure_tiny_models(TINY_DIR)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One embedded local Ray for the whole test session (starting Ray costs seconds). Started
    after the S3 server so that its workers inherit the endpoint."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray


@pytest.fixture(autouse=True)
def _no_global_grad_switch():
    """A stage run in-process must not leave autograd off for the tests after it (training tests
    failed that way once): inference goes through `torch.inference_mode()` around the call."""
    yield
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch grad mode disabled (use torch.inference_mode() locally)")


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server on 127.0.0.1 (moto's server mode, its own process) for the
    whole session. Clients find it the standard way: AWS_ENDPOINT_URL and the AWS_* credentials,
    set in this process's environment before Ray starts so that every worker inherits them."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket for one test: returns 's3://<name>'."""
    import re
    import uuid

    import pyarrow.fs as pafs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"
