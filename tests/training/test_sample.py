"""Samplers (DPM-Solver++ via diffusers, IDDPM), VAE decoding and the sampling CLI, offline with
tiny real-architecture T5 / VAE / DiT built here."""
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from training.diffusion import GaussianDiffusion
from training.model import PRESETS, build_model
from training.sample import decode_latents, dpm_scheduler, encode_prompts, sample_latents


class OptimalDenoiser(nn.Module):
    """The exact eps-predictor of data concentrated at one latent c (a stand-in network with the
    DiT's interface): eps(x, t) = (x - sqrt(acp_t) c) / sqrt(1 - acp_t)."""

    def __init__(self, c):
        super().__init__()
        self.config = PRESETS["PixArt-tiny"]
        self.c = c
        self.w = nn.Parameter(torch.zeros(1))
        self.acp = torch.from_numpy(GaussianDiffusion().alphas_cumprod).float()

    def forward(self, x, t, y, mask=None):
        a = self.acp[t.long()].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    def forward_with_cfg(self, x, t, y, mask, null_y, s, null_mask=None):
        return self.forward(x, t, y)


def test_dpm_scheduler_matches_training_schedule():
    s = dpm_scheduler()
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), GaussianDiffusion().alphas_cumprod, rtol=1e-5)
    s.set_timesteps(20)
    assert len(s.timesteps) == 20 and s.timesteps[0] == 999


@pytest.mark.parametrize("sampler,steps", [("dpm", 20), ("iddpm", 100)])
def test_samplers_recover_delta_data(sampler, steps):
    c = torch.tensor([0.5, -1.0, 0.25, 1.5]).reshape(1, 4, 1, 1).expand(2, 4, 4, 6)
    model = OptimalDenoiser(c)
    lat = sample_latents(model, torch.zeros(2, 1, 32), None, None, 32, 48, steps=steps, cfg=4.5, sampler=sampler)
    assert lat.shape == (2, 4, 4, 6)
    torch.testing.assert_close(lat, c, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def tiny_dit():
    g = torch.Generator().manual_seed(0)
    m = build_model("PixArt-tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def test_sample_latents_real_model(tiny_dit):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 32, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 2:] = False
    a = sample_latents(tiny_dit, y, mask, None, 64, 96, steps=5, cfg=4.5, seed=7)
    assert a.shape == (3, 4, 8, 12) and torch.isfinite(a).all()
    torch.testing.assert_close(sample_latents(tiny_dit, y, mask, None, 64, 96, steps=5, seed=7), a)
    # image j of a batch uses seed + j: the same as sampling it alone
    one = sample_latents(tiny_dit, y[1:2], mask[1:2], None, 64, 96, steps=5, seed=8)
    torch.testing.assert_close(one, a[1:2], atol=5e-4, rtol=1e-3)  # float roundoff of other batch shapes, x cfg
    b = sample_latents(tiny_dit, y, mask, None, 64, 96, steps=4, sampler="iddpm", seed=7)
    assert b.shape == a.shape and torch.isfinite(b).all()
    with pytest.raises(ValueError):
        sample_latents(tiny_dit, y, mask, None, 60, 64)


def _build_t5_vae(root):
    """Tiny T5 encoder (d_model 32) + tokenizer from a locally trained sentencepiece model, and a
    tiny 8x-downsampling AutoencoderKL: the real classes, random weights."""
    import sentencepiece as spm
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    text = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse", "quick brown fox"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=60,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    (root / "sp.model").write_bytes(buf.getvalue())
    tok = T5Tokenizer(vocab_file=str(root / "sp.model"), extra_ids=0)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    tok.save_pretrained(root / "t5")
    t5.save_pretrained(root / "t5")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.13025)
    vae.save_pretrained(root / "vae")
    return tok, t5.eval(), vae.eval()


def test_decode_encode_and_cli(tmp_path, tiny_dit):
    from PIL import Image

    from training.checkpoint import write_model_only
    from training.sample import main

    tok, t5, vae = _build_t5_vae(tmp_path)
    imgs = decode_latents(vae, torch.randn(2, 4, 8, 12) * 0.13025)
    assert imgs.dtype == np.uint8 and imgs.shape == (2, 64, 96, 3)
    y, mask = encode_prompts(tok, t5, ["a cat", "a red car on a street", ""], max_length=300)
    assert y.shape[0] == 3 and y.shape[2] == 32 and mask.dtype == torch.bool
    assert mask[2].sum() == 1 and mask[1].sum() > mask[0].sum()  # "" is just </s>

    ckpt = write_model_only(tmp_path / "dit", tiny_dit, {"preset": "PixArt-tiny", "model_kwargs": {}})
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n\nan astronaut riding a horse\na red car\n")
    args = ["--checkpoint", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--t5", str(tmp_path / "t5"),
            "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out"), "--height", "64", "--width", "96",
            "--steps", "3", "--batch-size", "2"]
    main(args)
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name[:5] for p in pngs] == ["00000", "00001", "00002"]
    assert Image.open(pngs[0]).size == (96, 64)
    first = np.asarray(Image.open(pngs[2]))
    main(args)  # rerun: resumes, nothing rewritten
    summary = json.loads((tmp_path / "out" / "sample_summary.json").read_text())
    assert summary["written"] == 0 and summary["skipped_existing"] == 3
    # image 2 with seed+2 alone (batch of 1) equals the batched run
    for p in pngs:
        p.unlink()
    main(args[:-2] + ["--batch-size", "1"])
    np.testing.assert_array_equal(np.asarray(Image.open(sorted((tmp_path / "out").glob("*.png"))[2])), first)


