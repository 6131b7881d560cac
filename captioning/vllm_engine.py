"""`vllm` engine: in-process vLLM engines through Ray Data LLM (`ray.data.llm`), for vLLM-native
captioners (Qwen2.5-VL, InternVL, llava-hf). Needs CUDA vLLM (`ray[llm]` on GPU hosts; not installed
here). Share-Captioner cannot run here: its architecture is not in vLLM's registry.

The request building and the output parsing are plain functions (tested everywhere); only
`caption_dataset` touches ray.data.llm. Sampling: vLLM's beam search has no repetition penalty, so
this engine samples with Share-Captioner's temperature / repetition penalty and ignores num_beams.
Degenerate outputs get one more pass with seed + 1, as in the other engines.
"""
from __future__ import annotations

import pyarrow as pa

from captioning import postprocess as pp
from captioning.config import CaptionConfig
from captioning.prompt import downscale, messages


def sampling_params(c: CaptionConfig, seed: int) -> dict:
    g = c.generation
    return {"temperature": g.temperature if g.do_sample else 0.0, "top_p": g.top_p,
            "repetition_penalty": g.repetition_penalty, "max_tokens": g.max_new_tokens or g.max_length,
            "seed": seed}


def build_request(row: dict, c: CaptionConfig, seed: int) -> dict:
    """Manifest row (key, caption, image bytes) -> ray.data.llm request row (messages with a PIL image)."""
    from common.images import decode_image

    im, info = decode_image(row["image"]) if row.get("image") is not None else (None, {})
    if im is None:
        raise ValueError(f"row {row['key']}: image not decodable: {info.get('error')}")
    return {"messages": messages(c, image=downscale(im, c.image_max_side)), "sampling_params": sampling_params(c, seed),
            "key": row["key"], "_part": row["_part"], "caption": row.get("caption"), "image": row["image"]}


def parse_output(row: dict, c: CaptionConfig, seed: int) -> dict:
    """ray.data.llm output row -> one engine result dict (text, status, error, tokens, seed)."""
    text = row.get("generated_text")
    ntok = row.get("num_generated_tokens")
    if ntok is None and row.get("generated_tokens") is not None:
        ntok = len(row["generated_tokens"])
    err = row.get("__inference_error__") or row.get("error")
    res = {"key": row["key"], "_part": row["_part"], "caption": row.get("caption"), "image": row.get("image"),
           "seed": seed, "tokens": ntok, "text": None}
    if text is None or err:
        res.update(status="failed_engine", error=str(err or "no generated_text")[:300])
        return res
    j = pp.judge(text, c.quality)
    if j.text is None:
        res.update(status="degenerate", error=f"seed {seed}: {j.reason}")
    else:
        res.update(text=j.text, status="ok", error=None)
    return res


def decode_ok(row: dict) -> bool:
    from common.images import decode_image

    return row.get("image") is not None and decode_image(row["image"])[0] is not None


def to_columns(rows: list[dict], c: CaptionConfig) -> pa.Table:
    """Result dicts -> the caption_* columns (same as the hf / openai workers)."""
    from captioning.worker import finish_rows

    t5 = pp.T5Counter(c.t5_tokenizer)
    return finish_rows(c, [r["key"] for r in rows], [r["_part"] for r in rows], [r.get("caption") for r in rows],
                       rows, t5)


def _processor(c: CaptionConfig, seed: int):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    v = c.vllm
    pc = vLLMEngineProcessorConfig(model_source=c.model, engine_kwargs=dict(v.engine_kwargs),
                                   batch_size=v.batch_size, concurrency=v.concurrency,
                                   prepare_multimodal_stage={"enabled": True}, should_continue_on_error=True)
    return build_processor(pc, preprocess=lambda r: build_request(r, c, seed),
                           postprocess=lambda r: parse_output(r, c, seed))


def caption_dataset(ds, c: CaptionConfig):
    """Rows (key, _part, caption, image) -> caption_* columns, through vLLM, with one degenerate retry."""
    ds = ds.materialize()
    bad = ds.filter(lambda r: not decode_ok(r)).map(
        lambda r: {**r, "text": None, "status": "failed_image", "error": "image missing or not decodable",
                   "seed": None, "tokens": None})
    results = _processor(c, c.generation.seed)(ds.filter(decode_ok)).materialize()
    for attempt in range(1, c.quality.retries + 1):
        redo = results.filter(lambda r: r["status"] == "degenerate")
        if redo.count() == 0:
            break
        again = _processor(c, c.generation.seed + attempt)(
            redo.select_columns(["key", "_part", "caption", "image"]))
        results = results.filter(lambda r: r["status"] != "degenerate").union(again).materialize()
    merged = results.union(bad) if bad.count() else results
    return merged.map_batches(lambda b: to_columns(b.to_pylist(), c), batch_format="pyarrow", batch_size=256)
