"""Cost of the score stage's filter columns (issue 24): images/s of curation.score.Scorer (decode,
CLIP, aesthetic + the filters; the stage's whole per-batch work) with and without them.

Configurations, measured in the same process, interleaved round by round (so machine load hits
each alike), on the demo's JPEGs (real photos + generated images, captions included):
  base         CLIP embedding + aesthetic (the stage before issue 24)
  nsfw+sim     + the NSFW head and the image-alt text similarity (text tower): must cost < 10 %
  watermark    + the watermark CNN only (timm EfficientNet at 256 x 256; reported separately)
  wm-decode    base, but JPEGs decoded at the watermark's draft size (>= 512 px instead of >= 2x the
               CLIP input): the part of the watermark's cost that is decoding, not the CNN
  all          every filter on
Reports the median images/s over the rounds and, per configuration, the median over rounds of
its rate / base's rate in the same round (paired: robust to load that changes between rounds). Default models: the tiny
twins (models/tiny, `make models`); --real-size uses ViT-L-14 + efficientnet_b3 with random
weights (same layers as the released models: cost, not scores).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/score_filters_bench.py [--rounds 7] [--batch 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402


def batch_of(n: int) -> pa.Table:
    from curation import demo_data as dd

    items = dd.demo_items()
    items = (items * (n // len(items) + 1))[:n]
    return pa.table({"_part": [0] * n, "key": [f"k{i}" for i in range(n)], "image": [it.body for it in items],
                     "caption": [it.caption for it in items]})


def tiny_kwargs(tiny: Path) -> tuple[dict, dict]:
    base = dict(clip_model=str(tiny / "clip" / "model_config.json"),
                clip_pretrained=str(tiny / "clip" / "open_clip_model.safetensors"),
                aesthetic_weights=str(tiny / "aesthetic.pth"), max_pixels=10**9, precision="fp32")
    return base, dict(nsfw_weights=str(tiny / "nsfw.zip"), watermark_weights=str(tiny / "watermark.pt"),
                      watermark_arch="test_efficientnet")


def real_size_kwargs(tmp: Path) -> tuple[dict, dict]:
    """ViT-L-14 / efficientnet_b3 with random weights in the released file formats."""
    import numpy as np

    from curation import watermark as wm
    from curation.filters_tiny_modeling import _keras_config
    from curation.keras_weights import write_model
    from curation.score import AestheticMLP

    torch.save(AestheticMLP(768).state_dict(), tmp / "aes.pth")
    torch.save(wm.build("efficientnet_b3").state_dict(), tmp / "wm.pt")
    rng = np.random.default_rng(0)
    t = {"layer_with_weights-1/mean/.ATTRIBUTES/VARIABLE_VALUE": np.zeros(768, np.float32),
         "layer_with_weights-1/variance/.ATTRIBUTES/VARIABLE_VALUE": np.ones(768, np.float32)}
    width = 768
    for k, units in enumerate((64, 512, 256, 1)):
        t[f"layer_with_weights-{k + 2}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = rng.normal(0, 0.05, (width, units)).astype(np.float32)
        t[f"layer_with_weights-{k + 2}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros(units, np.float32)
        width = units
    tables = [(np.array([b"0.000000"], dtype=object), np.array([1]))] * 5
    write_model(tmp / "nsfw.zip", _keras_config(768, (180, 316, 413, 440, 644)), t, tables)
    base = dict(clip_model="ViT-L-14", clip_pretrained=None, aesthetic_weights=str(tmp / "aes.pth"),
                max_pixels=10**9, precision="fp32")
    return base, dict(nsfw_weights=str(tmp / "nsfw.zip"), watermark_weights=str(tmp / "wm.pt"),
                      watermark_arch="efficientnet_b3")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32, help="images per Scorer call (pipelines.yaml: 8 demo, 256 GPU)")
    ap.add_argument("--calls", type=int, default=2, help="Scorer calls per configuration per round")
    ap.add_argument("--tiny", default="models/tiny")
    ap.add_argument("--real-size", action="store_true", help="ViT-L-14 + efficientnet_b3, random weights")
    args = ap.parse_args(argv)
    from curation.score import Scorer

    tmp = Path(tempfile.mkdtemp(prefix="score-filters-bench-"))
    base, filt = real_size_kwargs(tmp) if args.real_size else tiny_kwargs(Path(args.tiny))
    configs = {"base": {}, "nsfw+sim": {"nsfw_weights": filt["nsfw_weights"], "clip_similarity": True},
               "watermark": {k: filt[k] for k in ("watermark_weights", "watermark_arch")},
               "wm-decode": {"draft_only": True},
               "all": {**filt, "clip_similarity": True}}
    # One Scorer with every filter loaded; each configuration switches filters off the way the
    # constructor leaves them when not configured (same CLIP weights in memory for all: a ViT-L/14
    # per configuration would not fit beside the other engineers' jobs).
    full = Scorer(**base, **filt, clip_similarity=True)
    parts = {"nsfw": full.nsfw, "watermark": full.watermark}
    side = full.draft[0] // 2

    def configure(name: str) -> Scorer:
        kw = configs[name]
        full.nsfw = parts["nsfw"] if "nsfw_weights" in kw else None
        full.watermark = parts["watermark"] if "watermark_weights" in kw else None
        full.similarity = bool(kw.get("clip_similarity"))
        clip_side = getattr(full.model.visual, "image_size", 224)
        clip_side = clip_side[0] if isinstance(clip_side, (tuple, list)) else clip_side
        s = max(clip_side, side) if (full.watermark is not None or kw.get("draft_only")) else clip_side
        full.draft = (2 * s, 2 * s)
        return full

    batch = batch_of(args.batch)
    for name in configs:  # warm-up: first-call allocations, lazy inits
        configure(name)(batch)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(configs)[::-1]  # interleaved, alternating order
        for name in order:
            t0 = time.perf_counter()
            scorer = configure(name)
            for _ in range(args.calls):
                out = scorer(batch)
            rates[name].append(args.calls * batch.num_rows / (time.perf_counter() - t0))
        assert out.num_rows == batch.num_rows
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"# score stage (curation.score.Scorer) with / without the filter columns; "
          f"{'ViT-L-14 + efficientnet_b3 (random weights)' if args.real_size else 'tiny twins'}; "
          f"batch {args.batch}, {args.rounds} interleaved rounds x {args.calls} calls; torch threads "
          f"{torch.get_num_threads()}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    paired = {k: statistics.median(r / b for r, b in zip(rates[k], rates["base"])) for k in configs}
    print(f"{'config':<10} {'images/s (median)':>18} {'min':>8} {'max':>8} {'ratio (paired)':>15} {'time cost':>10}")
    for k in configs:
        print(f"{k:<10} {med[k]:>18.1f} {min(rates[k]):>8.1f} {max(rates[k]):>8.1f} {paired[k]:>15.3f} "
              f"{(1 / paired[k] - 1) * 100:>+9.1f}%")
    print(f"ratio nsfw+sim / base = {paired['nsfw+sim']:.3f} (target >= 0.909, i.e. cost < 10 %)")
    print(f"ratio watermark / base = {paired['watermark']:.3f} (reported separately; wm-decode / base = "
          f"{paired['wm-decode']:.3f} of it is the larger JPEG decode)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
