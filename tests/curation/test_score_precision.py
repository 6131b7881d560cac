"""curation.score.Scorer in the precisions pipelines.yaml uses (`pixart-sigma`: fp16).

open_clip's fp16 keeps LayerNorms and the positional embedding fp32, so an input dtype taken from
the first parameter was fp32 and every fp16 batch failed in the patch conv (found by the real-size
smoke, tests/curation/test_real_size.py). Reference: the same weights in fp32.
"""
from __future__ import annotations

import numpy as np
import pytest

from curation import real_size as rs
from curation.score import Scorer


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_scorer_low_precision_matches_fp32(tiny_models, precision):
    table = rs.image_table(rs.photos())
    kw = dict(clip_model=str(tiny_models / "clip" / "model_config.json"),
              clip_pretrained=str(tiny_models / "clip" / "open_clip_model.safetensors"),
              aesthetic_weights=str(tiny_models / "aesthetic.pth"), max_pixels=10**8)
    ref = Scorer(precision="fp32", **kw)(table).to_pydict()
    low = Scorer(precision=precision, **kw)(table).to_pydict()
    assert low["score_error"] == [None, None]
    e_ref, e_low = np.array(ref["embedding"]), np.array(low["embedding"])
    assert np.allclose(np.linalg.norm(e_low, axis=1), 1, atol=1e-3)
    tol = {"fp16": 0.01, "bf16": 0.05}[precision]  # relative: 10 / 7 mantissa bits through the tower
    assert np.linalg.norm(e_low - e_ref, axis=1).max() < tol
    assert np.allclose(low["aesthetic"], ref["aesthetic"], rtol=tol, atol=tol)
