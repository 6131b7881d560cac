"""PixArt-Sigma DiT: exact parameter counts, official key layout, PE vs diffusers, masking,
KV compression operators, init, CFG, caption dropout, gradient checkpointing."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from training.convert import load_into
from training.model import (PRESETS, build_model, count_parameters, init_kv_compress, sincos_pos_embed)

TINY = "PixArt-tiny"


def _perturb(model, scale=0.05, seed=0):
    """Random non-zero weights (the original init zeroes outputs, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _inputs(b=2, h=8, w=12, L=6, cy=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randn(b, L, cy, generator=g)
    mask = torch.zeros(b, L, dtype=torch.bool)
    for i in range(b):
        mask[i, : 1 + (3 * i) % L] = True
    return x, t, y, mask


def test_xl_parameter_counts_exact():
    xl = PRESETS["PixArt-XL/2"]
    assert count_parameters(xl) == 610_856_096
    kv = dataclasses.replace(xl, kv_compress_ratio=2)
    assert kv.kv_layers == tuple(range(14, 28))
    assert count_parameters(kv) - count_parameters(xl) == 112_896


def test_official_key_layout_on_meta():
    with torch.device("meta"):
        m = build_model("PixArt-XL/2", kv_compress_ratio=2)
    sd = m.state_dict()
    for k in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "t_block.1.weight",
              "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.bias", "y_embedder.y_embedding",
              "blocks.0.scale_shift_table", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
              "blocks.0.cross_attn.q_linear.weight", "blocks.0.cross_attn.kv_linear.weight",
              "blocks.0.cross_attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
              "final_layer.linear.weight", "final_layer.scale_shift_table"]:
        assert k in sd, k
    assert tuple(sd["blocks.14.attn.sr.weight"].shape) == (1152, 1, 2, 2)
    assert "blocks.13.attn.sr.weight" not in sd and "blocks.27.attn.norm.bias" in sd
    assert tuple(sd["y_embedder.y_embedding"].shape) == (300, 4096)
    assert tuple(sd["final_layer.linear.weight"].shape) == (2 * 2 * 8, 1152)
    assert not any("pos_embed" in k for k in sd)


@pytest.mark.parametrize("grid,base,interp", [((4, 4), 4, 1.0), ((6, 10), 4, 0.5), ((64, 64), 64, 2.0),
                                              ((45, 80), 64, 2.0), ((7, 3), 16, 0.5)])
def test_pos_embed_equals_diffusers(grid, base, interp):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(64, grid, base_size=base, interpolation_scale=interp)
    ours = sincos_pos_embed(64, grid, base, interp, dtype=torch.float64)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.double(), atol=1e-6, rtol=0)


def test_pos_embed_span_and_axes():
    # Every axis spans [0, base/interp) whatever the grid: the last column coordinate of a 10-wide
    # grid at base 4, interp 0.5 is 9 / 2.5 / 0.5 = 7.2, i.e. channel 0 (x, omega=1) = sin(7.2).
    pe = sincos_pos_embed(8, (6, 10), 4, 0.5, dtype=torch.float64).reshape(6, 10, 8)
    assert pe[0, 9, 0].item() == pytest.approx(torch.sin(torch.tensor(9 / 2.5 / 0.5, dtype=torch.float64)).item())
    assert pe[5, 0, 4].item() == pytest.approx(torch.sin(torch.tensor(5 / 1.5 / 0.5, dtype=torch.float64)).item())


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (12, 6), (10, 14)])
@pytest.mark.parametrize("mode", ["conv", "uniform", "ave", "avgpool"])
def test_forward_shapes_multi_aspect_with_kv(hw, mode):
    m = _perturb(build_model(TINY, kv_compress_ratio=2, kv_compress_mode=mode))
    x, t, y, mask = _inputs(h=hw[0], w=hw[1])
    out = m(x, t, y, mask)
    assert out.shape == (2, 8, *hw) and torch.isfinite(out).all()


def test_rejects_non_patch_multiple():
    m = build_model(TINY)
    with pytest.raises(ValueError):
        m(torch.randn(1, 4, 7, 8), torch.zeros(1), torch.randn(1, 2, 32), torch.ones(1, 2))


def test_padding_excluded_and_zero_valid_tokens():
    m = _perturb(build_model(TINY))
    x, t, y, mask = _inputs(L=6)
    base = m(x, t, y, mask)
    # extra padding tokens with arbitrary content change nothing
    y2 = torch.cat([y, 100 * torch.randn(2, 5, 32)], 1)
    m2 = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(m(x, t, y2, m2), base, atol=1e-5, rtol=1e-5)
    # content under the mask changes nothing either
    y3 = torch.where(mask[..., None], y, torch.randn_like(y) * 50)
    torch.testing.assert_close(m(x, t, y3, mask), base, atol=1e-5, rtol=1e-5)
    # zero valid tokens: finite, independent of y, and does not disturb the other sample
    mz = mask.clone()
    mz[0] = False
    out = m(x, t, y, mz)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], base[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, t, torch.randn_like(y), mz)[0], out[0], atol=1e-5, rtol=1e-5)
    # all samples empty
    assert torch.isfinite(m(x, t, y, torch.zeros_like(mask))).all()


