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
    from training.null import read_null, write_null

    ours = _tiny(pe_interpolation=0.5)
    pth = tmp_path / "ours.pth"
    convert.save_pth(ours, pth)  # records its PE: no --image-size needed
    convert.main(["--to-diffusers", str(pth), str(tmp_path / "diff")])
    dm = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "diff")).eval()
    x, t, y, mask = _inputs()
    with torch.no_grad():
        ref = ours(x, t, y, mask)
    torch.testing.assert_close(_diffusers_out(dm, x, t, y, mask), ref, atol=1e-5, rtol=1e-4)
    null = write_null(str(tmp_path / "null.safetensors"), (torch.randn(300, 32), 1))
    from training.sample import load_dit  # the sampling CLI accepts a diffusers folder too (with a null)
    with pytest.raises(ValueError, match="no null caption"):
        load_dit(tmp_path / "diff")
    with torch.no_grad():
        torch.testing.assert_close(load_dit(tmp_path / "diff", null=null)(x, t, y, mask), ref, atol=1e-5, rtol=1e-4)
    # and back: weights identical; the null caption is the given T5("") (diffusers has no buffer)
    with pytest.raises(SystemExit, match="no null caption"):
        convert.main(["--from-diffusers", str(tmp_path / "diff"), str(tmp_path / "back.pth")])
    convert.main(["--from-diffusers", str(tmp_path / "diff"), str(tmp_path / "back.pth"), "--null-caption", null])
    back = convert.load_official(tmp_path / "back.pth")
    assert back.config.pe_interpolation == 0.5 and back.config.base_size == 4 and back.config.depth == 4
    assert back.config.null_policy == "own"  # diffusers-origin: T5("") under its own mask
    torch.testing.assert_close(back.y_embedder.y_embedding, read_null(null)[0], atol=0, rtol=0)
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
    and optimizer state. Loads with the preset's heads and the PE of the given image size; the
    null buffer is adopted (or overwritten by a given null, as the official load_checkpoint)."""
    ours = _tiny()
    sd = dict(ours.state_dict())
    sd["pos_embed"] = torch.zeros(1, 16, 64)
    sd["y_embedder.y_embedding"] = torch.randn(120, 32)
    torch.save({"state_dict": sd, "optimizer": {"state": {}}, "epoch": 3}, tmp_path / "official.pth")
    with pytest.raises(ValueError, match="does not record its resolution"):
        convert.load_official(tmp_path / "official.pth", preset="PixArt-tiny")
    m = convert.load_official(tmp_path / "official.pth", preset="PixArt-tiny", image_size=64)
    assert m.config.depth == 4 and m.config.hidden_size == 64 and m.config.num_heads == 4
    assert (m.config.base_size, m.config.pe_interpolation, m.config.null_policy) == (4, 0.125, "condition")
    assert m.y_embedder.y_embedding.shape == (120, 32)
    torch.testing.assert_close(m.y_embedder.y_embedding, sd["y_embedder.y_embedding"])
    x, t, y, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x, t, y, mask), ours(x, t, y, mask))
    # starting a KV-compression stage from it: missing sr/norm get Conv Avg Init
    kv = convert.load_official(tmp_path / "official.pth", preset="PixArt-tiny", image_size=64, kv_compress_ratio=2)
    assert torch.all(kv.blocks[3].attn.sr.weight == 0.25)
    t5_null = (torch.randn(300, 32), 1)
    m2 = convert.load_official(tmp_path / "official.pth", preset="PixArt-tiny", image_size=64, null=t5_null)
    assert torch.equal(m2.y_embedder.y_embedding, t5_null[0]) and m2.config.null_tokens == 300


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
    back = convert.load_official(tmp_path / "plain.pth", preset="PixArt-tiny", image_size=64)
    assert back.config.kv_layers == (1, 3) and back.config.kv_compress_ratio == 2
    x, t, y, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x, t, y, mask), m(x, t, y, mask))
    assert dataclasses.asdict(back.config)["kv_compress_layers"] == (1, 3)


# The official converter's PE tables (tools/convert_pixart_to_diffusers.py), restated.
OFFICIAL_INTERP = {"alpha": {256: 1, 512: 1, 1024: 2}, "sigma": {256: 0.5, 512: 1, 1024: 2, 2048: 4}}


def test_pe_settings_equal_the_official_converter():
    from training.model import pe_settings

    for version, table in OFFICIAL_INTERP.items():
        for size, interp in table.items():
            assert pe_settings(size, version) == {"base_size": size // 8 // 2, "pe_interpolation": interp}
    with pytest.raises(ValueError):
        pe_settings(2048, "alpha")  # no such alpha weights


def test_512_checkpoint_samples_with_512_pe(tmp_path):
    """A .pth trained at 512 (bare official layout: no recorded resolution) loads with the 512 PE
    when told its size, and refuses to guess; the eval generator passes eval.resolution."""
    from training.sample import load_dit

    src = _tiny(base_size=32, pe_interpolation=1.0)  # what a 512 stage builds
    torch.save({"state_dict": src.state_dict()}, tmp_path / "s512.pth")
    with pytest.raises(ValueError, match="image_size"):
        load_dit(tmp_path / "s512.pth", preset="PixArt-tiny")
    m = load_dit(tmp_path / "s512.pth", preset="PixArt-tiny", image_size=512)
    assert (m.config.base_size, m.config.pe_interpolation) == (32, 1.0)
    x, t, y, mask = _inputs(64, 64)  # a 512 px latent grid
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y, mask), src(x, t, y, mask), atol=1e-6, rtol=1e-6)
    # Sigma's rule keeps every axis in [0, 32) (base_size / interpolation = 32 at every size), so a
    # wrong Sigma size is harmless; PixArt-alpha 256 weights (interpolation 1.0: span 16) are not
    alpha = _tiny(base_size=16, pe_interpolation=1.0)
    torch.save({"state_dict": alpha.state_dict()}, tmp_path / "a256.pth")
    x, t, y, mask = _inputs(32, 32)  # a 256 px latent grid
    a = load_dit(tmp_path / "a256.pth", preset="PixArt-tiny", image_size=256, version="alpha")
    assert (a.config.base_size, a.config.pe_interpolation) == (16, 1.0)
    as_sigma = load_dit(tmp_path / "a256.pth", preset="PixArt-tiny", image_size=256)
    with torch.no_grad():
        ref = alpha(x, t, y, mask)
        torch.testing.assert_close(a(x, t, y, mask), ref, atol=1e-6, rtol=1e-6)
        assert (as_sigma(x, t, y, mask) - ref).norm() / ref.norm() > 0.05  # the wrong PE changes the output
