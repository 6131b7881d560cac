"""`python -m eval.table3 --config pipelines.yaml --pipeline NAME --stage A --stage B ...`:
PixArt-Sigma's Table 3 (the KV-compression ablation) for a list of checkpoints, in one command.

Columns, per checkpoint (the KV-compression layers / operator / ratio are read from the model):
- FID, CMMD, CLIP-Score with their intervals, on the SAME benchmark prompts (the pipeline's eval
  benchmark): images are generated with eval.generate (resumable; existing images are reused) and
  scored with eval.score (a current score of the run is reused unless --rescore);
- train latency: seconds per training iteration (forward + backward of the DiT on random latents /
  T5 features of the stated batch and resolution, loss, AdamW step; the VAE and T5 are not in the
  loop, as in training from precomputed features);
- test latency: seconds per image (batch 1, DPM-Solver++ / IDDPM at the stated steps and cfg, DiT
  sampling + VAE decode; the prompt is T5-encoded once outside the clock, as every checkpoint
  shares the T5).
Latencies are measured in ONE process, interleaved: each round visits every checkpoint (the order
rotates per round, so drift of a shared or thermally throttled machine is spread over all of them),
`--warmup` rounds are discarded, the median over `--repeats` rounds is reported with the range.
The device (GPU name or CPU model, threads) labels the table: latencies are comparable only
within one table. Output: <output>/eval/table3/<name>.md, .csv, .json (atomic writes, _sigma.fs).
"""
from __future__ import annotations

import csv
import io
import platform
import time
from datetime import datetime, timezone

import numpy as np

from _sigma import fs
from _sigma.device import pick_device
from _sigma.holdout import EVAL_DIR

FORMAT = "sigma-eval-table3/1"


def table_dir(out: str) -> str:
    return fs.join(fs.normalize(out), EVAL_DIR, "table3")


def device_label(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def kv_columns(model) -> dict:
    """Table 3's ablation axes from the model config: compressed layers, operator, ratio."""
    c = model.config
    layers = list(c.kv_layers)
    if not layers:
        return {"kv_layers": "none", "kv_operator": "-", "kv_ratio": 1}
    span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))
    return {"kv_layers": f"{span} of {c.depth}", "kv_operator": c.kv_compress_mode, "kv_ratio": c.kv_compress_ratio}


