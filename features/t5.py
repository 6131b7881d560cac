"""T5 caption embeddings: transformers T5EncoderModel + tokenizer, valid tokens only.

PixArt-Sigma feeds the DiT T5 outputs padded to 300 tokens plus a mask; padded positions never
reach the DiT (cross-attention masks them). So we store only the n valid tokens (n counts the EOS
token, exactly the mask's ones) as fp16 (n, D) (or fp8 + per-token scale: `text_dtype`); the
loader re-pads with the mask (lossless, proven by tests/features/test_feat_t5.py). Captions of a batch are sorted by token length and encoded in
chunks padded only to the chunk's longest caption; the official tool runs one caption at a time
padded to 300 (see benchmarks/features_bench.py for the speed ratio).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from _sigma.device import pick_device_dtype
from _sigma.models import load_t5
from _sigma.shards import encode_tokens

class T5Embedder:
    """Model-backed stage: rows with text_long / text_short -> adds t5_long, t5_short (npy bytes of
    (n, D) in `text_dtype`, see _sigma.shards.encode_tokens; null when the text is null), n_long,
    n_short (int32), t5_error."""

    def __init__(self, t5: str, max_length: int = 300, precision: str = "auto", num_gpus: float = 0.0,
                 chunk: int = 32, text_dtype: str = "fp16", batch_tokens: int = 0):
        self.text_dtype, self.batch_tokens = text_dtype, batch_tokens
        self.device, self.dtype = pick_device_dtype(precision, num_gpus)
        self.tok, self.model = load_t5(t5, self.device, self.dtype)
        self.max_length, self.chunk = max_length, max(1, chunk)
        self.dim = int(self.model.config.d_model)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Valid tokens per text (EOS included, truncated at max_length) = the mask's ones."""
        enc = self.tok(texts, max_length=self.max_length, truncation=True)
        return [len(ids) for ids in enc["input_ids"]]

    def chunks(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by token length, cut into forwards of at most `chunk` captions and, when
        batch_tokens > 0, at most batch_tokens padded tokens (captions x the chunk's longest): long
        captions go in small chunks, short ones in big ones. A compute-bound device (CPU) wants a
        small budget (little padding); a GPU a large one (full batches)."""
        out, cur = [], []
        for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
            # ascending order: caption i is the longest of `cur + [i]`, so it sets the padded width
            if cur and (len(cur) >= self.chunk or (self.batch_tokens and (len(cur) + 1) * lengths[i] > self.batch_tokens)):
                out.append(cur)
                cur = []
            cur.append(i)
        return out + [cur] if cur else out

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """texts -> [fp16 (n_i, D)] in input order. Identical texts (alt texts repeat: "image",
        product names) are encoded once per call and share the result."""
        uniq = list(dict.fromkeys(texts))
        if len(uniq) == len(texts):
            return self._encode(texts)
        embs = dict(zip(uniq, self._encode(uniq)))
        return [embs[t] for t in texts]

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        """Distinct texts -> [fp16 (n_i, D)]; length-sorted chunks, each padded to its max."""
        out: list[np.ndarray | None] = [None] * len(texts)
        for idx in self.chunks(self.token_counts(texts)):
            enc = self.tok([texts[i] for i in idx], max_length=self.max_length, truncation=True,
                           padding="longest", return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, L, D)
            hidden = hidden.float().cpu().numpy()
            for j, i in enumerate(idx):
                n = int(mask[j].sum())
                out[i] = hidden[j, :n].astype(np.float16)  # (n, D) valid tokens only
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def encode_padded(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The official layout: one caption at a time, padded to max_length -> (N, L, D) fp16, (N, L) int16."""
        embs, masks = [], []
        for t in texts:
            enc = self.tok([t], max_length=self.max_length, truncation=True, padding="max_length",
                           return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            embs.append(hidden.float().cpu().numpy()[0].astype(np.float16))
            masks.append(mask.cpu().numpy()[0].astype(np.int16))
        return np.stack(embs), np.stack(masks)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        longs, shorts = batch.column("text_long").to_pylist(), batch.column("text_short").to_pylist()
        texts, slots = [], []  # slots: (row, "long"/"short")
        for i in range(n):
            for kind, t in (("long", longs[i]), ("short", shorts[i])):
                if t is not None:
                    texts.append(t)
                    slots.append((i, kind))
        res = {"long": [None] * n, "short": [None] * n}
        cnt = {"long": [0] * n, "short": [0] * n}
        errors: list = [None] * n
        try:
            embs = self.encode(texts) if texts else []
            for (i, kind), e in zip(slots, embs):
                res[kind][i], cnt[kind][i] = encode_tokens(e, self.text_dtype), int(e.shape[0])
        except Exception as e:  # one bad batch must not kill the job: every row gets the reason
            errors = [f"t5 failed: {e}"[:300]] * n
        for col, vals in (("t5_long", res["long"]), ("t5_short", res["short"])):
            batch = batch.append_column(col, pa.array(vals, pa.binary()))
        batch = batch.append_column("n_long", pa.array(cnt["long"], pa.int32()))
        batch = batch.append_column("n_short", pa.array(cnt["short"], pa.int32()))
        return batch.append_column("t5_error", pa.array(errors, pa.string()))
