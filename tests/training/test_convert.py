"""Conversion against diffusers' REAL PixArtTransformer2DModel (not a re-implementation)."""
import dataclasses

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from training import convert
from training.model import build_model


def _tiny(**kw):
    g = torch.Generator().manual_seed(1)
    m = build_model("PixArt-tiny", caption_dropout=0.0, **kw)
    with torch.no_grad():
        for p in m.parameters():  # non-zero everywhere (the original init zeroes outputs)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def _inputs(h=8, w=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, h, w, generator=g)
    t = torch.tensor([0, 417, 999])
    y = torch.randn(3, 7, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return x, t, y, mask


def _diffusers_out(dm, x, t, y, mask):
    with torch.no_grad():
        return dm(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask.long(), return_dict=False)[0]


@pytest.mark.parametrize("hw,pe", [((8, 8), (4, 1.0)), ((8, 12), (4, 0.5)), ((12, 6), (6, 2.0))])
def test_export_matches_diffusers(hw, pe):
    ours = _tiny(base_size=pe[0], pe_interpolation=pe[1])
    dm = convert.to_diffusers(ours).eval()
    assert isinstance(dm, PixArtTransformer2DModel) and dm.use_additional_conditions is False
    x, t, y, mask = _inputs(*hw)
    with torch.no_grad():
        a = ours(x, t, y, mask)
    b = _diffusers_out(dm, x, t, y, mask)
    assert a.shape == b.shape == (3, 8, *hw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cli_round_trip(tmp_path):
    ours = _tiny(pe_interpolation=0.5)
    pth = tmp_path / "ours.pth"
    convert.save_pth(ours, pth)
    convert.main(["--to-diffusers", str(pth), str(tmp_path / "diff")])
    dm = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "diff")).eval()
    x, t, y, mask = _inputs()
    with torch.no_grad():
        ref = ours(x, t, y, mask)
    torch.testing.assert_close(_diffusers_out(dm, x, t, y, mask), ref, atol=1e-5, rtol=1e-4)
    from training.sample import load_dit  # the sampling CLI accepts a diffusers folder too
    with torch.no_grad():
        torch.testing.assert_close(load_dit(tmp_path / "diff")(x, t, y, mask), ref, atol=1e-5, rtol=1e-4)
    # and back: weights identical (null-caption buffer aside: diffusers has none)
    convert.main(["--from-diffusers", str(tmp_path / "diff"), str(tmp_path / "back.pth")])
    back = convert.load_official(tmp_path / "back.pth")
    assert back.config.pe_interpolation == 0.5 and back.config.base_size == 4 and back.config.depth == 4
    a, b = ours.state_dict(), back.state_dict()
    for k in a:
        if k != "y_embedder.y_embedding":
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x, t, y, mask), ref, atol=1e-6, rtol=1e-5)


def test_key_mapping_is_a_bijection():
    ours = _tiny()
    sd = {k: v for k, v in ours.state_dict().items() if k != "y_embedder.y_embedding"}
    d = convert.to_diffusers_state_dict(sd, 4)
    assert set(d) == set(PixArtTransformer2DModel(**convert.diffusers_config(ours.config)).state_dict())
    back = convert.from_diffusers_state_dict(d)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_official_pth_format(tmp_path):
    """An official-style file: dict with state_dict (+ pos_embed, a 120-token alpha null buffer)
    and optimizer state. Loads with the preset's heads/PE; the null buffer is adopted."""
    ours = _tiny()
    sd = dict(ours.state_dict())
    sd["pos_embed"] = torch.zeros(1, 16, 64)
    sd["y_embedder.y_embedding"] = torch.randn(120, 32)
    torch.save({"state_dict": sd, "optimizer": {"state": {}}, "epoch": 3}, tmp_path / "official.pth")
    m = convert.load_official(tmp_path / "official.pth", preset="PixArt-tiny")
    assert m.config.depth == 4 and m.config.hidden_size == 64 and m.config.num_heads == 4
    assert m.y_embedder.y_embedding.shape == (120, 32)
    torch.testing.assert_close(m.y_embedder.y_embedding, sd["y_embedder.y_embedding"])
    x, t, y, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x, t, y, mask), ours(x, t, y, mask))
    # starting a KV-compression stage from it: missing sr/norm get Conv Avg Init
    kv = convert.load_official(tmp_path / "official.pth", preset="PixArt-tiny", kv_compress_ratio=2)
    assert torch.all(kv.blocks[3].attn.sr.weight == 0.25)


def test_export_refuses_kv_compression():
    with pytest.raises(ValueError, match="KV compression"):
        convert.to_diffusers(_tiny(kv_compress_ratio=2))


def test_mismatched_state_dict_raises():
    sd = _tiny().state_dict()
    del sd["blocks.1.mlp.fc1.weight"]
    with pytest.raises(KeyError, match="missing"):
        convert.load_into(build_model("PixArt-tiny"), sd)
    sd = dict(_tiny().state_dict(), extra=torch.zeros(1))
    with pytest.raises(KeyError, match="unexpected"):
        convert.load_into(build_model("PixArt-tiny"), sd)


def test_kv_checkpoint_config_inferred(tmp_path):
    m = _tiny(kv_compress_ratio=2, kv_compress_layers=(1, 3))
    torch.save(m.state_dict(), tmp_path / "plain.pth")  # bare state dict, no model_config
    back = convert.load_official(tmp_path / "plain.pth", preset="PixArt-tiny")
    assert back.config.kv_layers == (1, 3) and back.config.kv_compress_ratio == 2
    x, t, y, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x, t, y, mask), m(x, t, y, mask))
    assert dataclasses.asdict(back.config)["kv_compress_layers"] == (1, 3)