class LatencyBench:
    """Loads T5 / VAE once; per checkpoint a DiT kept on the CPU between visits (one on the device at a time)."""

    def __init__(self, cfg, device: str, train_batch: int, train_res: int, test_res: int, test_steps: int,
                 grad_checkpoint: bool = False):
        import torch

        from _sigma.device import DTYPES, resolve_precision
        from _sigma.models import load_t5, load_vae
        from training import encode_null, encode_prompts

        e, f = cfg.eval, cfg.features
        self.device = device
        self.dtype = DTYPES[resolve_precision(e.precision, device, "bf16")]
        self.max_length = e.max_length or f.t5_max_length
        self.scale_factor = e.scale_factor or f.scale_factor
        self.tok, self.t5 = load_t5(e.t5 or f.t5, device, self.dtype)
        self.vae = load_vae(e.vae or f.vae, device, self.dtype)
        self.null = encode_null(self.tok, self.t5, self.max_length)
        with torch.inference_mode():
            y, mask = encode_prompts(self.tok, self.t5, ["a photograph of a red fox in the snow"], self.max_length)
        self.y, self.mask = y.clone(), mask.clone()
        del self.t5  # only its outputs are needed: free the (XXL: ~10 GB) encoder before timing
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        self.train_batch, self.train_res, self.test_res, self.test_steps = train_batch, train_res, test_res, test_steps
        self.cfg_scale, self.sampler = e.cfg_scale, e.sampler
        self.grad_checkpoint = grad_checkpoint
        self.models: dict[str, object] = {}

    def load(self, label: str, checkpoint: str):
        from training import load_dit

        over = {"grad_checkpoint": True} if self.grad_checkpoint else {}
        self.models[label] = load_dit(checkpoint, device="cpu", image_size=self.test_res, null=self.null, **over)
        return self.models[label]

    def _sync(self):
        import torch

        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(torch.device(self.device))

    def train_iteration(self, label: str) -> float:
        """Seconds of one timed training iteration (after one untimed one that allocates optimiser state)."""
        import torch
        import torch.nn.functional as F

        model = self.models[label].to(self.device).float().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        try:
            c = model.config
            side = self.train_res // 8
            g = torch.Generator().manual_seed(0)
            x0 = torch.randn(self.train_batch, c.in_channels, side, side, generator=g).to(self.device)
            y = torch.randn(self.train_batch, self.max_length, c.caption_channels, generator=g).to(self.device)
            mask = torch.ones(self.train_batch, self.max_length, dtype=torch.bool, device=self.device)
            t = torch.randint(0, 1000, (self.train_batch,), generator=g).to(self.device)
            noise = torch.randn_like(x0)
            amp = str(self.device).startswith("cuda") and self.dtype != torch.float32

            def step():
                with torch.autocast("cuda", dtype=self.dtype, enabled=amp):
                    out = model(0.7 * x0 + 0.7 * noise, t, y, mask)  # (B, Cout, h, w)
                    loss = F.mse_loss(out[:, :c.in_channels].float(), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()
            self._sync()
            t0 = time.perf_counter()
            step()
            self._sync()
            return time.perf_counter() - t0
        finally:
            self.models[label] = model.to("cpu").eval()
            del opt
            if str(self.device).startswith("cuda"):
                torch.cuda.empty_cache()

    def test_image(self, label: str) -> float:
        """Seconds to sample + decode one image at test_res with test_steps steps."""
        import torch

        from training import decode_latents, sample_latents

        model = self.models[label].to(self.device, self.dtype).eval()
        try:
            with torch.inference_mode():
                self._sync()
                t0 = time.perf_counter()
                lat = sample_latents(model, self.y, self.mask, None, self.test_res, self.test_res,
                                     steps=self.test_steps, cfg=self.cfg_scale, sampler=self.sampler, seed=0)
                decode_latents(self.vae, lat, self.scale_factor)
                self._sync()
                return time.perf_counter() - t0
        finally:
            self.models[label] = model.to("cpu", torch.float32)


def measure(bench: LatencyBench, labels: list[str], repeats: int, warmup: int, progress: bool = True) -> dict:
    """{label: {train: [s ...], test: [s ...]}} over interleaved rounds (warmup rounds dropped)."""
    times = {k: {"train": [], "test": []} for k in labels}
    for r in range(warmup + repeats):
        order = labels[r % len(labels):] + labels[:r % len(labels)]  # rotate: no checkpoint always first
        for k in order:
            tr, te = bench.train_iteration(k), bench.test_image(k)
            if r >= warmup:
                times[k]["train"].append(tr)
                times[k]["test"].append(te)
        if progress:
            print(f"[eval.table3] latency round {r + 1}/{warmup + repeats}"
                  f"{' (warm-up, discarded)' if r < warmup else ''}", flush=True)
    return times


def _stat(v: list[float]) -> dict:
    a = np.asarray(v, np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()), "n": int(len(a))} if len(a) else {}


def _current_score(out: str, run: str, cfg) -> dict | None:
    """The run's score JSON when it is still current: same benchmark, generation checkpoint, image count,
    FID protocol / extractor and CMMD model as a new score would use."""
    from eval import cmmd, fid
    from eval.generate import META, existing_keys, run_dir
    from eval.score import scores_dir

    uri = fs.join(scores_dir(out), f"{run}.json")
    if not fs.isfile(uri):
        return None
    s = fs.read_json(uri)
    p, d = s.get("protocol", {}), run_dir(out, run)
    gen = fs.read_json(fs.join(d, META)) if fs.isfile(fs.join(d, META)) else {}
    ext = fid.extractor_info(cfg.eval)
    want = {"benchmark_checksum": gen.get("benchmark_checksum"), "fid_protocol": cfg.eval.fid_protocol,
            "fid_extractor_sha256": ext["sha256"], "cmmd_model": cmmd.model_of(cfg)[0]}
    if any(p.get(k) != v for k, v in want.items()) or s.get("cmmd") is None:
        return None
    if p.get("generation", {}).get("checkpoint") != gen.get("protocol", {}).get("checkpoint"):
        return None
    return s if s.get("n_scored") == len(existing_keys(d)) else None


def quality(cfg, label: str, checkpoint: str, run: str, device: str, scorers: dict, rescore: bool,
            progress: bool) -> dict:
    from eval.generate import generate
    from eval.score import score_run

    g = generate(cfg, checkpoint, run, use_ray=True, progress=progress)
    s = None if rescore else _current_score(cfg.out, run, cfg)
    reused = s is not None
    if s is None:
        s = score_run(cfg, run, device, progress=progress, **scorers)
    return {"run": run, "generated_now": g["ok"], "failed": g["failed"], "reused_score": reused, "score": s}