def _pipeline_and_ours(tmp_path, tiny_models):
    """diffusers' PixArtSigmaPipeline and our model on the SAME tiny weights (our DiT exported with
    convert.to_diffusers, the tiny T5 / VAE of models/tiny) and our DPM-Solver++ scheduler."""
    from diffusers import AutoencoderKL, PixArtSigmaPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    from training import convert

    g = torch.Generator().manual_seed(1)
    src = build_model("PixArt-tiny", caption_dropout=0.0)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    convert.to_diffusers(src).save_pretrained(tmp_path / "transformer")
    tok = AutoTokenizer.from_pretrained(tiny_models / "t5")
    t5 = T5EncoderModel.from_pretrained(tiny_models / "t5").eval()
    from diffusers import PixArtTransformer2DModel

    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=t5, vae=AutoencoderKL.from_pretrained(tiny_models / "vae"),
                               transformer=PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer"),
                               scheduler=dpm_scheduler())
    return pipe, tok, t5, src


def test_guided_eps_equals_diffusers_pixart_sigma_pipeline(tmp_path, tiny_models):
    """Diffusers-origin weights guide with T5("") under its own mask, as PixArtSigmaPipeline does:
    the guided eps and 4 DPM-Solver++ steps equal the pipeline's to float tolerance."""
    from training.sample import _noise, load_dit

    pipe, tok, t5, _ = _pipeline_and_ours(tmp_path, tiny_models)
    ours = load_dit(tmp_path / "transformer", null=str(tiny_models / "t5"))  # null = T5("") of that T5
    prompts = ["a red car on a street", "an astronaut riding a horse in the desert at night"]
    x, t, s = _noise((2, 4, 8, 12), 3), torch.tensor([700, 700]), 4.5
    with torch.no_grad():
        # the pipeline's own encode_prompt ("" negative, padded to 300 under its mask) and its step
        pe, pm, ne, nm = pipe.encode_prompt(prompts, True, negative_prompt="", max_sequence_length=300)
        out = pipe.transformer(torch.cat([x, x]), encoder_hidden_states=torch.cat([ne, pe]), timestep=torch.cat([t, t]),
                               encoder_attention_mask=torch.cat([nm, pm]), added_cond_kwargs={"resolution": None,
                               "aspect_ratio": None}, return_dict=False)[0][:, :4]
        u, c = out.chunk(2)
        ref = u + s * (c - u)
        y, mask = encode_prompts(tok, t5, prompts, 300)
        eps = ours.forward_with_cfg(x, t, y, mask, None, s)[:, :4]
    torch.testing.assert_close(eps, ref, atol=1e-5, rtol=1e-4)
    # end to end: the pipeline's latents after 4 steps from the same noise
    lat = pipe(prompts, height=64, width=96, num_inference_steps=4, guidance_scale=s, latents=_noise((2, 4, 8, 12), 3),
               output_type="latent", clean_caption=False, use_resolution_binning=False).images
    mine = sample_latents(ours, y, mask, None, 64, 96, steps=4, cfg=s, seed=3)
    torch.testing.assert_close(mine, lat, atol=1e-3, rtol=1e-3)  # float roundoff through 4 steps x cfg 4.5
    assert (mine - lat).norm() / lat.norm() < 1e-5  # measured 8e-7
    # the random default buffer (what an import without a null caption guided with) is far off
    ours.set_null_embedding(torch.randn(300, 32) / 32 ** 0.5)
    with torch.no_grad():
        bad = ours.forward_with_cfg(x, t, y, mask, None, s)[:, :4]
    assert (bad - ref).norm() / ref.norm() > 0.05


def test_official_origin_guides_with_null_under_the_prompt_mask(tmp_path, tiny_models):
    """Official .pth weights: the unconditional branch is y_embedding (T5("") padded to 300) under
    the PROMPT's mask, as PixArtMS.forward is called by the official samplers."""
    from training.sample import _noise, load_dit

    _, tok, t5, src = _pipeline_and_ours(tmp_path, tiny_models)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "official.pth")  # official layout, no config
    m = load_dit(tmp_path / "official.pth", preset="PixArt-tiny", image_size=64, null=str(tiny_models / "t5"))
    assert m.config.null_policy == "condition"
    prompts = ["a cat", "a red car on a street"]
    y, mask = encode_prompts(tok, t5, prompts, 300)
    ids = tok("", max_length=300, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        null = t5(ids.input_ids, attention_mask=ids.attention_mask)[0]  # (1, 300, 32): the official null file
        x, t = _noise((2, 4, 8, 8), 0), torch.tensor([500, 500])
        L = y.shape[1]
        # official call: y_embedding in place of the caption, the caption's mask for both branches
        u = m(x, t, null[:, :L].expand(2, -1, -1), mask)[:, :4]
        c = m(x, t, y, mask)[:, :4]
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, mask, None, 4.5)[:, :4], u + 4.5 * (c - u),
                                   atol=1e-5, rtol=1e-4)
