"""How the AI judge (eval.judge) reaches a vision-language model: two engines, one interface.

`openai`: any OpenAI-compatible chat endpoint (`vllm serve` of an open VLM, a hosted GPT-4V-class
API). Stdlib HTTP (urllib), `concurrency` requests in flight (a thread pool that also reads and
encodes the images, so a run over 25K requests never holds more than a few in memory), `timeout`
per request, `retries` with exponential backoff and jitter on transport errors, 408/429/5xx.
Images go inline as `image_url` data URLs. With `answer: choice` the request carries vLLM's
`structured_outputs: {choice: [A, B, tie]}` so the model can only say one of the three.

`hf`: transformers in this process (AutoProcessor + AutoModelForImageTextToText; the processor's
chat template places the two images), for the demo and tests without a server. `answer: free`
generates greedily up to max_tokens; `answer: choice` scores the three answers as continuations
of the prompt (sum of token log-probs) and answers the most likely one, its scores recorded.

`run(jobs)` yields (job id, result) in completion order; result = {raw, tokens[, scores]} or
{error} for a request that failed after its retries (the judge asks it again on the next run).
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from PIL import Image

ANSWERS = ("A", "B", "tie")
_RETRY_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}


def fit_image(data: bytes, max_side: int) -> tuple[bytes, Image.Image]:
    """PNG bytes of the image with its longer side at most max_side (0: unchanged), and the image."""
    im = Image.open(io.BytesIO(data))
    im.load()
    im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
    return data, im


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def content(parts: list[tuple[str, str]], image_part) -> list[dict]:
    """Chat content from ("text", s) / ("image", j) parts; image_part(j) gives the image's part."""
    return [{"type": "text", "text": v} if kind == "text" else image_part(v) for kind, v in parts]


class HTTPError(RuntimeError):
    def __init__(self, status: int | None, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class OpenAIJudge:
    def __init__(self, jc):
        self.jc = jc
        self.url = jc.base_url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(jc.api_key_env, "")

    def body(self, parts: list, images: list[bytes]) -> dict:
        pngs = [fit_image(b, self.jc.image_max_side)[0] for b in images]
        msg = content(parts, lambda j: {"type": "image_url", "image_url": {"url": data_url(pngs[j])}})
        body = {"model": self.jc.model, "messages": [{"role": "user", "content": msg}], "n": 1,
                "max_tokens": self.jc.max_tokens, "temperature": self.jc.temperature, "seed": 0}
        if self.jc.answer == "choice":
            body["structured_outputs"] = {"choice": list(ANSWERS)}  # vLLM's extension of the schema
        return body

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.jc.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise HTTPError(e.code, e.read().decode("utf-8", "replace")) from None

    def ask(self, parts: list, images: list[bytes]) -> dict:
        body, delay = self.body(parts, images), 1.0
        for attempt in range(self.jc.retries + 1):
            try:
                r = self._post(body)
                text = ((r["choices"][0].get("message") or {}).get("content")) or ""
                usage = r.get("usage") or {}
                return {"raw": text, "tokens": usage.get("completion_tokens"), "prompt_tokens": usage.get("prompt_tokens")}
            except HTTPError as e:
                if e.status not in _RETRY_HTTP or attempt == self.jc.retries:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
                if attempt == self.jc.retries:
                    raise
            time.sleep(delay * (1 + random.random()))  # exponential backoff with jitter
            delay *= 2
        raise AssertionError("unreachable")

    def run(self, jobs):
        """jobs: iterable of (id, parts, image loader () -> [bytes, bytes]). At most `concurrency`
        requests in flight and as many queued; yields (id, result) as they finish."""
        def one(parts, load):
            try:
                return self.ask(parts, load())
            except Exception as e:  # noqa: BLE001 - recorded for its request, asked again next run
                return {"error": f"{type(e).__name__}: {str(e)[:300]}"}

        with ThreadPoolExecutor(max_workers=self.jc.concurrency) as pool:
            pending = {}
            for jid, parts, load in jobs:
                pending[pool.submit(one, parts, load)] = jid
                if len(pending) >= 2 * self.jc.concurrency:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield pending.pop(f), f.result()
            for f in list(pending):
                yield pending.pop(f), f.result()


class HFJudge:
    def __init__(self, jc):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from _sigma.device import pick_device_dtype

        self.jc, self.torch = jc, torch
        self.device, self.dtype = pick_device_dtype(jc.precision, 1.0 if torch.cuda.is_available() else 0.0,
                                                    auto_gpu="bf16")
        from _sigma.fetch import local_model

        src = local_model(jc.model)  # folder | hub name | s3:// / gs:// (fetched once per node)
        self.processor = AutoProcessor.from_pretrained(src)
        self.model = AutoModelForImageTextToText.from_pretrained(src, dtype=self.dtype).to(self.device).eval()
        self.tok = self.processor.tokenizer

    def _inputs(self, parts: list, images: list[bytes]) -> dict:
        ims = [fit_image(b, self.jc.image_max_side)[1] for b in images]
        msgs = [{"role": "user", "content": content(parts, lambda j: {"type": "image"})}]
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=ims, text=[text], return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def ask(self, parts: list, images: list[bytes]) -> dict:
        torch, inputs = self.torch, self._inputs(parts, images)
        n = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            if self.jc.answer == "free":
                kw = {"do_sample": self.jc.temperature > 0, "max_new_tokens": self.jc.max_tokens}
                if self.jc.temperature > 0:
                    kw["temperature"] = self.jc.temperature
                torch.manual_seed(0)
                new = self.model.generate(**inputs, **kw)[0, n:]  # (T_new,)
                eos = self.model.generation_config.eos_token_id
                eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
                ids = new.tolist()
                cut = next((t + 1 for t, x in enumerate(ids) if x in eos), len(ids))
                return {"raw": self.tok.decode(ids[:cut], skip_special_tokens=True), "tokens": cut}
            scores = {}
            for a in ANSWERS:  # log P(answer tokens | prompt): one forward of prompt + answer each
                opt = torch.tensor([self.tok.encode(" " + a, add_special_tokens=False)], device=self.device)
                ids = torch.cat([inputs["input_ids"], opt], 1)  # (1, n + m)
                kw = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
                logits = self.model(**kw).logits[0, n - 1:-1].float()  # (m, V): predictions of the answer
                scores[a] = float(logits.log_softmax(-1).gather(1, opt[0][:, None]).sum())
        return {"raw": max(ANSWERS, key=lambda a: scores[a]), "tokens": None, "scores": scores}

    def run(self, jobs):
        for jid, parts, load in jobs:
            try:
                yield jid, self.ask(parts, load())
            except Exception as e:  # noqa: BLE001 - recorded for its request
                yield jid, {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def make_engine(jc):
    if not jc.model:
        raise ValueError("eval.judge.model is empty: name the served model (openai) or a local VLM folder (hf)")
    return OpenAIJudge(jc) if jc.engine == "openai" else HFJudge(jc)