def render(doc: dict) -> tuple[str, str]:
    """(markdown, csv) of a Table 3 document."""
    p = doc["protocol"]
    head = ["checkpoint", "KV layers", "operator", "ratio", "FID ↓", "CMMD ↓", "CLIP-Score ↑",
            f"train latency (s/iter, batch {p['train_batch']} @ {p['train_resolution']} px)",
            f"test latency (s/img @ {p['test_resolution']} px, {p['test_steps']} steps)"]
    md = [f"# Table 3 ({doc['name']}): KV-compression ablation", "",
          f"Benchmark `{p['benchmark_version']}` ({p['n_prompts']} prompts, the same for every row), FID protocol "
          f"`{p['fid_protocol']}` (extractor `{p['fid_extractor']}`), CMMD model `{p['cmmd_model']}`, CLIP-Score model "
          f"`{p['clip_model']}`; images: sampler `{p['sampler']}`, {p['steps']} steps, cfg {p['cfg_scale']}, "
          f"resolution {p['resolution']}. Intervals {int(100 * p['ci'])} % ({p['ci_methods']['fid']} for FID / CMMD).",
          f"Latency: **{doc['device']}**, measured in one process, interleaved over {p['repeats']} rounds after "
          f"{p['warmup']} warm-up round(s) (median, [min, max]); comparable only within this table.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for r in doc["rows"]:
        s = r.get("score") or {}

        def ci(v, c, spec=".3f"):
            return "n/a" if v is None else f"{v:{spec}}" + (f" [{c[0]:{spec}}, {c[1]:{spec}}]" if c else "")

        lt, le = r.get("train") or {}, r.get("test") or {}
        lat = lambda x: "n/a" if not x else f"{x['median']:.4g} [{x['min']:.4g}, {x['max']:.4g}]"  # noqa: E731
        md.append(f"| {r['label']} | {r['kv_layers']} | {r['kv_operator']} | {r['kv_ratio']} | "
                  f"{ci(s.get('fid'), s.get('fid_ci'))} | {ci(s.get('cmmd'), s.get('cmmd_ci'), '.4f')} | "
                  f"{ci(s.get('clip_score'), s.get('clip_score_ci'))} | {lat(lt)} | {lat(le)} |")
        rows.append({"label": r["label"], "checkpoint": r["checkpoint"], "run": r.get("run"),
                     "kv_layers": r["kv_layers"], "kv_operator": r["kv_operator"], "kv_ratio": r["kv_ratio"],
                     "fid": s.get("fid"), "fid_lo": (s.get("fid_ci") or [None, None])[0],
                     "fid_hi": (s.get("fid_ci") or [None, None])[1], "cmmd": s.get("cmmd"),
                     "cmmd_lo": (s.get("cmmd_ci") or [None, None])[0], "cmmd_hi": (s.get("cmmd_ci") or [None, None])[1],
                     "clip_score": s.get("clip_score"), "clip_score_lo": (s.get("clip_score_ci") or [None, None])[0],
                     "clip_score_hi": (s.get("clip_score_ci") or [None, None])[1],
                     "n_images": s.get("n_scored"), "comparable": s.get("comparable"),
                     "train_s_per_iter": lt.get("median"), "train_batch": p["train_batch"],
                     "train_resolution": p["train_resolution"], "test_s_per_image": le.get("median"),
                     "test_resolution": p["test_resolution"], "test_steps": p["test_steps"], "device": doc["device"]})
    if any(not (r.get("score") or {}).get("comparable", True) for r in doc["rows"]):
        md += ["", "Rows whose images do not cover every prompt are not comparable (see eval/report.md)."]
    if p["fid_extractor"].startswith("tiny"):
        md += ["", "> Tiny random-weight models (demo): the numbers check the plumbing, they mean nothing."]
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def build_table(cfg, checkpoints: list[tuple[str, str, str]], name: str = "table3", device: str = "cpu",
                train_batch: int = 384, train_res: int | None = None, test_res: int | None = None,
                test_steps: int | None = None, repeats: int = 3, warmup: int = 1, grad_checkpoint: bool = False,
                latency: bool = True, rescore: bool = False, progress: bool = True) -> dict:
    """checkpoints: [(label, checkpoint path, generation run name)]. Writes md / csv / json; the document."""
    from eval import cmmd, fid, metrics
    from eval.build_benchmark import current
    from eval.clipscore import ClipScorer
    from eval.rewards import load_rewards

    e = cfg.eval
    train_res, test_res, test_steps = train_res or e.resolution, test_res or e.resolution, test_steps or e.steps
    version, rows, info = current(cfg)
    clip = ClipScorer(cfg.score.clip_model, cfg.score.clip_pretrained, device)
    scorers = {"clip": clip, "rewards": load_rewards(e.rewards, device), "extractor": fid.make_extractor(e, device),
               "embedder": cmmd.make_embedder(cfg, device, clip)}
    out_rows = [dict(label=lab, checkpoint=ck, **quality(cfg, lab, ck, run, device, scorers, rescore, progress))
                for lab, ck, run in checkpoints]
    if not all(r["reused_score"] for r in out_rows):
        from eval.report import write_report

        write_report(cfg.out)  # new scores: the report compares every scored run again
    bench = LatencyBench(cfg, device, train_batch, train_res, test_res, test_steps, grad_checkpoint)
    for r in out_rows:
        from eval.generate import resolve_checkpoint

        r.update(kv_columns(bench.load(r["label"], str(resolve_checkpoint(r["checkpoint"])))))
    if latency:
        times = measure(bench, [r["label"] for r in out_rows], repeats, warmup, progress)
        for r in out_rows:
            r["train"], r["test"] = _stat(times[r["label"]]["train"]), _stat(times[r["label"]]["test"])
            r["train_times"], r["test_times"] = times[r["label"]]["train"], times[r["label"]]["test"]
    ext = fid.extractor_info(e)
    doc = {"format": FORMAT, "name": name, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": device_label(device), "rows": out_rows,
           "protocol": {"benchmark_version": version, "benchmark_checksum": info["checksum"], "n_prompts": len(rows),
                        "fid_protocol": e.fid_protocol, "fid_extractor": ext["extractor"],
                        "cmmd_model": " / ".join(str(x) for x in cmmd.model_of(cfg)), "clip_model": cfg.score.clip_model,
                        "sampler": e.sampler, "steps": e.steps, "cfg_scale": e.cfg_scale, "resolution": e.resolution,
                        "ci": e.ci, "ci_methods": metrics.CI_METHODS, "train_batch": train_batch,
                        "train_resolution": train_res, "test_resolution": test_res, "test_steps": test_steps,
                        "repeats": repeats if latency else 0, "warmup": warmup, "grad_checkpoint": grad_checkpoint,
                        "train_iteration": "DiT forward + backward + AdamW step on random latents / T5 features "
                                           "(VAE and T5 outside the loop), autocast to the eval precision on CUDA",
                        "test_image": "batch 1: T5 outside the clock; DiT sampling (with cfg) + VAE decode"}}
    d = table_dir(cfg.out)
    md, csv_text = render(doc)
    fs.write_text(fs.join(d, f"{name}.md"), md)
    fs.write_text(fs.join(d, f"{name}.csv"), csv_text)
    fs.write_json(fs.join(d, f"{name}.json"), doc)
    return doc


def parse_checkpoints(args) -> list[tuple[str, str, str]]:
    """--checkpoint LABEL=PATH and --stage STAGE (its latest checkpoint; run name = the stage name)."""
    from _sigma.config import ConfigError

    items = []
    for spec in args.checkpoints:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--checkpoint {spec}: expected LABEL=PATH")
        items.append((label, path, label))
    for stage in args.stage:
        from training import load_stage

        items.append((stage, str(load_stage(args.config, stage).output_dir), stage))
    labels = [i[0] for i in items]
    if not items or len(set(labels)) != len(labels):
        raise ConfigError("give at least one --checkpoint LABEL=PATH / --stage STAGE, with distinct labels")
    return items


def main(argv=None) -> dict:
    from _sigma.config import ConfigError
    from curation.config import pipeline_from_args
    from eval.cli import table3_parser

    args = table3_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.train_batch < 1:
        raise ConfigError("--repeats >= 1, --warmup >= 0 and --train-batch >= 1 required")
    items = parse_checkpoints(args)  # before anything is written under the output
    cfg = pipeline_from_args(args)
    device = args.device or pick_device()
    doc = build_table(cfg, items, args.name, device, args.train_batch, args.train_resolution,
                      args.test_resolution, args.test_steps, args.repeats, args.warmup, args.grad_checkpoint,
                      latency=not args.no_latency, rescore=args.rescore)
    md, _ = render(doc)
    print(md, flush=True)
    print(f"[eval.table3] wrote {table_dir(cfg.out)}/{args.name}.md|.csv|.json", flush=True)
    return doc


if __name__ == "__main__":
    main()
