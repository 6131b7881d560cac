"""Tiny random-weight twins of the reward models' architectures (eval/rewards.py), built offline by
`make models` (curation.tiny_models). Each is written in the layout its real release has, so the
real loading code runs on it:

  rewards/pickscore/    transformers CLIPModel + CLIPProcessor (save_pretrained), the real CLIP
                        BPE (vocab.json / merges.txt written from the vocabulary open_clip ships)
  rewards/hpsv2/        an open_clip model-config json + `HPS_v2_compressed.pt` ({"state_dict"})
  rewards/imagereward/  `ImageReward.pt` in the ORIGINAL BLIP key layout (blip.visual_encoder.*,
                        blip.text_encoder.*, mlp.layers.*; written from the shapes of BLIP's
                        vit.py / med.py, not from transformers), `med_config.json`, `vocab.txt`
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a an the of on in with and red blue green small large old new wooden cat dog tree house river "
         "mountain city street car boat sky cloud light photo painting portrait bright dark circle square "
         "background").split()


def _clip_tokenizer_files(d: Path) -> None:
    """vocab.json + merges.txt of the OpenAI CLIP BPE, from the vocabulary inside open_clip."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    # open_clip names the specials <start_of_text> / <end_of_text>; the released CLIP files (and
    # transformers' CLIPTokenizer) call the same ids 49406 / 49407 <|startoftext|> / <|endoftext|>.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")


def build_pickscore(d: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    _clip_tokenizer_files(d)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")))
    proc.save_pretrained(d)
    return d


HPS_TINY = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def build_hpsv2(d: Path) -> Path:
    import open_clip

    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "hpsv2-tiny.json"
    cfg.write_text(json.dumps(HPS_TINY, indent=2))
    open_clip.add_model_config(cfg)
    torch.manual_seed(1)
    model = open_clip.create_model("hpsv2-tiny", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, d / "HPS_v2_compressed.pt")
    return d


def imagereward_state(dim: int = 32, depth: int = 2, patch: int = 16, image: int = 32, text_width: int = 32,
                      text_layers: int = 2, vocab: int = 64, positions: int = 64, seed: int = 2) -> dict:
    """A random ImageReward state dict in the original key layout (BLIP vit.py / med.py shapes)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, n):
        return {f"{prefix}.weight": 1 + rnd(n), f"{prefix}.bias": rnd(n)}

    def lin(prefix, o, i):
        return {f"{prefix}.weight": rnd(o, i, scale=i ** -0.5), f"{prefix}.bias": rnd(o)}

    v = "blip.visual_encoder"
    sd = {f"{v}.cls_token": rnd(1, 1, dim), f"{v}.pos_embed": rnd(1, 1 + (image // patch) ** 2, dim),
          f"{v}.patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
          f"{v}.patch_embed.proj.bias": rnd(dim), **ln(f"{v}.norm", dim)}
    for i in range(depth):
        b = f"{v}.blocks.{i}"
        sd.update({**ln(f"{b}.norm1", dim), **lin(f"{b}.attn.qkv", 3 * dim, dim), **lin(f"{b}.attn.proj", dim, dim),
                   **ln(f"{b}.norm2", dim), **lin(f"{b}.mlp.fc1", 4 * dim, dim), **lin(f"{b}.mlp.fc2", dim, 4 * dim)})
    t = "blip.text_encoder"
    sd.update({f"{t}.embeddings.word_embeddings.weight": rnd(vocab, text_width),
               f"{t}.embeddings.position_embeddings.weight": rnd(positions, text_width),
               f"{t}.embeddings.position_ids": torch.arange(positions)[None], **ln(f"{t}.embeddings.LayerNorm", text_width)})
    for i in range(text_layers):
        b = f"{t}.encoder.layer.{i}"
        for att, kv in (("attention", text_width), ("crossattention", dim)):
            sd.update({**lin(f"{b}.{att}.self.query", text_width, text_width), **lin(f"{b}.{att}.self.key", text_width, kv),
                       **lin(f"{b}.{att}.self.value", text_width, kv),
                       **lin(f"{b}.{att}.output.dense", text_width, text_width), **ln(f"{b}.{att}.output.LayerNorm", text_width)})
        sd.update({**lin(f"{b}.intermediate.dense", 4 * text_width, text_width),
                   **lin(f"{b}.output.dense", text_width, 4 * text_width), **ln(f"{b}.output.LayerNorm", text_width)})
    for j, (o, i) in zip((0, 2, 4, 6, 7), ((1024, text_width), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd.update(lin(f"mlp.layers.{j}", o, i))
    # BLIP_Pretrain's other heads (unused by the reward): present in the release, ignored on load
    sd.update(lin("blip.vision_proj", 256, dim))
    return sd


def build_imagereward(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + [w for w in WORDS if w not in vocab]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    n_vocab = len(vocab) + 2  # BLIP's init_tokenizer adds [DEC] and [ENC]
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 128,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": n_vocab,
           "encoder_width": 32, "add_cross_attention": True}
    (d / "med_config.json").write_text(json.dumps(med, indent=2))
    state = imagereward_state(vocab=n_vocab, positions=med["max_position_embeddings"])
    torch.save(state, d / "ImageReward.pt")
    return d


def build(out_dir: Path) -> dict:
    root = Path(out_dir) / "rewards"
    return {"pickscore": build_pickscore(root / "pickscore"), "hpsv2": build_hpsv2(root / "hpsv2"),
            "imagereward": build_imagereward(root / "imagereward")}
