"""Real-size figures of the `pixart-sigma` pipeline (issue 12 item 8), random weights.

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_size.py [--device auto|cpu|cuda]
      [--only score,vae,t5,train,sample,kv,dit] [--json out.json]

Models as in curation.real_size (ViT-L-14 + aesthetic MLP, SDXL VAE, T5 of T5-v1.1-XXL's width with
`--t5-layers` layers, PixArt-XL/2), each stage through its own code with the `pixart-sigma`
settings. Every ratio compares two measurements taken in this process.

GPU (the full run): the pipeline's batch sizes and precisions (score fp16 x 256, VAE bf16 x 32 at
256 and 1024 px, T5 bf16 x 128 rows with the full 24-layer XXL encoder, training bf16 autocast at
each stage's batch size, sampling bf16 at eval's settings: 1024 px, 20 DPM-Solver++ steps, cfg 4.5,
batch 16), plus:
  t5     ours vs the official tool restated (tools/extract_features.py: one caption at a time,
         padded to 300, fp16 T5 under a global lock, 20 threads, np.savez_compressed), goal >= 5x;
  kv     KV compression R=2 in layers 14-27 vs none on the real XL at the 4K grid (2880 px: 180x180
         tokens), inference and training step (fwd+bwd), goal <= -40 %;
  dit    our DiT vs diffusers' PixArtTransformer2DModel holding the same weights: train step
         (fwd + bwd + CAME), bf16 autocast, gradient checkpointing, 1024 px x 12.
CPU (reduced, printed as such): batches of 1-2 at 256 px, the 2-layer T5 in bf16 for both T5 sides
(a CPU runs fp16 matmuls several times slower, which would flatter the ratio), KV at a 32x32 grid
plus the analytic XL FLOP change at the 4K grid, DiT fwd+bwd without the optimizer (two XL models
and two CAME states do not fit beside the other engineers' jobs).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from curation import real_size as rs  # noqa: E402

# GPU: the pixart-sigma settings (score/features resources, training stages, eval sampling).
FULL = {"score_batch": 256, "vae_batch": 32, "vae_res": (256, 1024),
        "t5_samples": 512, "t5_layers": 24, "t5_threads": 20, "t5_rows": 128, "t5_official_fp16": True,
        "train": (("sigma-256-align", 256, 64), ("sigma-512", 512, 32), ("sigma-1024", 1024, 12),
                  ("sigma-1024-kv", 1024, 12)), "train_steps": 6,
        "sample": (1024, 20, 16), "kv_grid": 180, "kv_reps": 3, "kv_train": True,
        "dit": (1024, 12, True), "dit_steps": 5}
# CPU: the same code on small batches.
REDUCED = {"score_batch": 2, "vae_batch": 2, "vae_res": (256,),
           "t5_samples": 4, "t5_layers": 2, "t5_threads": 2, "t5_rows": 4, "t5_official_fp16": False,
           "train": (("sigma-1024-kv", 256, 2),), "train_steps": 2,
           "sample": (256, 2, 1), "kv_grid": 32, "kv_reps": 1, "kv_train": False,
           "dit": (256, 1, False), "dit_steps": 2}


def timed(fn, device) -> float:
    return timed2(fn, device)[0]


def timed2(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared CPU the CPU seconds are the steadier
    figure: other jobs' load stretches wall time far more than the work's own CPU time."""
    rs.sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    rs.sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


# --- stages ------------------------------------------------------------------------------------
def bench_score(cfg, work, p, dev) -> dict:
    photos = rs.photos()
    items = [photos[i % len(photos)] for i in range(p["score_batch"])]
    r = rs.run_score(cfg, rs.image_table(items), rs.write_aesthetic(work / "aesthetic.pth"), warmup=True)
    return {"images_per_s": r["images_per_s"], "batch": len(items), "dtype": r["dtype"],
            "peak_rss_mb": r["run"]["peak_rss_mb"]}


def bench_vae(cfg, work, p, dev) -> dict:
    from features.vae import VaeEncoder, prepare_batch

    vae_dir = rs.write_vae(work / "vae")
    fc, out = cfg.features, {}
    enc = VaeEncoder(vae=str(vae_dir), precision=fc.precision, num_gpus=fc.vae_resources.num_gpus)
    photos = [b for _, b in rs.photos()]
    for res in p["vae_res"]:
        rows = rs.feature_rows([photos[i % 2] for i in range(p["vae_batch"])], rs.captions(p["vae_batch"]), res)
        prepared = prepare_batch(pa.Table.from_pylist(rows))
        enc(prepared.slice(0, 1))  # warm-up
        with rs.Meter() as m:
            enc(prepared)
            rs.sync(enc.device)
        out[f"images_per_s_{res}"] = len(rows) / m.seconds
    out.update(batch=p["vae_batch"], dtype=str(enc.dtype).replace("torch.", ""))
    del enc
    rs.free()
    return out


