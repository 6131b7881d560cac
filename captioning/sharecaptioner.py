"""`hf` engine, Share-Captioner's own model interface (`caption.hf_api: sharecaptioner`).

Share-Captioner (Lin-Chen/ShareCaptioner, InternLM-XComposer-7B v1 based, `trust_remote_code`,
transformers 4.31 in the actors' own Ray runtime_env) has no processor or chat template: its
remote code embeds the prompt pieces and the image itself and generates from `inputs_embeds`.
This class rebuilds the ShareGPT4V batch-inference recipe on that interface:

    inputs_embeds = [ emb('<|User|>:', with BOS) | encode_img(images) | emb(prompt + eoh + '\\n<|Bot|>:') ]
                     (1, L1, D) repeated B times   (B, n_img, D)        (1, L2, D) repeated B times

then `internlm_model.generate(inputs_embeds=..., num_beams=3, do_sample=True, temperature=1.0,
repetition_penalty=1.5, min_length=1, length_penalty=1.0, eos_token_id=tokenizer.eos)` and
`decode_text` per row (ids of -1, which XComposer's beam search can emit, become EOS first; a row
is cut after its first EOS, a row without one is kept whole: `generated_length`).
The token budget is passed as max_new_tokens = `generation.max_length` (500): under
transformers 4.31 generating from embeddings, max_length counts only new tokens; newer versions
count the prompt embeddings too, so max_new_tokens keeps the paper's budget in both.
Everything around generation (decode, retry, post-processing, provenance) is CaptionWorker's.
"""
from __future__ import annotations

from captioning.config import CaptionConfig
from captioning.worker import CaptionWorker

USER, BOT = "<|User|>:", "\n<|Bot|>:"


class ShareCaptioner(CaptionWorker):
    def __init__(self, cfg: CaptionConfig, num_gpus: float = 0.0):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import warnings

        # Expected, and the same under 4.31: without input_ids the penalty sees only new tokens.
        warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
        self.torch = torch
        from _sigma.device import pick_device_dtype

        self.device, self.dtype = pick_device_dtype(cfg.precision, num_gpus, auto_gpu="fp16")
        from _sigma.fetch import local_model

        kw = dict(trust_remote_code=True)  # the XComposer interface only exists as remote code
        model = local_model(cfg.model)  # folder | hub name | s3:// / gs:// (fetched once per node)
        self.model = AutoModelForCausalLM.from_pretrained(model, **kw).to(self.device, self.dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model, **kw)
        self.model.tokenizer = self.tokenizer  # as Share-Captioner's scripts do: encode/decode_text use it
        with torch.inference_mode():
            self.seg1 = self.model.encode_text(USER, add_special_tokens=True)  # (1, L1, D), BOS first
            self.seg2 = self.model.encode_text(cfg.prompt + self.model.eoh + BOT, add_special_tokens=False)

    def gen_kwargs(self) -> dict:
        g = self.cfg.generation
        kw = dict(num_beams=g.num_beams, do_sample=g.do_sample, repetition_penalty=g.repetition_penalty,
                  min_length=1, length_penalty=1.0, num_return_sequences=1,
                  eos_token_id=self.tokenizer.eos_token_id, max_new_tokens=g.max_new_tokens or g.max_length)
        if g.do_sample:
            kw.update(temperature=g.temperature, top_p=g.top_p)
        if self.tokenizer.pad_token_id is not None:
            kw["pad_token_id"] = self.tokenizer.pad_token_id
        return kw

    def build_inputs(self, images: list):
        """PIL RGB images -> inputs_embeds (B, L1 + n_img + L2, D)."""
        torch = self.torch
        pixels = torch.stack([self.model.vis_processor(im) for im in images]).to(self.device, self.dtype)
        img = self.model.encode_img(pixels)  # (B, n_img, D)
        b = img.shape[0]
        return torch.cat([self.seg1.expand(b, -1, -1), img, self.seg2.expand(b, -1, -1)], dim=1)

    def generate(self, images: list, seed: int) -> list[tuple[str, int]]:
        torch = self.torch
        eos = self.tokenizer.eos_token_id
        torch.manual_seed(seed)  # beam sampling is reproducible per (batch, seed)
        amp = torch.autocast("cuda", dtype=self.dtype) if self.device == "cuda" and self.dtype != torch.float32 \
            else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), amp:
            out = self.model.internlm_model.generate(inputs_embeds=self.build_inputs(images), **self.gen_kwargs())
        out = out.clone()
        out[out == -1] = eos  # (B, T) new tokens only (generation from embeddings)
        res = []
        for row in out:
            n = generated_length(row.tolist(), eos)
            res.append((self.model.decode_text([row[:n]]), n))
        return res


def generated_length(ids: list[int], eos: int) -> int:
    """Tokens one row of `generate`'s (B, T) output really generated, EOS included.

    Up to the first EOS. A row without EOS never finished: it ran to the token budget, so all T
    positions are generated tokens. generate pads only rows that finished (after their EOS; the
    4.31 beam scorer writes an EOS before any padding too), so a pad id in such a row is a token the
    model chose, wherever it stands; counting non-pad ids from the start would cut the row's end.
    """
    return ids.index(eos) + 1 if eos in ids else len(ids)
