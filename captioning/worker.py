"""The caption worker shared by the `hf` and `openai` engines (a model-backed stage class).

Ray-free. A subclass loads its model/client in `__init__` and implements
`generate(images, seed) -> list[(text, generated_tokens)]`; this base class does everything around
it, identically for every engine: decode, downscale, retry degenerate output with another seed,
post-process, count T5 tokens, derive short captions, provenance. One bad image or one failing
request never fails the batch: the row gets a status and a reason.
"""
from __future__ import annotations

import pyarrow as pa

from captioning import postprocess as pp
from captioning.config import CaptionConfig
from captioning.prompt import downscale, generation_params, prompt_hash

# Terminal statuses: a rerun with the same config does not caption these rows again.
DONE_STATUSES = ("ok", "too_long", "degenerate", "failed_image")
OUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("_part", pa.int64()),
    ("caption_long", pa.string()), ("caption_status", pa.string()), ("caption_error", pa.string()),
    ("caption_short", pa.string()), ("caption_short_derived", pa.bool_()),
    ("caption_model", pa.string()), ("caption_engine", pa.string()), ("caption_prompt_hash", pa.string()),
    ("caption_params", pa.string()), ("caption_tokens", pa.int64()), ("caption_t5_tokens", pa.int64()),
])


def short_caption(alt: str | None, long: str | None) -> tuple[str | None, bool]:
    """(short caption, derived?): the raw alt text unless it is junk, else the long caption's first sentence."""
    if not pp.is_junk_alt(alt):
        return pp.normalize_whitespace(alt), False
    if long:
        return pp.first_sentence(long), True
    return None, False


def finish_rows(cfg: CaptionConfig, keys, parts, alts, results, t5: pp.T5Counter) -> pa.Table:
    """results[i] = dict(text, status, error, tokens, seed) -> the caption_* columns (OUT_SCHEMA)."""
    longs = [r["text"] for r in results]
    t5n = t5(longs)
    cols = {name: [] for name in OUT_SCHEMA.names}
    ph = prompt_hash(cfg)
    for i, r in enumerate(results):
        status, error = r["status"], r["error"]
        if status == "ok" and t5n[i] is not None and t5n[i] > cfg.quality.max_t5_tokens:
            status, error = "too_long", f"{t5n[i]} T5 tokens > {cfg.quality.max_t5_tokens} (kept; truncated at training)"
        short, derived = short_caption(alts[i], longs[i])
        cols["key"].append(keys[i])
        cols["_part"].append(parts[i])
        cols["caption_long"].append(longs[i])
        cols["caption_status"].append(status)
        cols["caption_error"].append(error)
        cols["caption_short"].append(short)
        cols["caption_short_derived"].append(derived)
        cols["caption_model"].append(cfg.model)
        cols["caption_engine"].append(cfg.engine)
        cols["caption_prompt_hash"].append(ph)
        cols["caption_params"].append(generation_params(cfg, r.get("seed")))
        cols["caption_tokens"].append(r.get("tokens"))
        cols["caption_t5_tokens"].append(t5n[i])
    return pa.table(cols, schema=OUT_SCHEMA)


def _maybe_crash() -> None:
    """Fault injection for the tests: SIGMA_CAPTION_CRASH_ONCE=<file> kills this actor process
    (os._exit, like a segfault or OOM kill) on its first batch, once per marker file."""
    import os

    marker = os.environ.get("SIGMA_CAPTION_CRASH_ONCE")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


class CaptionWorker:
    """Base of the engine classes. Input batch columns: key, _part, caption (alt), image (bytes | null)."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.t5 = pp.T5Counter(cfg.t5_tokenizer)

    def generate(self, images: list, seed: int) -> list[tuple[str, int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _generate_safe(self, images: list, seed: int) -> list[tuple[str | None, int | None, str | None]]:
        """generate() over the batch; if the batch fails, row by row, so one bad row fails alone."""
        try:
            out = self.generate(images, seed)
            return [(t, n, None) for t, n in out]
        except Exception as batch_err:  # noqa: BLE001 - isolate the failing row below
            if len(images) == 1:
                return [(None, None, f"{type(batch_err).__name__}: {str(batch_err)[:300]}")]
        res = []
        for im in images:
            try:
                (t, n), = self.generate([im], seed)
                res.append((t, n, None))
            except Exception as e:  # noqa: BLE001
                res.append((None, None, f"{type(e).__name__}: {str(e)[:300]}"))
        return res

    def __call__(self, batch: pa.Table) -> pa.Table:
        from _sigma.images import decode_image

        _maybe_crash()
        keys = batch.column("key").to_pylist()
        parts = batch.column("_part").to_pylist()
        alts = batch.column("caption").to_pylist() if "caption" in batch.column_names else [None] * len(keys)
        blobs = batch.column("image").to_pylist()
        results: list[dict] = [{"text": None, "status": None, "error": None, "tokens": None, "seed": None}
                               for _ in keys]
        images = {}
        for i, b in enumerate(blobs):
            if b is None:
                results[i].update(status="failed_image", error="image not found in the download shard")
                continue
            im, info = decode_image(b)
            if im is None:
                results[i].update(status="failed_image", error=info.get("error") or "decode failed")
            else:
                images[i] = downscale(im, self.cfg.image_max_side)
        pending = sorted(images)
        q, seed0 = self.cfg.quality, self.cfg.generation.seed
        for attempt in range(1 + q.retries):
            if not pending:
                break
            seed = seed0 + attempt
            outs = self._generate_safe([images[i] for i in pending], seed)
            still = []
            for i, (text, ntok, err) in zip(pending, outs):
                r = results[i]
                r.update(seed=seed, tokens=ntok)
                if err is not None:  # engine failure: not retried here (a rerun retries it)
                    r.update(status="failed_engine", error=err)
                    continue
                j = pp.judge(text, q)
                if j.text is not None:
                    r.update(text=j.text, status="ok", error=None)
                else:
                    r.update(status="degenerate", error=f"attempt {attempt + 1}: {j.reason}")
                    still.append(i)
            pending = still
        return finish_rows(self.cfg, keys, parts, alts, results, self.t5)
