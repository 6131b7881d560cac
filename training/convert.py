"""Checkpoint conversion: official PixArt `.pth` <-> our model <-> diffusers `PixArtTransformer2DModel`.

  python -m training.convert --to-diffusers CKPT OUT_DIR [--preset PixArt-XL/2]
  python -m training.convert --from-diffusers DIR OUT.pth

Our state dict uses the official key layout, so official files load with only two fix-ups:
`pos_embed` is dropped (recomputed every forward) and `y_embedder.y_embedding` (null caption
buffer) is adopted whatever its token count (PixArt-alpha used 120 tokens, Sigma 300).
diffusers has no KV compression: exporting a KV-compressed model raises `ValueError`.
diffusers has no null-caption buffer either: its pipeline encodes "" as the negative prompt.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import warnings
from pathlib import Path

import torch

from training.model import PRESETS, ModelConfig, PixArtSigma, init_kv_compress

# Official prefix -> diffusers prefix for one-to-one renames (qkv / kv are split separately).
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "final_layer.linear": "proj_out",
}
_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
DROP_KEYS = ("pos_embed", "y_embedder.y_embedding")


# ----------------------------------------------------------------------------- official .pth

def _torch_load(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # official files also pickle optimizer/scheduler objects
        warnings.warn(f"{path}: not loadable with weights_only=True; loading full pickle (trust the file)")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path) -> tuple[dict, dict | None]:
    """A `.pth` (official dict with `state_dict`, or a bare state dict) or `.safetensors` file ->
    (state_dict, our saved model_config dict or None)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path)), None
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], obj.get("model_config")
    return obj, None


def config_from_state_dict(sd: dict, base: ModelConfig) -> ModelConfig:
    """Take the shape facts (depth, widths, KV layers, null tokens) from the weights and the rest
    (heads, PE base_size / interpolation, dropout) from `base`."""
    hidden = sd["x_embedder.proj.weight"].shape[0]
    in_ch, p = sd["x_embedder.proj.weight"].shape[1], sd["x_embedder.proj.weight"].shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    kv = sorted(int(k.split(".")[1]) for k in sd if k.endswith("attn.sr.weight"))
    ratio = sd[f"blocks.{kv[0]}.attn.sr.weight"].shape[-1] if kv else 1
    heads = base.num_heads if hidden == base.hidden_size else max(1, hidden // 72)
    over = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p, in_channels=in_ch,
                learn_sigma=out_ch == 2 * in_ch, caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                kv_compress_ratio=ratio, kv_compress_layers=tuple(kv) if kv else None)
    if "y_embedder.y_embedding" in sd:
        over["null_tokens"] = sd["y_embedder.y_embedding"].shape[0]
    return dataclasses.replace(base, **over)


def load_into(model: PixArtSigma, sd: dict) -> list[str]:
    """Load an official-layout state dict. Missing KV-compression weights get Conv Avg Init (the
    stage that adds KV compression); any other missing or unexpected key raises. Returns the
    re-initialised KV blocks."""
    sd = dict(sd)
    sd.pop("pos_embed", None)
    null = sd.pop("y_embedder.y_embedding", None)
    if null is not None:
        model.set_null_embedding(null)
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if k != "y_embedder.y_embedding"]
    bad = [k for k in missing if ".attn.sr." not in k and ".attn.norm." not in k]
    if bad or res.unexpected_keys:
        raise KeyError(f"state dict does not match the model: missing {bad[:8]}, unexpected {res.unexpected_keys[:8]}")
    return init_kv_compress(model, missing) if missing else []


def load_official(path, preset: str = "PixArt-XL/2", **overrides) -> PixArtSigma:
    """Build a model from an official (or our) `.pth` / `.safetensors`: shapes from the weights,
    PE / heads from `preset`, then `overrides` (e.g. kv_compress_ratio=2 to start a KV stage)."""
    sd, saved = read_state_dict(path)
    if saved:
        cfg = ModelConfig(**{k: tuple(v) if k == "kv_compress_layers" and v is not None else v
                             for k, v in saved.items()})
    else:
        cfg = config_from_state_dict(sd, PRESETS[preset])
    model = PixArtSigma(dataclasses.replace(cfg, **overrides))
    load_into(model, sd)
    return model


