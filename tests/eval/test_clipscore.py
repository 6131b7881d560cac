"""CLIP-Score = 100 x cosine (independent open_clip computation), 77-token truncation counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.clipscore import ClipScorer, clip_token_counts, length_summary
from evaldata import random_image


def test_clip_score_is_100_cosine(tiny_models):
    import open_clip

    cfg_json = str(tiny_models / "clip" / "model_config.json")
    weights = str(tiny_models / "clip" / "open_clip_model.safetensors")
    scorer = ClipScorer(cfg_json, weights)
    rng = np.random.default_rng(0)
    imgs = [random_image(rng, 80, 64) for _ in range(3)]
    prompts = ["a red house", "a dog " * 60, "sky"]  # the second is far over 77 tokens
    got = scorer(imgs, prompts)
    # independent: a fresh open_clip model from the same files
    open_clip.add_model_config(cfg_json)
    model, _, pre = open_clip.create_model_and_transforms("model_config", pretrained=weights)
    model.eval()
    with torch.no_grad():
        ie = model.encode_image(torch.stack([pre(i) for i in imgs]))
        te = model.encode_text(open_clip.tokenize(prompts))  # context 77, truncates
    cos = torch.nn.functional.cosine_similarity(ie, te).numpy()
    np.testing.assert_allclose(got, 100 * cos, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        scorer(imgs, prompts[:2])


def test_token_counts_and_truncated_fraction():
    counts = clip_token_counts(["a cat", "word " * 100, ""])
    assert counts.tolist() == [4, 102, 2]  # start + tokens + end
    s = length_summary(counts)
    assert s["over_context"] == 1 and s["frac_over_context"] == pytest.approx(1 / 3)
    assert sum(s["histogram"].values()) == 3
