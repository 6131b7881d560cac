"""Fixtures of the features tests: the tiny VAE / T5 folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def feature_models(tmp_path_factory) -> Path:
    """Folder with vae/ and t5/: models/tiny if built there, else built here (same builder)."""
    from features import tiny

    repo_tiny = Path(os.environ.get("SIGMA_TINY_MODELS", Path(__file__).resolve().parents[2] / "models" / "tiny"))
    if (repo_tiny / "vae" / "config.json").exists() and (repo_tiny / "t5" / "config.json").exists():
        return repo_tiny
    d = tmp_path_factory.mktemp("tiny")
    tiny.build(d)
    return d


