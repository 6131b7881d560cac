"""CLIP-Score: 100 x cosine(image embedding, prompt embedding) with open_clip (ViT-L/14 in the
paper protocol; the tiny local model in tests/demo).

Prompts longer than the text tower's 77-token context are truncated (the tokenizer keeps the
start-of-text token, the first 75 BPE tokens and the end-of-text token); the fraction of truncated
prompts is reported next to the score because long captions are the norm in PixArt-Sigma.
No clamp at 0 (torchmetrics' CLIPScore clamps; the paper's 0.27-0.28 = mean cosine, i.e. /100).
"""
from __future__ import annotations

import numpy as np
import torch

CONTEXT = 77


def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_counts(texts: list[str], tokenizer=None) -> np.ndarray:
    """Tokens per text INCLUDING start/end tokens (what must fit in the 77-token context)."""
    tok = tokenizer or _bpe()
    return np.array([len(tok.encode(t or "")) + 2 for t in texts], dtype=np.int64)


def length_summary(counts: np.ndarray, context: int = CONTEXT) -> dict:
    """Distribution of prompt lengths in CLIP tokens and the fraction over the context."""
    if len(counts) == 0:
        return {"n": 0, "over_context": 0, "frac_over_context": 0.0}
    q = np.percentile(counts, [0, 5, 25, 50, 75, 95, 100])
    edges = [0, 16, 32, 48, 64, 77, 100, 150, 200, 300, 10**9]
    hist, _ = np.histogram(counts, bins=edges)
    labels = [f"{a}-{b - 1}" if b < 10**9 else f">={a}" for a, b in zip(edges[:-1], edges[1:])]
    over = int((counts > context).sum())
    return {"n": int(len(counts)), "mean": float(counts.mean()),
            "percentiles": {p: float(v) for p, v in zip(["min", "p5", "p25", "p50", "p75", "p95", "max"], q)},
            "histogram": dict(zip(labels, hist.tolist())),
            "context": context, "over_context": over, "frac_over_context": over / len(counts)}


class ClipScorer:
    """Loads open_clip once; `__call__(images, prompts)` -> (B,) float64 of 100 x cosine."""

    def __init__(self, clip_model: str, clip_pretrained: str | None, device: str = "cpu", precision: str = "fp32"):
        from _sigma.models import load_clip

        self.device = device
        self.model, self.preprocess, self.tokenizer = load_clip(clip_model, clip_pretrained, device, precision)
        self.dtype = next(self.model.parameters()).dtype
        self.context = int(getattr(self.model, "context_length", CONTEXT) or CONTEXT)

    @torch.inference_mode()  # local, not a global switch: stages also run in-process (tests)
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), context_length=self.context).to(self.device)  # (B, 77), truncated
        t = self.model.encode_text(tokens).float()
        return t / t.norm(dim=-1, keepdim=True)

    @torch.inference_mode()  # local, not a global switch: stages also run in-process (tests)
    def embed_images(self, images) -> torch.Tensor:
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device, self.dtype)
        e = self.model.encode_image(x).float()
        return e / e.norm(dim=-1, keepdim=True)

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        cos = (self.embed_images(images) * self.embed_text(prompts)).sum(-1)
        return (100.0 * cos).double().cpu().numpy()