def official_t5(tok, model, texts, max_length: int, threads: int, device) -> None:
    """tools/extract_features.py's T5 path restated: worker threads share a queue; each caption
    alone, padded to max_length, T5 forward under one global lock, then fp16 numpy + savez_compressed
    (into memory here; the official writes one file per caption)."""
    lock, q = threading.Lock(), queue.Queue()
    for t in texts:
        q.put(t)

    def worker():
        while True:
            try:
                t = q.get_nowait()
            except queue.Empty:
                return
            with torch.no_grad():
                with lock:
                    ct = tok([t], max_length=max_length, padding="max_length", truncation=True,
                             return_tensors="pt").to(device)
                    emb = model(ct.input_ids, attention_mask=ct.attention_mask)[0]
                np.savez_compressed(io.BytesIO(), caption_feature=emb.to(torch.float16).cpu().numpy(),
                                    attention_mask=ct.attention_mask.to(torch.int16).cpu().numpy())

    ths = [threading.Thread(target=worker) for _ in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()


def bench_t5(cfg, work, p, dev) -> dict:
    from transformers import AutoTokenizer, T5EncoderModel

    from features.t5 import T5Embedder

    fc = cfg.features
    t5_dir = rs.write_t5(work / "t5", work / "tok", layers=p["t5_layers"], device=dev)
    texts = rs.captions(p["t5_samples"])
    table = pa.Table.from_pylist([{"key": f"00000_{i:06d}", "text_long": lo, "text_short": sh}
                                  for i, (lo, sh) in enumerate(texts)])
    emb = T5Embedder(t5=str(t5_dir), max_length=fc.t5_max_length, precision=fc.precision,
                     num_gpus=fc.t5_resources.num_gpus, chunk=fc.t5_resources.batch_size,
                     text_dtype=fc.text_dtype, batch_tokens=fc.t5_batch_tokens)
    bs = p["t5_rows"]  # GPU: the pipeline's t5_resources.batch_size rows per Ray batch
    run = lambda: [emb(table.slice(s, bs)) for s in range(0, table.num_rows, bs)]  # noqa: E731
    run()  # warm-up at the real shapes
    t_ours = timed(run, dev)
    flat = [t for pair in texts for t in pair]
    n_tok = emb.token_counts(flat)
    dtype = emb.dtype
    del emb
    rs.free()
    off_dtype = torch.float16 if p["t5_official_fp16"] else dtype  # official: fp16 T5 (module docstring)
    tok = AutoTokenizer.from_pretrained(str(t5_dir))
    model = T5EncoderModel.from_pretrained(str(t5_dir), dtype=off_dtype).to(dev).eval()
    official_t5(tok, model, flat[:4], fc.t5_max_length, p["t5_threads"], dev)  # warm-up
    t_off = timed(lambda: official_t5(tok, model, flat, fc.t5_max_length, p["t5_threads"], dev), dev)
    del model
    rs.free()
    n = len(texts)
    return {"ours_samples_per_s": n / t_ours, "official_samples_per_s": n / t_off, "ratio": t_off / t_ours,
            "layers": p["t5_layers"], "rows_per_batch": bs, "dtype": str(dtype).replace("torch.", ""),
            "official_dtype": str(off_dtype).replace("torch.", ""), "mean_valid_tokens": float(np.mean(n_tok))}


def synthetic_shards(d: Path, res: int, n: int, dim: int = 4096, seed: int = 0) -> Path:
    """n samples of one square bucket at real dims (latent (8, res/8, res/8), T5 (n_tok, 4096)
    fp16 with the paper's 60/40 long/short lengths), written by the features shard writer."""
    from _sigma import shards

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h = res // 8
        lat = np.concatenate([rng.normal(size=(4, h, h)), rng.uniform(0.01, 0.1, (4, h, h))])  # mean, std
        nl, ns = int(np.clip(rng.normal(230, 40), 100, 300)), int(rng.integers(8, 46))
        meta = {"key": f"00000_{i:06d}", "bucket": "1.0", "height": res, "width": res, "n_long": nl, "n_short": ns,
                "caption_long": "long", "caption_short": "short", "upscaled": False}
        tl, ts = (rng.normal(size=(k, dim)).astype(np.float16) for k in (nl, ns))
        samples.append({"key": meta["key"], "meta": meta, "latent": shards.npy_bytes(lat.astype(np.float16)),
                        "t5_long": shards.encode_tokens(tl), "t5_short": shards.encode_tokens(ts)})
    side = shards.write_shard(d / shards.shard_name(0), samples, {})
    idx = shards.build_index(res, [side], {"name": "random", "scale_factor": 0.13025, "latent_channels": 4},
                             {"name": "random", "max_length": 300, "dim": dim})
    shards.write_index(d, idx)
    return d


def bench_train(cfg, work, p, dev) -> dict:
    import shutil

    out = {}
    for stage, res, bs in p["train"]:
        d = synthetic_shards(work / f"shards-{res}-{bs}", res, bs)
        tc = rs.train_config(d, work / f"train-{stage}", "keep", steps=p["train_steps"], batch_size=bs,
                             resolution=res, stage=stage)
        r = rs.run_train(tc)
        sps = [s["samples_per_s"] for s in r["steps"][1:]]  # step 1 holds the first-call costs
        out[f"{stage}@{res}x{bs}"] = {"images_per_s": statistics.median(sps), "peak_rss_mb": r["run"]["peak_rss_mb"],
                                       "kv": tc.model.kv_compress_ratio}
        shutil.rmtree(tc.output_dir, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
    return out


def bench_sample(cfg, work, p, dev) -> dict:
    from diffusers import AutoencoderKL

    from training.model import build_model, pe_settings
    from training.sample import decode_latents, sample_latents

    res, steps, b = p["sample"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model("PixArt-XL/2", kv_compress_ratio=2, **pe_settings(res)).to(dev, dtype).eval()
    g = torch.Generator().manual_seed(0)
    y, mask = torch.randn(b, 120, 4096, generator=g), torch.ones(b, 120, dtype=torch.bool)
    sample_latents(model, y[:1], mask[:1], None, res, res, 1, 4.5)  # warm-up
    lat = None

    def run():
        nonlocal lat
        lat = sample_latents(model, y, mask, None, res, res, steps, 4.5, "dpm", 0)

    t = timed(run, dev)
    del model
    rs.free()
    vae = AutoencoderKL.from_pretrained(str(rs.write_vae(work / "vae-dec")), torch_dtype=dtype).to(dev).eval()
    decode_latents(vae, lat[:1])
    t_dec = timed(lambda: decode_latents(vae, lat), dev)
    del vae
    rs.free()
    return {"images_per_s": b / t, "decode_images_per_s": b / t_dec, "res": res, "steps": steps, "batch": b,
            "dtype": str(dtype).replace("torch.", "")}


def bench_kv(cfg, work, p, dev) -> dict:
    from kv_compress_bench import xl_flops

    from training.model import build_model, pe_settings

    g = p["kv_grid"]
    res = g * 16
    x, t = torch.randn(1, 4, 2 * g, 2 * g, device=dev), torch.tensor([500], device=dev)
    y, mask = torch.randn(1, 120, 4096, device=dev), torch.ones(1, 120, dtype=torch.bool, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    models = {}
    for r in (1, 2):
        torch.manual_seed(0)
        models[r] = build_model("PixArt-XL/2", kv_compress_ratio=r, grad_checkpoint=True, caption_dropout=0.0,
                                **pe_settings(res)).to(dev)

    def infer(m):
        m.eval()
        with torch.no_grad(), amp:
            m(x, t, y, mask)

    def train_step(m):
        m.train()
        m.zero_grad(set_to_none=True)
        with amp:
            loss = m(x, t, y, mask).float().square().mean()
        loss.backward()
        m.zero_grad(set_to_none=True)

    kinds = {"infer": infer, "train": train_step} if p["kv_train"] else {"infer": infer}
    best = {(k, r): (float("inf"),) * 2 for k in kinds for r in models}  # (wall, cpu) seconds
    for k, fn in kinds.items():
        for r, m in models.items():
            fn(m)  # warm-up
        for _ in range(p["kv_reps"]):  # interleaved: load hits both alike
            for r, m in models.items():
                w, c = timed2(lambda: fn(m), dev)
                best[k, r] = (min(best[k, r][0], w), min(best[k, r][1], c))
    del models
    rs.free()
    out = {f"{k}_change": best[k, 2][0] / best[k, 1][0] - 1 for k in kinds}
    if dev == "cpu":
        out.update({f"{k}_change_cpu_s": best[k, 2][1] / best[k, 1][1] - 1 for k in kinds})
    out.update({f"{k}_s_R{r}": best[k, r][0] for (k, r) in best}, grid=g, tokens=g * g, reps=p["kv_reps"],
               xl_flops_change_at_grid=xl_flops(g * g, 2) / xl_flops(g * g, 1) - 1,
               xl_flops_change_at_4k=xl_flops(180 * 180, 2) / xl_flops(180 * 180, 1) - 1)
    return out


def bench_dit(cfg, work, p, dev) -> dict:
    from came_pytorch import CAME
    from train_bench import caption_lengths

    from training.convert import to_diffusers
    from training.diffusion import GaussianDiffusion
    from training.model import build_model, pe_settings
    from training.train import CAME_BETAS, CAME_EPS

    res, b, full = p["dit"]
    torch.manual_seed(0)
    ours = build_model("PixArt-XL/2", caption_dropout=0.0, grad_checkpoint=full, **pe_settings(res)).to(dev)
    theirs = to_diffusers(ours).to(dev)
    if full:
        theirs.enable_gradient_checkpointing()
    diff = GaussianDiffusion()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, res // 8, res // 8, generator=g).to(dev)
    y = torch.randn(b, 300, 4096, generator=g).to(dev)
    lens = [caption_lengths("mix", b, 300, g) for _ in range(p["dit_steps"] + 1)]
    fns = {"ours": ours, "diffusers": lambda xt, t, y, mask: theirs(
        xt, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask.long(), return_dict=False)[0]}
    mods = {"ours": ours, "diffusers": theirs}
    opts = {k: CAME(m.parameters(), lr=2e-5, eps=CAME_EPS, betas=CAME_BETAS, weight_decay=0.0)
            for k, m in mods.items()} if full else {}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)

    def step(k, i):
        mask = (torch.arange(300)[None] < lens[i][:, None]).to(dev)
        tt = torch.randint(0, 1000, (b,), generator=g).to(dev)
        noise = torch.randn(x.shape, generator=g).to(dev)
        mods[k].train()
        with amp:
            loss = diff.training_losses(fns[k], x, tt, model_kwargs={"y": y, "mask": mask}, noise=noise)["loss"].mean()
        loss.backward()
        if k in opts:
            opts[k].step()
        mods[k].zero_grad(set_to_none=True)

    times = {k: [] for k in mods}
    for k in mods:
        step(k, 0)  # warm-up
    for i in range(p["dit_steps"]):
        for k in mods:
            times[k].append(timed2(lambda: step(k, i + 1), dev))
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    del ours, theirs, opts, mods, fns
    rs.free()
    extra = {"ratio_cpu_s": cpu["ours"] / cpu["diffusers"]} if dev == "cpu" else {}
    return {"ours_s": med["ours"], "diffusers_s": med["diffusers"], "ratio": med["ours"] / med["diffusers"], **extra,
            "res": res, "batch": b, "optimizer": "CAME" if full else "none (fwd+bwd)", "grad_checkpoint": full}


BENCHES = {"score": bench_score, "vae": bench_vae, "t5": bench_t5, "train": bench_train, "sample": bench_sample,
           "kv": bench_kv, "dit": bench_dit}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma list of " + ", ".join(BENCHES))
    ap.add_argument("--t5-layers", type=int, default=None, help="T5 depth (default: 24 on GPU, 2 on CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of kv and dit (default 3/5 GPU, 1/2 CPU)")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args(argv)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    p = dict(FULL if dev == "cuda" else REDUCED)
    if args.t5_layers:
        p["t5_layers"] = args.t5_layers
    if args.reps:
        p.update(kv_reps=args.reps, dit_steps=args.reps)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    rs.lean_malloc()
    cfg = rs.pipeline_config()
    what = "GPU: full (pixart-sigma batch sizes)" if dev == "cuda" else "CPU: REDUCED (small batches, see docstring)"
    print(f"# {what}; torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.machine()}, "
          f"{torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}", flush=True)
    results = {"device": dev, "reduced": dev != "cuda", "params": {k: v for k, v in p.items()}}
    with tempfile.TemporaryDirectory(prefix="real_size_") as tmp:
        work = Path(tmp)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(rs.tokenizer_dir(work))).save_pretrained(work / "tok")
        for name in [s.strip() for s in args.only.split(",") if s.strip()]:
            t0, c0 = time.perf_counter(), time.process_time()
            r = BENCHES[name](cfg, work, p, dev)
            r.update(wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time() - c0, 1))
            results[name] = r
            print(f"{name:7s} " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