def save_pth(model: PixArtSigma, path) -> None:
    """Official-style file: {"state_dict": ..., "model_config": ...} (extra key is ignored by the
    official loader). Atomic: temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "model_config": dataclasses.asdict(model.config)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- diffusers

def diffusers_config(cfg: ModelConfig) -> dict:
    """kwargs for `PixArtTransformer2DModel` equal to our config (Sigma: no micro-conditions)."""
    if cfg.kv_layers:
        raise ValueError("diffusers' PixArtTransformer2DModel has no KV compression; export a model with "
                         "kv_compress_ratio=1 (KV-compressed weights cannot be represented)")
    if cfg.mlp_ratio != 4.0:
        raise ValueError("diffusers' PixArt feed-forward is fixed at 4x; mlp_ratio must be 4.0")
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
                cross_attention_dim=cfg.hidden_size, caption_channels=cfg.caption_channels,
                attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                sample_size=cfg.base_size * cfg.patch_size, patch_size=cfg.patch_size,
                interpolation_scale=cfg.pe_interpolation, use_additional_conditions=False)


def config_from_diffusers(dc: dict, base: ModelConfig | None = None) -> ModelConfig:
    base = base or PRESETS["PixArt-XL/2"]
    p = dc.get("patch_size", 2)
    sample = dc.get("sample_size", 128)
    interp = dc.get("interpolation_scale")
    if interp is None:  # diffusers' own default
        interp = max(sample // 64, 1)
    heads = dc["num_attention_heads"]
    return dataclasses.replace(
        base, depth=dc["num_layers"], hidden_size=heads * dc["attention_head_dim"], num_heads=heads,
        patch_size=p, in_channels=dc["in_channels"],
        learn_sigma=dc.get("out_channels") == 2 * dc["in_channels"], caption_channels=dc["caption_channels"],
        mlp_ratio=4.0, base_size=sample // p, pe_interpolation=float(interp), kv_compress_ratio=1,
        kv_compress_layers=None)


def to_diffusers_state_dict(sd: dict, depth: int) -> dict:
    """Official layout -> diffusers layout (qkv and kv split on dim 0; buffers dropped)."""
    out = {}
    for k, v in sd.items():
        if k in DROP_KEYS:
            continue
        if ".attn.sr." in k or ".attn.norm." in k:
            raise ValueError("KV-compression weights cannot be exported to diffusers")
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            pre = f"transformer_blocks.{i}."
            if rest == "scale_shift_table":
                out[pre + rest] = v
                continue
            name, leaf = rest.rsplit(".", 1)
            if name == "attn.qkv":
                for part, t in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                    out[f"{pre}attn1.{part}.{leaf}"] = t.clone()
            elif name == "cross_attn.kv_linear":
                for part, t in zip(("to_k", "to_v"), v.chunk(2, dim=0)):
                    out[f"{pre}attn2.{part}.{leaf}"] = t.clone()
            else:
                out[f"{pre}{_BLOCK[name]}.{leaf}"] = v
        elif k == "final_layer.scale_shift_table":
            out["scale_shift_table"] = v
        else:
            name, leaf = k.rsplit(".", 1)
            out[f"{_TOP[name]}.{leaf}"] = v
    return out


def from_diffusers_state_dict(dsd: dict) -> dict:
    """diffusers layout -> official layout (inverse of `to_diffusers_state_dict`)."""
    top = {v: k for k, v in _TOP.items()}
    blk = {v: k for k, v in _BLOCK.items()}
    out, split = {}, {}
    for k, v in dsd.items():
        if k.startswith("transformer_blocks."):
            _, i, rest = k.split(".", 2)
            pre = f"blocks.{i}."
            if rest == "scale_shift_table":
                out[pre + rest] = v
                continue
            name, leaf = rest.rsplit(".", 1)
            if name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"):
                split[(pre, name, leaf)] = v
            else:
                out[f"{pre}{blk[name]}.{leaf}"] = v
        elif k == "scale_shift_table":
            out["final_layer.scale_shift_table"] = v
        elif k.startswith("pos_embed.pos_embed"):
            continue
        else:
            name, leaf = k.rsplit(".", 1)
            out[f"{top[name]}.{leaf}"] = v
    for (pre, name, leaf) in list(split):
        if name == "attn1.to_q":
            out[f"{pre}attn.qkv.{leaf}"] = torch.cat([split[(pre, f"attn1.to_{c}", leaf)] for c in "qkv"])
        elif name == "attn2.to_k":
            out[f"{pre}cross_attn.kv_linear.{leaf}"] = torch.cat([split[(pre, f"attn2.to_{c}", leaf)] for c in "kv"])
    return out


def to_diffusers(model: PixArtSigma):
    """Our model -> a real diffusers `PixArtTransformer2DModel` holding the same weights."""
    from diffusers import PixArtTransformer2DModel

    dcfg = diffusers_config(model.config)  # raises for KV-compressed models
    dm = PixArtTransformer2DModel(**dcfg)
    dm.load_state_dict(to_diffusers_state_dict(model.state_dict(), model.config.depth), strict=True)
    dtype = next(model.parameters()).dtype
    return dm if dtype == torch.float32 else dm.to(dtype)


def from_diffusers(dm, base: ModelConfig | None = None) -> PixArtSigma:
    """A diffusers `PixArtTransformer2DModel` (or its folder) -> our model with the same weights."""
    if isinstance(dm, (str, Path)):
        from diffusers import PixArtTransformer2DModel
        dm = PixArtTransformer2DModel.from_pretrained(str(dm))
    if getattr(dm, "use_additional_conditions", False):
        raise ValueError("diffusers model uses micro-conditions (PixArt-alpha 1024); Sigma has none")
    model = PixArtSigma(config_from_diffusers(dict(dm.config), base))
    load_into(model, from_diffusers_state_dict(dm.state_dict()))
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Convert PixArt checkpoints (official .pth <-> diffusers).")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-diffusers", nargs=2, metavar=("CKPT", "OUT_DIR"))
    g.add_argument("--from-diffusers", nargs=2, metavar=("DIR", "OUT_PTH"))
    ap.add_argument("--preset", default="PixArt-XL/2", choices=sorted(PRESETS),
                    help="heads / PE settings for a checkpoint without a saved model_config")
    ap.add_argument("--base-size", type=int, default=None, help="override PE base_size")
    ap.add_argument("--pe-interpolation", type=float, default=None, help="override PE interpolation")
    args = ap.parse_args(argv)
    over = {k: v for k, v in (("base_size", args.base_size), ("pe_interpolation", args.pe_interpolation))
            if v is not None}
    if args.to_diffusers:
        ckpt, out = args.to_diffusers
        model = load_official(ckpt, args.preset, **over)
        to_diffusers(model).save_pretrained(out)
        print(f"wrote diffusers PixArtTransformer2DModel to {out}")
    else:
        src, out = args.from_diffusers
        model = from_diffusers(src, PRESETS[args.preset])
        if over:
            model.config = dataclasses.replace(model.config, **over)
        save_pth(model, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
