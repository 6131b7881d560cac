"""`hf` engine: transformers generation inside a Ray actor (loads in __init__, runs in __call__).

Works with any processor + image-text-to-text model that has a chat template (llava-hf, Qwen2-VL,
Idefics, our tiny Llava). Defaults reproduce Share-Captioner's sampling settings (beam search
with sampling, 3 beams, temperature 1.0, repetition penalty 1.5, max_length 500). Models that need
an older transformers (Share-Captioner: trust_remote_code, transformers 4.31) run these actors in
their own Ray runtime_env (`caption.runtime_env_pip`), see captioning/stage.py.
"""
from __future__ import annotations

from captioning.config import CaptionConfig
from captioning.prompt import messages
from captioning.worker import CaptionWorker



class HFCaptioner(CaptionWorker):
    def __init__(self, cfg: CaptionConfig, num_gpus: float = 0.0):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        from _sigma.device import pick_device_dtype

        self.device, self.dtype = pick_device_dtype(cfg.precision, num_gpus, auto_gpu="fp16")
        from _sigma.fetch import local_model

        kw = dict(trust_remote_code=cfg.trust_remote_code)
        model = local_model(cfg.model)  # folder | hub name | s3:// / gs:// (fetched once per node)
        self.processor = AutoProcessor.from_pretrained(model, **kw)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only batched generation: pad on the left
        self.tokenizer = tok
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype, **kw)
        self.model.to(self.device).eval()

    def _gen_kwargs(self) -> dict:
        g = self.cfg.generation
        kw = dict(num_beams=g.num_beams, do_sample=g.do_sample, repetition_penalty=g.repetition_penalty)
        if g.do_sample:
            kw.update(temperature=g.temperature, top_p=g.top_p)
        # Share-Captioner generates from inputs_embeds only, so its max_length 500 bounds the generated
        # tokens; with input_ids (image tokens included: 576 for llava-1.5) max_length would cut the
        # prompt, so it becomes max_new_tokens here.
        kw["max_new_tokens"] = g.max_new_tokens or g.max_length
        return kw

    def generate(self, images: list, seed: int) -> list[tuple[str, int]]:
        """images: list of PIL RGB -> [(decoded text, generated token count)], same order."""
        torch = self.torch
        text = self.processor.apply_chat_template(messages(self.cfg, image=images[0]), add_generation_prompt=True,
                                                  tokenize=False)
        inputs = self.processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        torch.manual_seed(seed)  # the sampling is reproducible per (batch, seed)
        with torch.inference_mode():
            seqs = self.model.generate(**inputs, **self._gen_kwargs())
        new = seqs[:, inputs["input_ids"].shape[1]:]  # (B, T_new): decoder-only output repeats the prompt
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        pad = self.model.generation_config.pad_token_id
        counts = []
        for row in new.tolist():
            n = 0
            for t in row:
                if t in eos:
                    n += 1  # the EOS token was generated too
                    break
                if t == pad:
                    break
                n += 1
            counts.append(n)
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        return list(zip(texts, counts))