def test_batch_independence():
    m = _perturb(build_model(TINY))
    x, t, y, mask = _inputs(b=3)
    full = m(x, t, y, mask)
    for i in range(3):
        torch.testing.assert_close(m(x[i:i + 1], t[i:i + 1], y[i:i + 1], mask[i:i + 1]), full[i:i + 1],
                                   atol=1e-5, rtol=1e-5)


def test_kv_compress_operators_against_manual():
    c = 64
    m = build_model(TINY, kv_compress_ratio=2)
    attn = m.blocks[-1].attn
    gh, gw = 5, 3  # odd grid: replicate-padded to 6x4
    k = torch.randn(2, gh * gw, c)
    grid = k.transpose(1, 2).reshape(2, c, gh, gw)
    padded = torch.cat([grid, grid[:, :, -1:]], 2)
    padded = torch.cat([padded, padded[:, :, :, -1:]], 3)  # (2, c, 6, 4)
    avg = padded.reshape(2, c, 3, 2, 2, 2).mean((3, 5)).flatten(2).transpose(1, 2)  # (2, 6, c)
    # conv with Conv Avg Init == LayerNorm(window mean)
    torch.testing.assert_close(attn._compress(k, gh, gw), F.layer_norm(avg, (c,)), atol=1e-5, rtol=1e-5)
    attn.mode = "avgpool"
    torch.testing.assert_close(attn._compress(k, gh, gw), avg, atol=1e-6, rtol=1e-6)
    attn.mode = "uniform"
    torch.testing.assert_close(attn._compress(k, gh, gw), grid[:, :, ::2, ::2].flatten(2).transpose(1, 2))
    # official `ave` = F.interpolate(scale_factor=1/R, mode='nearest') on the (H, W) grid: on an even
    # grid exactly the uniform tokens (row 2i, column 2j), NOT a window mean
    attn.mode = "ave"
    k4 = torch.randn(2, 6 * 4, c)
    g4 = k4.transpose(1, 2).reshape(2, c, 6, 4)
    official = F.interpolate(g4, scale_factor=1 / 2, mode="nearest").permute(0, 2, 3, 1).reshape(2, -1, c)
    torch.testing.assert_close(attn._compress(k4, 6, 4), official, atol=0, rtol=0)
    torch.testing.assert_close(official, g4[:, :, ::2, ::2].flatten(2).transpose(1, 2), atol=0, rtol=0)
    assert attn.sr.weight.shape == (c, 1, 2, 2) and torch.all(attn.sr.weight == 0.25) and torch.all(attn.sr.bias == 0)


def test_original_init():
    m = build_model(TINY)
    assert torch.all(m.final_layer.linear.weight == 0) and torch.all(m.final_layer.linear.bias == 0)
    for blk in m.blocks:
        assert torch.all(blk.cross_attn.proj.weight == 0)
    w = m.blocks[0].attn.qkv.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (64 + 192)) ** 0.5 and torch.all(m.blocks[0].attn.qkv.bias == 0)
    assert 0.015 < m.t_block[1].weight.std() < 0.025  # normal(0.02)
    x, t, y, mask = _inputs()
    assert torch.all(m.eval()(x, t, y, mask) == 0)  # zeroed final linear


def test_init_kv_compress_when_loading_checkpoint_without_kv():
    src = _perturb(build_model(TINY))
    dst = build_model(TINY, kv_compress_ratio=2)
    with torch.no_grad():
        for blk in dst.blocks:
            if hasattr(blk.attn, "sr"):
                blk.attn.sr.weight.fill_(3.0)
    done = load_into(dst, src.state_dict())
    assert done == ["blocks.2", "blocks.3"]
    assert all(torch.all(dst.blocks[i].attn.sr.weight == 0.25) for i in (2, 3))
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert init_kv_compress(dst) == ["blocks.2", "blocks.3"]


def _null(m, n=10, valid=1, seed=5):
    """A T5("")-like null buffer: n tokens, `valid` of them under its own mask."""
    m.set_null_embedding(torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)), valid)
    return m


def test_forward_with_cfg_explicit_negative():
    m = _perturb(build_model(TINY))
    x, t, y, mask = _inputs()
    null_y, null_mask = torch.randn(1, 3, 32), torch.tensor([[True, True, False]])
    out = m.forward_with_cfg(x, t, y, mask, null_y, 4.5, null_mask=null_mask)
    cond = m(x, t, y, mask)
    uncond = m(x, t, null_y.expand(2, -1, -1), null_mask.expand(2, -1))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.5 * (cond[:, :4] - uncond[:, :4]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.forward_with_cfg(x, t, y, mask, null_y, 1.0, null_mask), cond, atol=1e-5, rtol=1e-5)


