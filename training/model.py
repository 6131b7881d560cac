"""PixArt-Sigma diffusion transformer (DiT with adaLN-single, cross-attention, KV compression).

Written from the paper (arXiv 2403.04692) and the documented layout of the official checkpoints;
state-dict keys follow the ORIGINAL official layout so released `.pth` files load directly
(`training.convert` maps to/from diffusers' `PixArtTransformer2DModel`).

Shapes: latents x (B, 4, H, W); tokens (B, N, C) with N = (H/p)*(W/p) in row-major grid order;
caption y (B, L, caption_channels) with mask (B, L), 1 = valid token.

Differences from the official code (quirks fixed, all documented in training/README.md):
- Cross-attention with a sample that has ZERO valid caption tokens returns 0 for that sample
  (attention to nothing) instead of NaN / attending padding.
- Null caption (`null_policy`): "own" (default) swaps BOTH y and mask, so a dropped caption and the
  unconditional CFG branch see T5("") under its own mask, as diffusers' PixArtSigmaPipeline
  guides; "condition" is the official PixArtMS rule (the 300-token null under the caption's mask).
- Classifier-free guidance guides all `in_channels` eps channels (DiT guided only 3).
- KV compression works on odd token grids: the grid is edge-replicate padded to a multiple of R
  for "conv" and "avgpool" (every token contributes, no row/column silently cropped); "uniform"
  keeps the top-left token of every (possibly partial) RxR window; "ave" is the official call
  (nearest-neighbour interpolation: the same tokens as "uniform", partial windows dropped).
- The position embedding is computed in float64 on the model's device (no per-step host copy)
  and cached per (grid, base_size, interpolation, device, dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The layers live in training.blocks; sincos_pos_embed / timestep_embedding stay importable from here.
# KV_MODES: the KV compression modes, defined (and validated) where the attention is.
from training.blocks import (KV_MODES, CaptionEmbedder, FinalLayer, PatchEmbed, PixArtBlock,  # noqa: F401
                             TimestepEmbedder, cross_attn_masks, sincos_pos_embed, timestep_embedding)

NULL_POLICIES = ("own", "condition")


@dataclass(frozen=True)
class ModelConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True
    caption_channels: int = 4096
    mlp_ratio: float = 4.0
    # PE: grid coordinate i / (n / base_size) / pe_interpolation. base_size = latent_size // patch
    # (64 at 1024px), pe_interpolation = image_size / 512. Changing resolution only changes these.
    base_size: int = 64
    pe_interpolation: float = 2.0
    # KV token compression: R = stride of the RxR window (token count / R^2); 1 = off.
    kv_compress_ratio: int = 1
    kv_compress_layers: tuple[int, ...] | None = None  # None -> deep half (14..27 for depth 28)
    kv_compress_mode: str = "conv"
    grad_checkpoint: bool = False
    caption_dropout: float = 0.1
    # Null caption = a fixed (never trained) buffer `y_embedding` (null_tokens, caption_channels):
    # T5("") padded to 300 tokens (the official Sigma shape; `set_null_embedding`). Its own mask
    # keeps the first `null_valid_tokens` (T5 encodes "" as the single </s> token).
    null_tokens: int = 300
    null_valid_tokens: int = 1
    # How the null caption is masked in caption dropout and in the CFG unconditional branch:
    # "own" = its own mask (diffusers' PixArtSigmaPipeline; our training), "condition" = the
    # caption's mask over the padded null (official PixArtMS training and sampling).
    null_policy: str = "own"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.kv_compress_mode not in KV_MODES:
            raise ValueError(f"kv_compress_mode must be one of {KV_MODES}, got {self.kv_compress_mode!r}")
        if self.kv_compress_ratio < 1:
            raise ValueError("kv_compress_ratio must be >= 1")
        if self.kv_compress_layers is not None:
            object.__setattr__(self, "kv_compress_layers", tuple(int(i) for i in self.kv_compress_layers))
            bad = [i for i in self.kv_compress_layers if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"kv_compress_layers {bad} outside 0..{self.depth - 1}")
        if self.null_policy not in NULL_POLICIES:
            raise ValueError(f"null_policy must be one of {NULL_POLICIES}, got {self.null_policy!r}")
        if not 1 <= self.null_valid_tokens <= self.null_tokens:
            raise ValueError("null_valid_tokens must be in 1..null_tokens")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError("caption_dropout must be in [0, 1)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose self-attention compresses K/V (empty when R == 1)."""
        if self.kv_compress_ratio == 1:
            return ()
        if self.kv_compress_layers is None:
            return tuple(range(self.depth // 2, self.depth))
        return self.kv_compress_layers


PRESETS: dict[str, ModelConfig] = {
    # 0.6B PixArt-Sigma (PE of 1024px: a stage or `pe_settings(image_size)` sets the resolution).
    "PixArt-XL/2": ModelConfig(depth=28, hidden_size=1152, num_heads=16),
    # Tiny real-architecture model for tests / demo: T5 d_model 32, 64px images (8x8 latents).
    "PixArt-tiny": ModelConfig(depth=4, hidden_size=64, num_heads=4, caption_channels=32, base_size=4,
                               pe_interpolation=0.125),
}


# PE interpolation of the released weights per training image size (the official converter's
# `interpolation_scale_alpha` / `_sigma` tables). Sigma follows image_size / 512 (2880 -> 5.625 is
# that rule extrapolated: no official 4K weights exist); alpha trained 256 and 512 at 1.0.
PE_ALPHA = {256: 1.0, 512: 1.0, 1024: 2.0}


def pe_settings(image_size: int, version: str = "sigma", patch_size: int = 2) -> dict:
    """{base_size, pe_interpolation} of a model trained at `image_size` px (official rules:
    base_size = latent side / patch; pe_interpolation from the converter tables above)."""
    if image_size % (8 * patch_size):
        raise ValueError(f"image_size {image_size} is not a multiple of {8 * patch_size}")
    if version == "alpha":
        if image_size not in PE_ALPHA:
            raise ValueError(f"PixArt-alpha weights exist at {sorted(PE_ALPHA)} px, not {image_size}")
        interp = PE_ALPHA[image_size]
    elif version == "sigma":
        interp = image_size / 512
    else:
        raise ValueError(f"version must be 'alpha' or 'sigma', got {version!r}")
    return {"base_size": image_size // 8 // patch_size, "pe_interpolation": interp}


def build_model(preset: str, **overrides) -> "PixArtSigma":
    """Build a preset, e.g. `build_model("PixArt-XL/2", kv_compress_ratio=2)`. Unknown keys raise."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return PixArtSigma(replace(PRESETS[preset], **overrides))


# ----------------------------------------------------------------------------- the model

class PixArtSigma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        c = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))  # adaLN-single, key t_block.1
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, c, cfg.null_tokens)
        kv = set(cfg.kv_layers)
        self.blocks = nn.ModuleList(
            PixArtBlock(c, cfg.num_heads, cfg.mlp_ratio, cfg.kv_compress_ratio if i in kv else 1,
                        cfg.kv_compress_mode)
            for i in range(cfg.depth))
        self.final_layer = FinalLayer(c, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    # -- init -----------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self):
        """Original init: xavier-uniform linears (bias 0); patch conv xavier on its flattened
        weight; embedders normal(0.02); cross-attn output and final linear zeroed; KV Conv Avg."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.bias)
            blk.attn.reset_kv_compress()
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- null caption ---------------------------------------------------------------------
    @torch.no_grad()
    def set_null_embedding(self, emb: torch.Tensor, valid_tokens: int | None = None):
        """Use `emb` (n, caption_channels) as the null caption: T5("") padded to max_length as the
        official `load_checkpoint` writes it (see training.null). Its own mask keeps the first
        `valid_tokens` (None: unchanged; 1 for T5, which encodes "" as the lone </s>)."""
        emb = emb.detach().reshape(-1, self.config.caption_channels)
        self.y_embedder.y_embedding = emb.to(self.y_embedder.y_embedding)
        n = emb.shape[0]
        valid = self.config.null_valid_tokens if valid_tokens is None else int(valid_tokens)
        self.config = replace(self.config, null_tokens=n, null_valid_tokens=max(1, min(valid, n)))

    def null_caption(self, batch: int, length: int | None = None):
        """(y (B, L, Cy), own mask (B, L)): the null buffer cropped / zero-padded to L tokens
        (default all of it); the own mask keeps its first null_valid_tokens."""
        e = self.y_embedder.y_embedding
        n = e.shape[0]
        length = n if length is None else length
        y = e.new_zeros(batch, length, e.shape[1])
        k = min(n, length)
        y[:, :k] = e[:k]
        mask = torch.zeros(batch, length, dtype=torch.bool, device=e.device)
        mask[:, :min(self.config.null_valid_tokens, length)] = True
        return y, mask

    def drop_captions(self, y: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
        """Caption dropout (training) and the unconditional CFG rows: rows where drop (B,) is true
        see the null caption. y (B, L, Cy), mask (B, L) -> y (B, L', Cy), mask (B, L').
        policy "own": y and mask are both replaced (L' >= null_valid_tokens);
        policy "condition": y is replaced by the padded null and the caption's mask is kept, as the
        official `CaptionEmbedder.token_drop` + `PixArtMS.forward` do (L' = L)."""
        drop = drop.to(device=y.device, dtype=torch.bool)
        if not bool(drop.any()):
            return y, mask.bool()
        mask = mask.bool()
        if self.config.null_policy == "own":
            extra = self.config.null_valid_tokens - y.shape[1]
            if extra > 0:
                y, mask = F.pad(y, (0, 0, 0, extra)), F.pad(mask, (0, extra))
        ny, nm = self.null_caption(y.shape[0], y.shape[1])
        y = torch.where(drop[:, None, None], ny.to(y.dtype), y)
        if self.config.null_policy == "own":
            mask = torch.where(drop[:, None], nm, mask)
        return y, mask

    # -- forward --------------------------------------------------------------------------
    def pos_embed(self, gh: int, gw: int, device, dtype) -> torch.Tensor:
        cfg = self.config
        return sincos_pos_embed(cfg.hidden_size, (gh, gw), cfg.base_size, cfg.pe_interpolation, device, dtype)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """(B, N, p*p*Co) -> (B, Co, gh*p, gw*p)."""
        p, co = self.config.patch_size, self.config.out_channels
        b = x.shape[0]
        x = x.reshape(b, gh, gw, p, p, co).permute(0, 5, 1, 3, 2, 4)  # (B, Co, gh, p, gw, p)
        return x.reshape(b, co, gh * p, gw * p)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Cin, H, W); timestep (B,); y (B, L, Cy) or (B, 1, L, Cy); mask (B, L) 1 = valid.
        In training mode each caption is swapped for the null caption with p = caption_dropout
        (or where `force_drop_ids` (B,) is true). Returns (B, Cout, H, W)."""
        cfg = self.config
        p = cfg.patch_size
        b, _, hh, ww = x.shape
        if hh % p or ww % p:
            raise ValueError(f"latent size {hh}x{ww} is not a multiple of patch {p}")
        gh, gw = hh // p, ww // p
        if y.dim() == 4:  # official layout (B, 1, L, C)
            y = y.squeeze(1)
        if mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        mask = mask.reshape(b, -1).bool()
        if timestep.dim() == 0:
            timestep = timestep.expand(b)

        drop = force_drop_ids.bool() if force_drop_ids is not None else None
        if drop is None and self.training and cfg.caption_dropout > 0:
            drop = torch.rand(b, device=x.device) < cfg.caption_dropout
        if drop is not None:
            y, mask = self.drop_captions(y, mask, drop)

        # Drop token columns that are padding for the whole batch: exact, and saves compute
        # (captions are padded to 300 but often much shorter).
        keep = mask.any(dim=0)
        if bool(keep.any()) and not bool(keep.all()):
            y, mask = y[:, keep], mask[:, keep]

        h = self.x_embedder(x) + self.pos_embed(gh, gw, x.device, x.dtype)[None]  # (B, N, C)
        t = self.t_embedder(timestep)  # (B, C)
        t0 = self.t_block(t)  # (B, 6C)
        yc = self.y_embedder.y_proj(y)  # (B, L, C)
        attn_mask, row_keep = cross_attn_masks(mask)
        for blk in self.blocks:
            if cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, yc, attn_mask, row_keep, t0, gh, gw, use_reentrant=False)
            else:
                h = blk(h, yc, attn_mask, row_keep, t0, gh, gw)
        h = self.final_layer(h, t)  # (B, N, p*p*Cout)
        return self.unpatchify(h, gh, gw)

    def forward_with_cfg(self, x, timestep, y, mask, null_y, cfg_scale: float, null_mask=None):
        """Classifier-free guidance in one batched pass of 2B. Guides the eps channels (the first
        in_channels); the learned-variance channels come from the conditional branch.
        null_y None: the model's null caption under its `null_policy` (exactly what caption
        dropout trained: `drop_captions` on a copy of the batch). Otherwise an explicit negative
        caption null_y (B or 1, L', Cy) under null_mask (B or 1, L') (default all valid)."""
        b = x.shape[0]
        if y.dim() == 4:
            y = y.squeeze(1)
        if mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        mask = mask.reshape(b, -1).bool()
        if null_y is None:
            yy, mm = self.drop_captions(torch.cat([y, y]), torch.cat([mask, mask]),
                                        torch.arange(2 * b, device=y.device) >= b)
        else:
            if null_y.dim() == 4:
                null_y = null_y.squeeze(1)
            null_y = null_y.expand(b, -1, -1)
            if null_mask is None:
                null_mask = torch.ones(null_y.shape[:2], dtype=torch.bool, device=y.device)
            null_mask = null_mask.reshape(-1, null_y.shape[1]).expand(b, -1).bool()
            length = max(y.shape[1], null_y.shape[1])

            def pad(t, m):
                extra = length - t.shape[1]
                if extra:
                    t, m = F.pad(t, (0, 0, 0, extra)), F.pad(m, (0, extra))
                return t, m

            (yc, mc), (yn, mn) = pad(y, mask), pad(null_y.to(y.dtype), null_mask)
            yy, mm = torch.cat([yc, yn]), torch.cat([mc, mn])
        if timestep.dim() == 0:
            timestep = timestep.expand(b)
        out = self.forward(torch.cat([x, x]), torch.cat([timestep, timestep]), yy, mm,
                           force_drop_ids=torch.zeros(2 * b, dtype=torch.bool, device=x.device))
        cond, uncond = out[:b], out[b:]
        ci = self.config.in_channels
        eps = uncond[:, :ci] + cfg_scale * (cond[:, :ci] - uncond[:, :ci])
        return torch.cat([eps, cond[:, ci:]], dim=1)


# ----------------------------------------------------------------------------- stage helpers

@torch.no_grad()
def init_kv_compress(model: PixArtSigma, missing_keys=None) -> list[str]:
    """Conv Avg Init for KV-compression layers that a loaded checkpoint did not provide.

    Call after `load_state_dict(sd, strict=False)` with its `missing_keys` (or None = all KV
    layers). Returns the names of the blocks re-initialised. PE interpolation needs no weights:
    the position embedding is recomputed from base_size / pe_interpolation every forward."""
    done = []
    for i, blk in enumerate(model.blocks):
        if not hasattr(blk.attn, "sr"):
            continue
        prefix = f"blocks.{i}.attn."
        if missing_keys is None or any(k.startswith(prefix + "sr") or k.startswith(prefix + "norm")
                                       for k in missing_keys):
            blk.attn.reset_kv_compress()
            done.append(f"blocks.{i}")
    return done


def count_parameters(config: ModelConfig) -> int:
    """Parameter count without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        m = PixArtSigma(config)
    return sum(p.numel() for p in m.parameters())
