"""Tiny offline curation models: an open_clip ViT (real class, random weights) + the aesthetic MLP."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# A real open_clip CLIP config, shrunk: ViT image tower and text transformer with the OpenAI BPE
# vocabulary that ships inside open_clip (so tokenization is the real one).
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLIP_NAME = "sigma-tiny-clip"


def build(out_dir: Path) -> dict:
    import open_clip
    from safetensors.torch import save_file

    from curation.score import AestheticMLP

    torch.manual_seed(0)
    clip_dir = Path(out_dir) / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = clip_dir / "model_config.json"
    cfg_path.write_text(json.dumps(TINY_CLIP, indent=2))
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model("model_config", pretrained=None)
    weights = clip_dir / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    mlp = AestheticMLP(TINY_CLIP["embed_dim"])
    # Random weights give scores near 0; shift the last bias so the tiny model's scores sit in the
    # real predictor's ~1-10 range and thresholds in the demo config behave like real ones.
    with torch.no_grad():
        mlp.layers[7].bias.fill_(5.0)
    aes = Path(out_dir) / "aesthetic.pth"
    torch.save(mlp.state_dict(), aes)
    return {"clip_config": cfg_path, "clip_weights": weights, "aesthetic": aes}