def test_cfg_null_policies():
    """own: the unconditional branch is the null's valid tokens under their own mask (diffusers'
    pipeline); condition: the padded null buffer under the PROMPT's mask (official PixArtMS)."""
    x, t, y, mask = _inputs(L=6)
    own = _null(_perturb(build_model(TINY)), n=10, valid=1)
    cond = own(x, t, y, mask)
    e = own.y_embedder.y_embedding
    u = own(x, t, e[None, :1].expand(2, -1, -1), torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(own.forward_with_cfg(x, t, y, mask, None, 3.0)[:, :4],
                               u[:, :4] + 3.0 * (cond[:, :4] - u[:, :4]), atol=1e-4, rtol=1e-4)
    off = _null(_perturb(build_model(TINY, null_policy="condition")), n=10, valid=1)
    cond = off(x, t, y, mask)
    u = off(x, t, off.y_embedder.y_embedding[None, :6].expand(2, -1, -1), mask)  # y_embedding[:L], prompt mask
    torch.testing.assert_close(off.forward_with_cfg(x, t, y, mask, None, 3.0)[:, :4],
                               u[:, :4] + 3.0 * (cond[:, :4] - u[:, :4]), atol=1e-4, rtol=1e-4)
    assert (u - own(x, t, e[None, :1].expand(2, -1, -1), torch.ones(2, 1, dtype=torch.bool))).abs().max() > 1e-3


def test_caption_dropout_follows_null_policy():
    x, t, y, mask = _inputs()
    drop = torch.tensor([True, False])
    for policy in ("own", "condition"):
        m = _null(_perturb(build_model(TINY, caption_dropout=0.5, null_policy=policy)), n=10, valid=2)
        m.train()
        dropped = m(x, t, y, mask, force_drop_ids=drop)
        m.eval()
        e = m.y_embedder.y_embedding
        if policy == "own":  # y AND mask replaced: the null's 2 valid tokens
            ref0 = m(x[:1], t[:1], e[None, :2], torch.ones(1, 2, dtype=torch.bool))
        else:  # official token_drop: y -> y_embedding, the caption's mask kept
            ref0 = m(x[:1], t[:1], e[None, :y.shape[1]], mask[:1])
        torch.testing.assert_close(dropped[0:1], ref0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dropped[1:], m(x[1:], t[1:], y[1:], mask[1:]), atol=1e-5, rtol=1e-5)
        yy, mm = m.drop_captions(y, mask, drop)
        assert torch.equal(yy[0, :6], e[:6]) and torch.equal(yy[1], y[1]) and torch.equal(mm[1], mask[1])
        assert mm[0].tolist() == ([True, True] + [False] * 4 if policy == "own" else mask[0].tolist())
    # set_null_embedding replaces the buffer and its own-mask length
    m.set_null_embedding(torch.ones(4, 32), 3)
    ny, nm = m.null_caption(3, 5)
    assert ny.shape == (3, 5, 32) and nm.sum().item() == 9 and torch.all(ny[:, :4] == 1) and torch.all(ny[:, 4] == 0)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    a = _perturb(build_model(TINY, caption_dropout=0.0, kv_compress_ratio=2))
    b = build_model(TINY, caption_dropout=0.0, kv_compress_ratio=2, grad_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, t, y, mask = _inputs()
    grads = []
    for m in (a, b):
        m.train()
        m.zero_grad()
        (m(x, t, y, mask) ** 2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)


def test_unknown_preset_and_bad_config():
    with pytest.raises(KeyError):
        build_model("nope")
    with pytest.raises(ValueError):
        build_model(TINY, kv_compress_mode="bogus")
    with pytest.raises(ValueError):
        build_model(TINY, kv_compress_ratio=2, kv_compress_layers=(7,))


def test_pe_cache_built_under_inference_mode_is_trainable():
    m = _perturb(build_model(TINY, caption_dropout=0.0))
    x, t, y, mask = _inputs(h=14, w=18)  # a grid no other test uses: the cached PE is built here
    with torch.inference_mode():
        ref = m(x, t, y, mask)
    m.train()
    out = m(x, t, y, mask)
    out.square().mean().backward()
    torch.testing.assert_close(out.detach(), ref)
    assert m.x_embedder.proj.weight.grad is not None


def test_unknown_kv_mode_is_refused_at_build():
    """Issue 22 item 14: a mode that is not one of KV_MODES raises when the layer is built (it used
    to build the conv path silently and crash at the first forward)."""
    from training.blocks import SelfAttention
    from training.model import KV_MODES

    with pytest.raises(ValueError, match=r"kv_mode 'discard'.*conv.*uniform.*ave.*avgpool"):
        SelfAttention(64, 4, kv_ratio=2, kv_mode="discard")
    with pytest.raises(ValueError, match="kv_mode 'discard'"):
        SelfAttention(64, 4, kv_ratio=1, kv_mode="discard")  # not silently ignored without compression either
    for mode in KV_MODES:  # every documented mode builds and runs
        att = SelfAttention(64, 4, kv_ratio=2, kv_mode=mode)
        assert att(torch.randn(1, 20, 64), 4, 5).shape == (1, 20, 64)
