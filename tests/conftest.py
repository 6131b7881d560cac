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
    """Path of the tiny random-weight models (built by `python -m common.tiny_models` if absent)."""
    from common.tiny_models import ensure_tiny_models

    return ensure_tiny_models(TINY_DIR)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting Ray costs seconds)."""
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
