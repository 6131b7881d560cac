"""Reward models by name on their real code paths, with the tiny random-weight twins of `make models`.
Each score is checked against an independent computation written from the model's published
recipe (model card / hpsv2's img_score / ImageReward.score)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import rewards
from evaldata import random_image

PROMPTS = ["a red house by a river", "a dog " * 60, "sky"]  # the second is over every context


@pytest.fixture(scope="module")
def imgs():
    rng = np.random.default_rng(0)
    return [random_image(rng, 64 + 16 * i, 48 + 8 * i) for i in range(3)]


def test_pickscore_is_the_model_card_recipe(tiny_models, imgs):
    from transformers import AutoProcessor, CLIPModel

    path = tiny_models / "rewards" / "pickscore"
    got = rewards.load_rewards({"PickScore": str(path)})["PickScore"](imgs, PROMPTS)
    proc, model = AutoProcessor.from_pretrained(path), CLIPModel.from_pretrained(path).eval()
    with torch.no_grad():
        px = proc(images=imgs, return_tensors="pt")["pixel_values"]
        ie = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        tok = proc(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        assert tok["input_ids"].shape[1] == 77 and int(tok["input_ids"][0, 0]) == 49406  # real CLIP BPE ids
        te = model.text_projection(model.text_model(**tok).pooler_output)
        ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
        want = (model.logit_scale.exp() * (ie * te).sum(-1)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_hpsv2_is_a_cosine_of_the_hps_checkpoint(tiny_models, imgs):
    import open_clip

    path = tiny_models / "rewards" / "hpsv2"
    got = rewards.load_rewards({"HPSv2": str(path)})["HPSv2"](imgs, PROMPTS)
    open_clip.add_model_config(path / "hpsv2-tiny.json")
    model, _, pre = open_clip.create_model_and_transforms("hpsv2-tiny", pretrained=None)
    model.load_state_dict(torch.load(path / "HPS_v2_compressed.pt", weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        ie = model.encode_image(torch.stack([pre(i) for i in imgs]))
        te = model.encode_text(open_clip.tokenize(PROMPTS))
    want = torch.nn.functional.cosine_similarity(ie, te).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(got) <= 1)


def test_imagereward_loads_the_original_layout_and_follows_its_score(tiny_models, imgs):
    path = tiny_models / "rewards" / "imagereward"
    model = rewards.load_rewards({"ImageReward": str(path)})["ImageReward"]
    got = model(imgs, PROMPTS)
    # every tensor of the original checkpoint lands in a module (nothing dropped silently) ...
    state = torch.load(path / "ImageReward.pt", weights_only=True)
    vision, text, mlp, shape = rewards.convert_imagereward(state)
    ignored = sorted(k for k in state if not k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp.")))
    assert ignored == ["blip.vision_proj.bias", "blip.vision_proj.weight"]  # BLIP_Pretrain's unused head
    assert len(vision) + len(text) + len(mlp) + len(ignored) + 1 == len(state)  # + the position_ids buffer
    assert shape == {"dim": 32, "patch": 16, "image": 32, "depth": 2}
    torch.testing.assert_close(model.vision.embeddings.class_embedding, state["blip.visual_encoder.cls_token"])
    torch.testing.assert_close(model.vision.encoder.layers[1].self_attn.qkv.weight, state["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(model.mlp[7].weight, state["mlp.layers.7.weight"])
    # ... and the score is ImageReward.score written out: [CLS] state of the cross-attending text
    # encoder over (35 tokens, padded) -> MLP -> (r - mean) / std; per image, as the original loops
    with torch.no_grad():
        for im, prompt, g in zip(imgs, PROMPTS, got):
            tok = model.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            assert tok.input_ids.shape == (1, 35) and int(tok.input_ids[0, 0]) == model.tokenizer.cls_token_id
            emb = model.vision(pixel_values=model.preprocess(im)[None]).last_hidden_state
            out = model.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=emb,
                             encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long))
            r = model.mlp(out.last_hidden_state[:, 0, :].float())
            assert g == pytest.approx(float((r - 0.16717362830052426) / 1.0333394966054072), rel=1e-5, abs=1e-6)
    # the image tokens matter: another image gives another score
    assert len(set(np.round(got, 6))) == 3


def test_unknown_or_missing_reward_models_are_errors(tmp_path):
    from _sigma.config import ConfigError
    from eval.config import EvalConfig

    with pytest.raises(ConfigError, match="unknown model 'Aesthetic'"):
        EvalConfig(rewards={"Aesthetic": "x"})
    with pytest.raises(FileNotFoundError, match="eval.rewards.HPSv2"):
        rewards.load_rewards({"HPSv2": str(tmp_path / "nope")})
