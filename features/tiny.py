"""Tiny random-weight models of the features stage: out_dir/vae and out_dir/t5.

Real architectures (diffusers AutoencoderKL, transformers T5EncoderModel + T5 tokenizer), tiny
widths, random weights, built offline. The T5 tokenizer comes from a sentencepiece unigram model
trained here on generated caption sentences (no hub download), so every component that reads
captions (captioning, features, training with caption_channels 32) gets a real tokenizer.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

from _sigma import fs

T5_DIM = 32  # d_model of the tiny T5: training uses caption_channels 32
T5_VOCAB = 1000
SCALE_FACTOR = 0.13025  # SDXL VAE scaling factor, copied into the tiny VAE config

_SUBJECTS = ["a dog", "a cat", "two children", "an old man", "a woman", "a red car", "a small boat", "a bird",
             "a wooden house", "a mountain", "a bowl of fruit", "a city street", "a bicycle", "a horse",
             "a lighthouse", "a bridge", "a field of flowers", "a cup of coffee", "a train", "a forest"]
_ACTIONS = ["standing", "sitting", "running", "resting", "shown", "painted", "photographed", "lying",
            "floating", "waiting", "glowing", "reflected"]
_PLACES = ["on a beach", "in a park", "near a lake", "under a blue sky", "at sunset", "in the snow",
           "on a table", "in a busy market", "beside a river", "in a quiet room", "on a hill",
           "in the rain", "at night", "in a garden", "against a white background"]
_DETAILS = ["The lighting is soft and warm.", "The colors are vivid and saturated.",
            "The background is blurred with shallow depth of field.", "Shadows fall across the ground.",
            "The scene is calm and peaceful.", "There are clouds in the distance.",
            "The image has a vintage film look.", "Fine textures are visible in the foreground.",
            "The composition is centered and symmetrical.", "Green trees surround the area.",
            "It looks like a high resolution photograph.", "The style resembles an oil painting."]


_WORDS = """apple orange banana lemon cherry grape peach pear plum melon tomato carrot potato onion garlic pepper
bread cheese butter pasta pizza salad soup cake cookie chocolate candy honey sugar salt tea wine beer juice water
milk coffee kitchen bedroom bathroom window door roof wall floor ceiling stairs chimney garage fence gate garden
yard porch balcony castle palace temple church tower skyscraper factory warehouse station airport harbor
village town countryside desert jungle canyon valley glacier volcano island ocean sea lake river stream
waterfall pond swamp meadow prairie cliff cave beach shore dune hill mountain peak ridge forest woods grove
elephant giraffe zebra lion tiger leopard cheetah bear wolf fox deer rabbit squirrel mouse hamster turtle
snake lizard frog fish shark whale dolphin octopus crab lobster penguin parrot eagle owl pigeon duck swan
goose chicken rooster cow sheep goat pig donkey camel kangaroo koala panda monkey gorilla butterfly bee ant
spider beetle dragonfly ladybug guitar piano violin drum trumpet flute microphone camera laptop phone tablet
keyboard monitor television radio clock watch lamp candle mirror painting sculpture statue vase basket bottle
glass plate spoon fork knife chair table sofa couch bed pillow blanket carpet curtain shelf bookcase book
newspaper magazine letter envelope pencil pen notebook backpack suitcase umbrella hat cap scarf glove boot
shoe sneaker jacket coat sweater shirt dress skirt jeans uniform helmet mask necklace ring bracelet earring
red blue green yellow purple pink brown black white gray golden silver orange turquoise beige crimson violet
bright dark pale vivid muted colorful monochrome shiny matte glossy rough smooth soft hard wet dry frozen
ancient modern futuristic rustic elegant cozy spacious narrow crowded empty abandoned ruined polished
happy sad smiling laughing serious curious sleepy tired angry calm excited surprised thoughtful
morning afternoon evening midnight dawn dusk spring summer autumn winter foggy misty cloudy sunny stormy
windy snowy rainy portrait landscape closeup aerial panorama illustration watercolor sketch cartoon anime
render photograph poster logo pattern texture silhouette reflection shadow sunlight moonlight neon
cinematic dramatic minimalist detailed realistic abstract surreal impressionist baroque gothic""".split()


def caption_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Generated English caption sentences (short alt-text-like and long descriptive ones)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}"
        if i % 2:
            s = s[0].upper() + s[1:] + ". " + " ".join(rng.sample(_DETAILS, rng.randint(1, 4)))
        if i % 3 == 0:
            s += " with " + " and ".join(rng.sample(_WORDS, 3)) + ", " + " ".join(rng.sample(_WORDS, 4))
        lines.append(s)
    lines += [" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 12)]
    # Digits, punctuation and capitals so sentencepiece sees a realistic character set.
    lines += ["0 1 2 3 4 5 6 7 8 9 10 100 2024 4K HD 1080p", "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
              "- , . ; : ! ? ' \" ( ) [ ] / & % $ # @ +"]
    return lines


def build_t5(target: Path, d_model: int = T5_DIM, layers: int = 2, heads: int = 2, d_ff: int = 64,
             vocab: int = T5_VOCAB, seed: int = 0) -> Path:
    """T5EncoderModel + T5 tokenizer (sentencepiece unigram trained here) saved to `target`."""
    with fs.atomic_dir(target) as tmp:
        _write_t5(Path(tmp), vocab, d_model, heads, d_ff, layers, seed)
    return target


def _write_t5(tmp: Path, vocab: int, d_model: int, heads: int, d_ff: int, layers: int, seed: int) -> None:
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    model_buf = io.BytesIO()
    # T5's conventions: pad=0, eos=1, unk=2, no bos; hard_vocab_limit=False lets a tiny corpus
    # produce fewer pieces than requested instead of failing.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus()), model_writer=model_buf, vocab_size=vocab,
        model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    spm_path = tmp / "spiece.model"
    spm_path.write_bytes(model_buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model_buf.getvalue())
    # transformers 5 builds the T5 tokenizer from (piece, score) pairs; ids follow the spm model.
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                   num_heads=heads, relative_attention_num_buckets=8, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                   pad_token_id=0, eos_token_id=1)
    model = T5EncoderModel(cfg).eval()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def build_vae(target: Path, seed: int = 0) -> Path:
    """AutoencoderKL: 4 down blocks (3 downsamplings = 8x), 4 latent channels, scaling 0.13025."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=256, scaling_factor=SCALE_FACTOR,
    ).eval()
    with fs.atomic_dir(target) as tmp:
        vae.save_pretrained(tmp)
    return target


def build(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"vae": build_vae(out_dir / "vae"), "t5": build_t5(out_dir / "t5")}


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "models/tiny")))
