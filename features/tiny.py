"""Tiny random-weight models of features (filled in by the features work)."""
from pathlib import Path


def build(out_dir: Path) -> dict:
    return {}
