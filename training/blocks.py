"""Layers of the PixArt-Sigma DiT (training.model assembles them): sin-cos position embedding,
timestep / patch / caption embedders, self-attention with KV token compression, masked
cross-attention, the adaLN-single block and the final layer. Key names follow the official layout.

Shapes: tokens (B, N, C) in row-major (gh, gw) grid order; captions (B, L, C) with mask (B, L).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- embeddings

@lru_cache(maxsize=16)
def _sincos_2d(dim: int, gh: int, gw: int, base_size: float, interp: float, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """(gh*gw, dim), computed in float64 ON the target device (no host-to-device copy per step;
    a 4K grid is 32400 x 1152) and cached per grid/device/dtype (a stage has few bucket shapes).
    First dim/2 channels encode the column (x) coordinate, the second half the row (y) coordinate,
    as the official code and diffusers do; each axis spans [0, base_size / interp)."""
    if dim % 4:
        raise ValueError("hidden_size must be divisible by 4 for the 2D sin-cos embedding")
    f64 = torch.float64 if device.type != "mps" else torch.float32
    ys = torch.arange(gh, dtype=f64, device=device) / (gh / base_size) / interp  # (gh,)
    xs = torch.arange(gw, dtype=f64, device=device) / (gw / base_size) / interp  # (gw,)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=f64, device=device) / (dim / 4))  # (D/4,)

    def axis(pos):  # (n,) -> (n, D/2) = [sin, cos]
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    ex = axis(xs)[None, :, :].expand(gh, gw, dim // 2)  # varies along columns
    ey = axis(ys)[:, None, :].expand(gh, gw, dim // 2)  # varies along rows
    return torch.cat([ex, ey], dim=-1).reshape(gh * gw, dim).to(dtype)


def sincos_pos_embed(dim: int, grid_hw: tuple[int, int], base_size: float, pe_interpolation: float,
                     device=None, dtype=torch.float32) -> torch.Tensor:
    """2D sin-cos PE for a (gh, gw) token grid -> (gh*gw, dim). Needs no weights: a resolution
    change (PE interpolation) only changes base_size / pe_interpolation."""
    # inference_mode(False): a cached tensor first built while sampling must stay usable in training
    with torch.inference_mode(False), torch.no_grad():
        return _sincos_2d(dim, int(grid_hw[0]), int(grid_hw[1]), float(base_size), float(pe_interpolation),
                          torch.device(device or "cpu"), dtype)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) float timesteps -> (B, dim) as [cos, sin] with frequencies exp(-ln(P) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, p: int, cin: int, c: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, c, kernel_size=p, stride=p)

    def forward(self, x):  # (B, cin, H, W) -> (B, N, C)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, c: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, c), nn.SiLU(), nn.Linear(c, c))  # keys mlp.0 / mlp.2

    def forward(self, t):  # (B,) -> (B, C)
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (used for the caption projection and inside every block)."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, cout)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, cin: int, c: int, null_tokens: int):
        super().__init__()
        self.y_proj = Mlp(cin, c, c)
        # Fixed null caption (never trained; a buffer, saved in the state dict like the original).
        g = torch.Generator().manual_seed(0)
        self.register_buffer("y_embedding", torch.randn(null_tokens, cin, generator=g) / cin ** 0.5)


# ----------------------------------------------------------------------------- attention

# conv: the paper's Conv 2x2 (official `conv`); uniform: top-left token of each window (official
# `uniform`, the paper's "token discarding"); ave: the official `ave` = F.interpolate nearest (the
# same tokens as uniform: NOT an average); avgpool: the RxR mean (the paper's "token pooling").
KV_MODES = ("conv", "uniform", "ave", "avgpool")

class SelfAttention(nn.Module):
    """Multi-head self-attention (SDPA) with optional KV token compression on the (gh, gw) grid."""

    def __init__(self, c: int, heads: int, kv_ratio: int = 1, kv_mode: str = "conv"):
        super().__init__()
        if kv_mode not in KV_MODES:  # an unknown mode would build the conv-less path and crash in forward
            raise ValueError(f"kv_mode {kv_mode!r}: allowed {' | '.join(KV_MODES)}")
        self.heads, self.ratio, self.mode = heads, kv_ratio, kv_mode
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        if kv_ratio > 1 and kv_mode == "conv":
            # Depthwise RxR conv shared by K and V + LayerNorm (keys attn.sr / attn.norm).
            self.sr = nn.Conv2d(c, c, kernel_size=kv_ratio, stride=kv_ratio, groups=c)
            self.norm = nn.LayerNorm(c)
            self.reset_kv_compress()

    @torch.no_grad()
    def reset_kv_compress(self):
        """Conv Avg Init: every RxR window starts as its mean (w = 1/R^2, b = 0), LayerNorm identity."""
        if hasattr(self, "sr"):
            self.sr.weight.fill_(1.0 / self.ratio ** 2)
            self.sr.bias.zero_()
            self.norm.reset_parameters()

    def _compress(self, t: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """(B, N, C) on a (gh, gw) grid -> (B, ceil(gh/R)*ceil(gw/R), C) (floor for "ave")."""
        b, n, c = t.shape
        r = self.ratio
        g = t.transpose(1, 2).reshape(b, c, gh, gw)
        if self.mode == "uniform":
            return g[:, :, ::r, ::r].flatten(2).transpose(1, 2)
        if self.mode == "ave":  # the official call, verbatim semantics (nearest, not a mean)
            return F.interpolate(g, scale_factor=1 / r, mode="nearest").flatten(2).transpose(1, 2)
        ph, pw = (-gh) % r, (-gw) % r
        if ph or pw:  # odd grid: replicate the edge so the last partial window is still a mean
            g = F.pad(g, (0, pw, 0, ph), mode="replicate")
        if self.mode == "avgpool":
            return F.avg_pool2d(g, r).flatten(2).transpose(1, 2)
        return self.norm(self.sr(g).flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, C)
        if self.ratio > 1:
            k, v = self._compress(k, gh, gw), self._compress(v, gh, gw)  # (B, N/R^2, C)
        h = self.heads
        q, k, v = (z.reshape(b, -1, h, c // h).transpose(1, 2) for z in (q, k, v))  # (B, h, *, d)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from caption tokens; masked tokens are excluded."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(c, c)
        self.kv_linear = nn.Linear(c, 2 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, y: torch.Tensor, attn_mask: torch.Tensor | None,
                row_keep: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, C); y (B, L, C) projected caption; attn_mask (B, 1, 1, L) bool or None (all
        valid); row_keep (B, 1, 1) 0/1 or None (no sample without valid tokens). Both are built
        once per forward by `cross_attn_masks`."""
        b, n, c = x.shape
        h = self.heads
        q = self.q_linear(x).reshape(b, n, h, c // h).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv_linear(y).reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)  # (B, h, L, d) x2
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = o.transpose(1, 2).reshape(b, n, c)
        if row_keep is not None:
            o = o * row_keep.to(o.dtype)
        return self.proj(o)


def cross_attn_masks(mask: torch.Tensor):
    """mask (B, L) bool -> (attn_mask (B, 1, 1, L) or None, row_keep (B, 1, 1) or None).

    A sample with ZERO valid tokens would softmax over nothing (NaN): it attends to every token
    and its cross-attention output is then multiplied by 0, i.e. attention to nothing adds nothing.
    No mask at all when every token is valid (lets SDPA use its fastest kernel)."""
    if bool(mask.all()):
        return None, None
    empty = ~mask.any(dim=1)  # (B,)
    if bool(empty.any()):
        return (mask | empty[:, None])[:, None, None, :], (~empty).float()[:, None, None]
    return mask[:, None, None, :], None


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


class PixArtBlock(nn.Module):
    def __init__(self, c: int, heads: int, mlp_ratio: float, kv_ratio: int = 1, kv_mode: str = "conv"):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(c, heads, kv_ratio, kv_mode)
        self.cross_attn = CrossAttention(c, heads)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(c, int(c * mlp_ratio), c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c ** 0.5)

    def forward(self, x, y, attn_mask, row_keep, t0, gh: int, gw: int):
        # x (B, N, C); t0 (B, 6C) from the shared t_block; y (B, L, C); masks from cross_attn_masks
        b = x.shape[0]
        mods = (self.scale_shift_table[None] + t0.reshape(b, 6, -1)).chunk(6, dim=1)  # 6 x (B, 1, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa), gh, gw)
        x = x + self.cross_attn(x, y, attn_mask, row_keep)  # no norm, no gate (as the original)
        x = x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, c: int, p: int, cout: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c, p * p * cout)
        self.scale_shift_table = nn.Parameter(torch.randn(2, c) / c ** 0.5)

    def forward(self, x, t):  # x (B, N, C), t (B, C) timestep embedding (before t_block)
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))
