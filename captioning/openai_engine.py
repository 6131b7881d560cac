"""`openai` engine: an HTTP client for any OpenAI-compatible chat server (`vllm serve` on GPU hosts).

Bounded concurrency (a thread pool of `openai.concurrency` per actor), a timeout per request,
retries with exponential backoff and jitter on transport errors, 429 and 5xx, images inline as
base64 data URLs. Stdlib only (urllib), so it runs in any venv.

Sampling: vLLM's beam search has no repetition penalty, so this engine samples (temperature, top_p,
repetition_penalty, seed) and ignores num_beams; the difference is recorded in caption_params.
"""
from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from captioning.config import CaptionConfig
from captioning.prompt import data_url, messages
from captioning.worker import CaptionWorker

_RETRY_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPError(RuntimeError):
    def __init__(self, status: int | None, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class OpenAIClient:
    def __init__(self, cfg: CaptionConfig):
        self.cfg, self.o = cfg, cfg.openai
        self.url = self.o.base_url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(self.o.api_key_env, "")
        self.model = cfg.served_model_name or cfg.model
        self.pool = ThreadPoolExecutor(max_workers=self.o.concurrency)  # bounds requests in flight

    def payload(self, image, seed: int) -> dict:
        g = self.cfg.generation
        url = data_url(image, self.o.image_max_side) if (image is not None and self.o.send_images) else None
        body = {"model": self.model, "messages": messages(self.cfg, image_url=url), "n": 1,
                "temperature": g.temperature if g.do_sample else 0.0, "top_p": g.top_p, "seed": seed,
                "max_tokens": g.max_new_tokens or g.max_length,
                "repetition_penalty": g.repetition_penalty}  # vLLM extension of the OpenAI schema
        return body

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.o.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise HTTPError(e.code, e.read().decode("utf-8", "replace")) from None

    def complete(self, body: dict) -> tuple[str, int]:
        """One request with retries -> (text, completion tokens)."""
        delay = self.o.backoff
        for attempt in range(self.o.retries + 1):
            try:
                r = self._post(body)
                choice = r["choices"][0]
                text = (choice.get("message") or {}).get("content") or ""
                ntok = (r.get("usage") or {}).get("completion_tokens")
                return text, ntok
            except HTTPError as e:
                if e.status not in _RETRY_HTTP or attempt == self.o.retries:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
                if attempt == self.o.retries:
                    raise
            time.sleep(delay * (1 + random.random()))  # exponential backoff with jitter
            delay *= 2
        raise AssertionError("unreachable")

    def map(self, images: list, seed: int) -> list:
        """Results in input order; an exception per failed request (never raises for one row)."""
        futs = [self.pool.submit(self.complete, self.payload(im, seed)) for im in images]
        out = []
        for f in futs:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out


class OpenAICaptioner(CaptionWorker):
    """One request per image, so a failing request fails only its row: this worker replaces the
    base class's batch-then-row-by-row fallback (`_generate_safe`) and needs no `generate`."""

    def __init__(self, cfg: CaptionConfig, num_gpus: float = 0.0):
        super().__init__(cfg)
        self.client = OpenAIClient(cfg)

    def _generate_safe(self, images: list, seed: int):
        res = []
        for r in self.client.map(images, seed):
            if isinstance(r, Exception):
                res.append((None, None, f"{type(r).__name__}: {str(r)[:300]}"))
            else:
                res.append((r[0], r[1], None))
        return res
