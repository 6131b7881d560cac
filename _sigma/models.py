"""Loading of the pretrained models several stages share (score + eval: CLIP; features + training +
eval: T5 and the VAE). Imports of torch/transformers/diffusers/open_clip happen inside the loaders.
Every model argument is a local path, a hub name or an s3:// / gs:// URI (fetched once per node into
the local cache by _sigma.fetch: `local_model`)."""
from __future__ import annotations

import os
from pathlib import Path

from _sigma.fetch import local_model


def load_clip(model_name: str, pretrained: str | None, device: str = "cpu", precision: str = "fp32"):
    """open_clip model + eval transform. `model_name` may be a local model-config json (tiny models)."""
    import open_clip

    model_name, pretrained = local_model(model_name), local_model(pretrained)
    if model_name.endswith(".json"):
        open_clip.add_model_config(Path(model_name))
        model_name = Path(model_name).stem
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained or None, device=device, precision=precision
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def clip_input_dtype(precision: str):
    """dtype of the images fed to an open_clip model created with `precision`. fp16 / bf16 cast the
    weights that see the input but keep LayerNorms, positional and class embeddings fp32, so the
    first parameter's dtype does not tell (ViT-L-14's is the fp32 positional embedding)."""
    import torch

    return {"fp16": torch.float16, "pure_fp16": torch.float16,
            "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16}.get(precision, torch.float32)


def load_t5(source: str, device: str = "cpu", dtype=None):
    """(tokenizer, T5 encoder) from a T5 folder / hub name or a diffusers pipeline folder."""
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    src = os.path.expanduser(str(local_model(source)))
    if os.path.isfile(os.path.join(src, "model_index.json")):
        tok_dir, enc_dir = os.path.join(src, "tokenizer"), os.path.join(src, "text_encoder")
    else:
        tok_dir = enc_dir = src
    tok = AutoTokenizer.from_pretrained(tok_dir)
    t5 = T5EncoderModel.from_pretrained(enc_dir, dtype=dtype or torch.float32).to(device).eval()
    return tok, t5


def load_vae(name: str, device: str = "cpu", dtype=None):
    """diffusers AutoencoderKL (hub name or local folder) in eval mode."""
    import torch
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(local_model(name), torch_dtype=dtype or torch.float32).to(device).eval()
