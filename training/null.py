"""The null caption of classifier-free guidance: T5("") padded to max_length tokens.

The official trainer encodes "" with the T5 tokenizer padded to `model_max_length` (300 for Sigma),
runs the T5 encoder under that attention mask, stores the (1, 300, 4096) output as
`output/pretrained_models/null_embed_diffusers_300token.pth` (`uncond_prompt_embeds` + its mask
`uncond_prompt_embeds_mask`) and its `load_checkpoint` copies it into `y_embedder.y_embedding` on
every load. diffusers' PixArtSigmaPipeline encodes the negative prompt "" the same way and guides
with it under its own mask (one valid token: T5 encodes "" as the lone </s>).

A null source (`null_from`) is one of:
- a null file: `.safetensors` with `uncond_prompt_embeds` (L, D) or (1, L, D) and optionally
  `uncond_prompt_embeds_mask`, or the official `.pth` (read with weights_only=True);
- a diffusers pipeline folder (`model_index.json`, `text_encoder/`, `tokenizer/`);
- a T5 encoder folder holding its tokenizer too (what the features stage uses), or a hub name.
"""
from __future__ import annotations


import torch

from _sigma import fs
from _sigma.device import DTYPES, pick_device, resolve_precision
from _sigma.models import load_t5
from training.files import is_weight_file, load_safetensors, torch_load

KEY, MASK_KEY = "uncond_prompt_embeds", "uncond_prompt_embeds_mask"
Null = tuple[torch.Tensor, int]  # (embedding (L, D) float32, valid tokens of its own mask)


@torch.no_grad()
def encode_null(tokenizer, t5, max_length: int = 300) -> Null:
    """T5("") padded to max_length under its attention mask -> ((max_length, D) float32, valid)."""
    tok = tokenizer("", max_length=max_length, padding="max_length", truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    dev = next(t5.parameters()).device
    out = t5(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev)).last_hidden_state
    return out[0].float().cpu(), int(tok.attention_mask.sum())


def read_null(uri: str, trust_pickle: bool = False) -> Null:
    """A stored null file (see the module docstring) -> (embedding (L, D) float32, valid)."""
    if str(uri).endswith(".safetensors"):
        d = load_safetensors(uri)
    else:
        d = torch_load(uri, trust_pickle)
    if not isinstance(d, dict) or KEY not in d:
        raise ValueError(f"{uri}: not a null-caption file (no {KEY!r} tensor)")
    emb = d[KEY].float()
    emb = emb.reshape(-1, emb.shape[-1])  # (1, L, D) as the official file -> (L, D)
    mask = d.get(MASK_KEY)
    valid = int(mask.reshape(-1).sum()) if mask is not None else 1
    return emb, max(1, valid)


def write_null(uri: str, null: Null) -> str:
    """Store a null caption as safetensors (atomically, local or object store)."""
    from safetensors.torch import save

    emb, valid = null
    mask = torch.zeros(1, emb.shape[0], dtype=torch.int64)
    mask[0, :valid] = 1
    fs.write_bytes(uri, save({KEY: emb.float().reshape(1, *emb.shape).contiguous(), MASK_KEY: mask}))
    return uri


def null_from(source, max_length: int = 300, trust_pickle: bool = False, device: str | None = None) -> Null:
    """A Null from a null file, a T5 / pipeline folder, or an already computed Null (returned)."""
    if isinstance(source, tuple):
        return source
    source = str(source)
    if is_weight_file(source):
        return read_null(source, trust_pickle)
    device = device or pick_device()
    # bf16 on GPU as the features stage encodes captions (fp16 overflows in T5-XXL), fp32 on CPU
    tok, t5 = load_t5(source, device, DTYPES[resolve_precision("auto", device, auto_gpu="bf16")])
    try:
        return encode_null(tok, t5, max_length)
    finally:
        del t5
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # T5-XXL is ~9.5 GB in bf16: give it back before training
