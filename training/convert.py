"""Checkpoint conversion: official PixArt `.pth` <-> our model <-> diffusers `PixArtTransformer2DModel`.

  python -m training.convert --to-diffusers CKPT OUT_DIR --image-size 1024 [--pe-version sigma]
  python -m training.convert --from-diffusers DIR OUT.pth [--null-caption T5_DIR|NULL_FILE]

Our state dict uses the official key layout, so official files load with only two fix-ups:
`pos_embed` is dropped (recomputed every forward) and `y_embedder.y_embedding` (null caption
buffer) is adopted whatever its token count (PixArt-alpha used 120 tokens, Sigma 300), or
overwritten with T5("") when a null source is given (as the official `load_checkpoint` does).
Position embedding: an official file records no resolution, so it must be given (`image_size`,
the official converter's `--image_size`); our own files and training checkpoints record it.
Files are read with torch.load(weights_only=True) (training.files): a file that needs a full
pickle is refused unless trust_pickle / `--trust-pickle`.
diffusers has no KV compression: exporting a KV-compressed model raises `ValueError`.
diffusers has no null-caption buffer: its pipeline encodes "" as the negative prompt, so an
import needs a null source (a pipeline folder brings its own T5).
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from _sigma import fs
from training.files import load_safetensors, torch_load
from training.model import PRESETS, ModelConfig, PixArtSigma, init_kv_compress, pe_settings
from training.null import null_from

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

def read_state_dict(path, trust_pickle: bool = False) -> tuple[dict, dict | None]:
    """A `.pth` (official dict with `state_dict`, or a bare state dict) or `.safetensors` file,
    local or URI -> (state_dict, our saved model_config dict or None)."""
    if str(path).endswith(".safetensors"):
        return load_safetensors(str(path)), None
    obj = torch_load(str(path), trust_pickle)
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


def _saved_config(saved: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in saved.items() if k in names}
    if kw.get("kv_compress_layers") is not None:
        kw["kv_compress_layers"] = tuple(kw["kv_compress_layers"])
    return ModelConfig(**kw)


def load_official(path, preset: str = "PixArt-XL/2", image_size: int | None = None, version: str = "sigma",
                  null=None, trust_pickle: bool = False, **overrides) -> PixArtSigma:
    """Build a model from an official (or our) `.pth` / `.safetensors`: shapes from the weights.

    PE: our files record it (model_config); an official file needs `image_size` (the resolution
    it was trained at; `version` alpha|sigma picks the official interpolation table) or explicit
    base_size + pe_interpolation overrides, else ValueError. Weights without our model_config are
    official-origin: null_policy "condition" (PixArtMS guides with the null under the caption's
    mask). `null` (a null source, see training.null) overwrites the null caption as the official
    load_checkpoint does. `overrides` apply last (e.g. kv_compress_ratio=2 to start a KV stage)."""
    sd, saved = read_state_dict(path, trust_pickle)
    if saved:
        cfg = _saved_config(saved)
    else:
        if image_size is not None:
            pe = pe_settings(int(image_size), version, sd["x_embedder.proj.weight"].shape[2])
        elif "base_size" in overrides and "pe_interpolation" in overrides:
            pe = {}
        else:
            raise ValueError(f"{path}: the file does not record its resolution: give image_size (the size it "
                             "was trained at, e.g. --image-size 1024 as the official converter's --image_size)")
        cfg = dataclasses.replace(config_from_state_dict(sd, PRESETS[preset]), null_policy="condition", **pe)
    model = PixArtSigma(dataclasses.replace(cfg, **overrides))
    load_into(model, sd)
    if null is not None:
        model.set_null_embedding(*null_from(null, model.config.null_tokens, trust_pickle))
    return model


def save_pth(model: PixArtSigma, path) -> None:
    """Official-style file: {"state_dict": ..., "model_config": ...} (the extra key is ignored by
    the official loader; it records PE and null policy). Local or URI, atomic and fsynced."""
    obj = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "model_config": dataclasses.asdict(model.config)}
    with fs.atomic_output(fs.normalize(path)) as f:
        torch.save(obj, f)


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


def pipeline_root(path) -> str | None:
    """The diffusers pipeline folder (model_index.json) `path` is or whose transformer it is."""
    p = os.path.abspath(os.path.expanduser(str(path)))
    for cand in (p, os.path.dirname(p)):
        if os.path.isfile(os.path.join(cand, "model_index.json")):
            return cand
    return None


def from_diffusers(dm, base: ModelConfig | None = None, null=None, trust_pickle: bool = False) -> PixArtSigma:
    """A diffusers `PixArtTransformer2DModel` (or its folder, or a pipeline folder) -> our model
    with the same weights and null_policy "own" (diffusers guides with T5("") under its own mask).
    The null caption comes from `null` (training.null source), else from the pipeline folder's
    own T5; without either the buffer is NOT T5("") (warned; sampling callers require one)."""
    if isinstance(dm, (str, os.PathLike)):
        from diffusers import PixArtTransformer2DModel

        root = pipeline_root(dm)
        folder = os.path.join(root, "transformer") if root and not os.path.isfile(os.path.join(str(dm), "config.json")) \
            else str(dm)
        if null is None and root is not None:
            null = root  # its text_encoder + tokenizer
        dm = PixArtTransformer2DModel.from_pretrained(folder)
    if getattr(dm, "use_additional_conditions", False):
        raise ValueError("diffusers model uses micro-conditions (PixArt-alpha 1024); Sigma has none")
    model = PixArtSigma(dataclasses.replace(config_from_diffusers(dict(dm.config), base), null_policy="own"))
    load_into(model, from_diffusers_state_dict(dm.state_dict()))
    if null is not None:
        model.set_null_embedding(*null_from(null, 300, trust_pickle))
    else:
        warnings.warn("diffusers weights carry no null caption: y_embedding is not T5(\"\") (give a null source)")
    return model


def main(argv=None) -> int:
    """`python -m training.convert` = `sigma-convert` (training.cli holds the parser and the checks)."""
    from training.cli import convert

    return convert(argv)


def run(args) -> int:
    """The conversion of checked sigma-convert arguments."""
    over = {k: v for k, v in (("base_size", args.base_size), ("pe_interpolation", args.pe_interpolation))
            if v is not None}
    try:
        if args.to_diffusers:
            ckpt, out = args.to_diffusers
            model = load_official(ckpt, args.preset, args.image_size, args.version, trust_pickle=args.trust_pickle,
                                  **over)
            to_diffusers(model).save_pretrained(out)
            print(f"wrote diffusers PixArtTransformer2DModel to {out}")
        else:
            src, out = args.from_diffusers
            if args.null_caption is None and pipeline_root(src) is None:
                raise ValueError(f"{src}: diffusers weights carry no null caption; pass --null-caption "
                                 "(the T5 folder or a null file: the null is T5(\"\") padded to 300 tokens)")
            model = from_diffusers(src, PRESETS[args.preset], null=args.null_caption, trust_pickle=args.trust_pickle)
            if over:
                model.config = dataclasses.replace(model.config, **over)
            save_pth(model, out)
            print(f"wrote {out}")
    except ValueError as e:  # incl. training.files.PickleRefused
        from _sigma.cli import fail

        fail("sigma-convert", str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
