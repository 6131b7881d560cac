"""Reward models by name (`eval.rewards: {name: local weights}`), each on its real code path.

- `PickScore` (yuvalkirstain/PickScore_v1): a transformers CLIPModel + CLIPProcessor in one local
  folder (the model card's code: processor with padding/truncation to 77 tokens, L2-normalised
  embeddings, score = logit_scale.exp() x text . image). Folder: save_pretrained of both.
- `HPSv2` (xswu/HPSv2): open_clip ViT-H-14 with the HPS checkpoint's `state_dict` (hpsv2's
  img_score: preprocess_val, ViT-H-14 tokenizer, score = diagonal of image_features @
  text_features.T of the normalised outputs, i.e. a cosine). Path: the `.pt` file (ViT-H-14), or
  a folder with an open_clip model-config json and one `.pt` (other architectures, the tiny twin).
- `ImageReward` (THUDM/ImageReward v1.0): BLIP ViT (patch 16, 224 px) + BERT with cross-attention
  over the image tokens, [CLS] state -> MLP 768-1024-128-64-16-1, (r - 0.16717362830052426) /
  1.0333394966054072. Folder: `ImageReward.pt` (the original state dict: blip.visual_encoder.*,
  blip.text_encoder.*, mlp.layers.*), `med_config.json` (from the same hub repo) and the
  bert-base-uncased `vocab.txt`. Runs on transformers' BLIP modules (BlipVisionModel,
  BlipTextModel, the same layers as BLIP's vit.py / med.py); `convert_imagereward` maps the keys,
  and the vision size is read from the checkpoint (ViT-L/16 for the release).
Every model scores a batch of PIL images against their prompts -> (B,) float64. Nothing is fetched
from a hub: `make models` builds random-weight twins of all three (eval/tiny.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class PickScore:
    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        self.device = device
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = CLIPModel.from_pretrained(path).eval().to(device)

    @staticmethod
    def _emb(out) -> torch.Tensor:  # transformers 5 returns an output object, 4 a tensor
        e = out if isinstance(out, torch.Tensor) else out.pooler_output
        return e / e.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        img = self.processor(images=images, return_tensors="pt").to(self.device)
        txt = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                             return_tensors="pt").to(self.device)
        ie = self._emb(self.model.get_image_features(**img))
        te = self._emb(self.model.get_text_features(**txt))
        return (self.model.logit_scale.exp() * (ie * te).sum(-1)).double().cpu().numpy()


class HPSv2:
    def __init__(self, path: str, device: str = "cpu"):
        import open_clip

        p = Path(path)
        arch, ckpt = "ViT-H-14", p
        if p.is_dir():
            cfg = next(iter(sorted(p.glob("*.json"))), None)
            ckpt = next(iter(sorted(p.glob("*.pt"))), None)
            if cfg is None or ckpt is None:
                raise FileNotFoundError(f"{p}: an HPSv2 folder holds an open_clip model-config json and a .pt")
            open_clip.add_model_config(cfg)
            arch = cfg.stem
        self.device = device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["state_dict"])
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)

    @torch.inference_mode()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        out = self.model(x, self.tokenizer(list(prompts)).to(self.device))
        ie, te = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        return (ie * te).sum(-1).double().cpu().numpy()  # diag(image @ text.T): normalised -> cosine


def convert_imagereward(state: dict) -> tuple[dict, dict, dict, dict]:
    """Original ImageReward state dict -> (vision, text, mlp state dicts for transformers' BLIP
    modules, vision shape {dim, depth, patch, image}). Buffers (position_ids) are dropped."""
    vision, text, mlp = {}, {}, {}
    for k, v in state.items():
        if k.startswith("blip.visual_encoder."):
            k2 = k[len("blip.visual_encoder."):]
            k2 = (k2.replace("cls_token", "embeddings.class_embedding").replace("pos_embed", "embeddings.position_embedding")
                  .replace("patch_embed.proj", "embeddings.patch_embedding").replace("blocks.", "encoder.layers.")
                  .replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
                  .replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection."))
            if k2.startswith("norm."):
                k2 = "post_layernorm." + k2[len("norm."):]
            vision[k2] = v
        elif k.startswith("blip.text_encoder.") and not k.endswith("position_ids"):
            text[k[len("blip.text_encoder."):]] = v
        elif k.startswith("mlp."):
            mlp[k[len("mlp."):]] = v
    dim = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    return vision, text, mlp, {"dim": dim, "patch": patch, "image": grid * patch, "depth": depth}


def imagereward_mlp(width: int) -> torch.nn.Sequential:
    """ImageReward's head (its MLP class; dropouts are identity in eval)."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class ImageReward:
    def __init__(self, path: str, device: str = "cpu"):
        from torchvision import transforms as T
        from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        p = Path(path)
        state = torch.load(p / "ImageReward.pt", map_location="cpu", weights_only=True)
        vision, text, mlp, shape = convert_imagereward(state)
        med = json.loads((p / "med_config.json").read_text())
        heads = max(1, shape["dim"] // 64)  # BLIP ViTs: 64-d heads (base 12 x 64, large 16 x 64)
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=shape["dim"], intermediate_size=4 * shape["dim"], num_hidden_layers=shape["depth"],
            num_attention_heads=heads, image_size=shape["image"], patch_size=shape["patch"], hidden_act="gelu",
            layer_norm_eps=1e-6))  # BLIP's ViT: LayerNorm eps 1e-6, exact GELU
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
            max_position_embeddings=med["max_position_embeddings"], encoder_hidden_size=shape["dim"],
            layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
            pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None), add_pooling_layer=False)
        self.mlp = imagereward_mlp(med["hidden_size"])
        for mod, sd, name in ((self.vision, vision, "visual_encoder"), (self.text, text, "text_encoder"),
                              (self.mlp, {k.replace("layers.", "", 1): v for k, v in mlp.items()}, "mlp")):
            missing, unexpected = mod.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(f"{p / 'ImageReward.pt'}: {name} keys do not match (missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]})")
        for m in (self.vision, self.text, self.mlp):
            m.eval().to(device)
        self.device = device
        self.tokenizer = BertTokenizer(str(p / "vocab.txt"), do_lower_case=True)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.preprocess = T.Compose([T.Resize(shape["image"], interpolation=T.InterpolationMode.BICUBIC),
                                     T.CenterCrop(shape["image"]), T.Lambda(lambda im: im.convert("RGB")),
                                     T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    @torch.inference_mode()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(self.device)
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        img = self.vision(pixel_values=x).last_hidden_state  # (B, 1 + patches, Dv)
        out = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=img,
                        encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=self.device))
        r = self.mlp(out.last_hidden_state[:, 0, :].float())[:, 0]  # (B,)
        return ((r - IR_MEAN) / IR_STD).double().cpu().numpy()


MODELS = {"PickScore": PickScore, "HPSv2": HPSv2, "ImageReward": ImageReward}


def load_rewards(rewards: dict[str, str], device: str = "cpu") -> dict:
    """{name: scorer} for eval.rewards (name -> local path or s3:// / gs:// URI, fetched once per node
    by _sigma.fetch); a missing path is an error naming it."""
    from _sigma.fetch import local_model

    out = {}
    for name, path in sorted(rewards.items()):
        path = local_model(path)
        if not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"eval.rewards.{name}: {path} does not exist (build the tiny twins with `make models`)")
        out[name] = MODELS[name](os.path.expanduser(path), device)
    return out
