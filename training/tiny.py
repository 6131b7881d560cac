"""Tiny random-weight PixArt-Sigma DiT (`PixArt-tiny` preset) for tests and the demo.

`build(out_dir)` writes `out_dir/dit/` in the training checkpoint layout (model.safetensors +
meta.json with the preset and build kwargs), so `training.checkpoint.load_model(out_dir/"dit")`
and `init_from: models/tiny/dit` both work.
"""
from __future__ import annotations

from pathlib import Path

PRESET = "PixArt-tiny"
RESOLUTION = 256  # the demo's first stage; PE settings follow the training-stage rule


def build(out_dir: Path) -> dict:
    import torch

    from training.checkpoint import write_model_only
    from training.model import build_model

    torch.manual_seed(0)
    kwargs = {"base_size": RESOLUTION // 8 // 2, "pe_interpolation": RESOLUTION / 512}
    model = build_model(PRESET, **kwargs)
    path = write_model_only(Path(out_dir) / "dit", model, {"preset": PRESET, "model_kwargs": kwargs,
                                                           "resolution": RESOLUTION})
    return {"dit": path}
