"""The Share-Captioner adapter (`hf_api: sharecaptioner`) on a tiny model with the same remote-code
interface (InternLM-XComposer v1: encode_text / encode_img / vis_processor / internlm_model /
eoh / decode_text), loaded with trust_remote_code from a local folder like the real one."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.config import CaptionConfig
from captioning.sharecaptioner import BOT, USER, ShareCaptioner, generated_length
from captioning.stage import engine_class, resolve_hf_api
from _sigma.config import ConfigError, parse


def _cfg(tiny, **kw):
    base = {"model": str(tiny / "captioner-xcomposer"), "hf_api": "sharecaptioner", "trust_remote_code": True,
            "generation": {"max_new_tokens": 16}}
    base.update(kw)
    return parse(CaptionConfig, base, "caption")


def _images(n=3):
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def worker(tiny_models):
    return ShareCaptioner(_cfg(tiny_models))


def test_generation_settings_are_share_captioners(tiny_models):
    w = ShareCaptioner(_cfg(tiny_models, generation={}))  # defaults: the paper's settings
    kw = w.gen_kwargs()
    assert (kw["num_beams"], kw["do_sample"], kw["temperature"], kw["repetition_penalty"]) == (3, True, 1.0, 1.5)
    assert kw["max_new_tokens"] == 500 and kw["min_length"] == 1 and kw["length_penalty"] == 1.0
    assert kw["eos_token_id"] == w.tokenizer.eos_token_id and kw["num_return_sequences"] == 1


def test_inputs_embeds_are_the_xcomposer_frame(worker):
    """What internlm_model.generate receives == [emb(USER) | encode_img | emb(prompt + eoh + BOT)],
    built independently from the tokenizer and the embedding table."""
    m, tok = worker.model, worker.tokenizer
    seen = {}
    real = m.internlm_model.generate

    def spy(**kw):  # records the call, then runs the real generate
        seen.update(kw)
        return real(**kw)

    m.internlm_model.generate = spy
    try:
        ims = _images(2)
        out = worker.generate(ims, seed=0)
    finally:
        m.internlm_model.generate = real
    emb = m.internlm_model.get_input_embeddings()
    ids1 = tok(USER, return_tensors="pt", add_special_tokens=True).input_ids
    ids2 = tok(worker.cfg.prompt + "<TOKENS_UNUSED_0>" + BOT, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids2[0, -len(tok(BOT, add_special_tokens=False).input_ids):].tolist() == \
        tok(BOT, add_special_tokens=False).input_ids  # the frame ends with the bot turn
    with torch.inference_mode():
        pix = torch.stack([m.vis_processor(im) for im in ims])
        img = m.encode_img(pix)
        expect = torch.cat([emb(ids1).expand(2, -1, -1), img, emb(ids2).expand(2, -1, -1)], dim=1)
    got = seen["inputs_embeds"]
    assert got.shape == expect.shape == (2, ids1.shape[1] + img.shape[1] + ids2.shape[1], emb.embedding_dim)
    torch.testing.assert_close(got, expect)
    assert "input_ids" not in seen and len(out) == 2


def test_captions_counts_and_seeds(worker):
    ims = _images(3)
    a = worker.generate(ims, seed=0)
    assert len(a) == 3
    for text, n in a:
        assert isinstance(text, str) and 1 <= n <= 16
    assert worker.generate(ims, seed=0) == a  # reproducible per (batch, seed)
    # token counts: up to and including the first EOS; a row without EOS ran to the budget (all of it)
    eos = worker.tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.inference_mode():
        raw = worker.model.internlm_model.generate(inputs_embeds=worker.build_inputs(ims), **worker.gen_kwargs())
    for row, (_, n) in zip(raw.tolist(), a):
        assert n == (row.index(eos) + 1 if eos in row else raw.shape[1])


def test_generated_length():
    eos, pad = 2, 3
    assert generated_length([5, pad, 7, 8], eos) == 4  # no EOS: a pad id inside is a generated token
    assert generated_length([5, pad, 7, pad], eos) == 4  # ... also at the end: the row ran to the budget
    assert generated_length([5, 6, eos, pad, pad], eos) == 3  # cut after the first EOS (kept)
    assert generated_length([eos, pad], eos) == 1 and generated_length([], eos) == 0


def test_row_without_eos_is_not_cut_at_a_pad_id(tiny_models):
    """Reproduction of issue 12 item 7: rows without EOS were cut to their count of non-pad ids, so a
    pad id the model generated mid-row removed real tokens from the row's end. Here a token the tiny
    model generates mid-row is made the pad id (generation is unchanged: no row finishes, so nothing
    is padded) and the rows must come back whole."""
    w = ShareCaptioner(_cfg(tiny_models))  # its own worker: the tokenizer is changed below
    ims, eos = _images(3), w.tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.inference_mode():
        raw = w.model.internlm_model.generate(inputs_embeds=w.build_inputs(ims), **w.gen_kwargs()).tolist()
    open_rows = [r for r in raw if eos not in r]
    assert len(open_rows) >= 2  # random weights rarely say EOS within 16 tokens
    pad = Counter(t for r in open_rows for t in r[:-1]).most_common(1)[0][0]
    w.tokenizer.pad_token_id = pad
    old_counts = [len([t for t in r if t != pad]) for r in open_rows]  # the old decode's count
    assert sum(n < len(r) for n, r in zip(old_counts, open_rows)) >= 1  # it cut real tokens
    got = w.generate(ims, seed=0)
    for r, (text, n) in zip(raw, got):
        if eos not in r:
            assert n == len(r) == 16
            assert text == w.model.decode_text([torch.tensor(r)])  # the whole row decoded


def test_hf_api_choice(tiny_models):
    assert resolve_hf_api(_cfg(tiny_models, hf_api="auto")) == "sharecaptioner"  # config.json names XComposer
    plain = parse(CaptionConfig, {"model": str(tiny_models / "captioner")}, "caption")
    assert resolve_hf_api(plain) == "chat_template"
    hub = parse(CaptionConfig, {"model": "Lin-Chen/ShareCaptioner", "trust_remote_code": True}, "caption")
    assert resolve_hf_api(hub) == "sharecaptioner"  # not cached here: decided by the name
    assert engine_class("hf", "sharecaptioner") is ShareCaptioner
    assert engine_class("hf", "chat_template").__name__ == "HFCaptioner"
    with pytest.raises(ConfigError, match=r"hf_api: got 'xcomposer2', allowed: 'auto' \| 'chat_template' \| 'sharecaptioner'"):
        parse(CaptionConfig, {"hf_api": "xcomposer2"}, "caption")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        parse(CaptionConfig, {"hf_api": "sharecaptioner"}, "caption")


@pytest.mark.slow
def test_caption_stage_with_the_sharecaptioner_api(small_output, tiny_models, ray_local):
    from curation.config import PipelineConfig

    from captioning.stage import run_caption
    from _sigma import manifest

    out, info = small_output
    lax = {"min_words": 1, "require_sentence_end": False, "min_distinct_ratio": 0.0, "max_repeat_ngram": 1000}
    cfg = parse(PipelineConfig, {"name": "t", "output": str(out), "caption": {
        "engine": "hf", "model": str(tiny_models / "captioner-xcomposer"), "trust_remote_code": True,
        "generation": {"max_new_tokens": 12}, "quality": lax,
        "resources": {"batch_size": 4, "actors": 1, "num_cpus": 0.5}}})  # hf_api auto
    s = run_caption(cfg, out, progress=False)
    rows = {r["key"]: r for r in manifest.read_manifest(out).to_pylist()}
    assert len(rows) == info["rows"] and s["selected"] == info["selected"]
    assert sum(s["caption_status"].values()) == info["selected"]
    assert rows["00000_000004"]["caption_status"] == "failed_image"
    done = [r for r in rows.values() if r["caption_status"] in ("ok", "too_long")]
    assert done and all(r["caption_long"] and 1 <= r["caption_tokens"] <= 12 for r in done)
    assert all(json.loads(r["caption_params"])["repetition_penalty"] == 1.5 for r in done)
