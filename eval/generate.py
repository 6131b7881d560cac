"""`python -m eval.generate --config pipelines.yaml --pipeline NAME --checkpoint CKPT [--name RUN]`:
one image per benchmark prompt from a training checkpoint.

Protocol (paper / Sana): DPM-Solver++ 20 steps, cfg 4.5, one image per prompt, fixed seeds. Each
prompt is generated at its aspect bucket of `eval.resolution` (or square with eval.aspect: square).
The DiT keeps the position embedding of the size it was TRAINED at (recorded by our checkpoints and
diffusers folders; for an official .pth given by eval.weights_resolution + eval.weights_pe, never
eval.resolution); the PE used is part of the recorded protocol (`pe`).
Seeds: rows are ordered by (bucket, key) and row j gets seed gen_seed + j; training.sample gives
sample i of a call the noise of seed + i, so a batch of consecutive rows of one bucket is one call
and every image depends only on its own seed, never on the batch size or the worker.

Resumable: outputs are <output>/eval/generations/<run>/<key>.png, each one atomic commit through
_sigma.fs (local: temp + rename; object store: one PUT), so the output may be local or s3/gs;
existing ones are skipped, so a killed run rerun with the same command fills only the gaps and
never writes an image twice. The driver calls _sigma.faults.after_commit("eval_generate") each time
a batch's images are committed (the SIGKILL tests). A run folder records its protocol in
generation.json; generating into it with a different protocol, checkpoint or benchmark is refused.

Spread over Ray: a Ray Data actor pool (`Generator` loads the DiT, T5 and VAE once per actor) with
eval.resources (actors, batch_size, num_gpus); actors write the PNGs themselves (shared storage on a
cluster) and return one status row per prompt; a failing batch marks its rows failed with the reason.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from _sigma import faults, fs
from _sigma.holdout import EVAL_DIR
from eval.build_benchmark import current

FORMAT = "sigma-eval-generations/1"
META = "generation.json"


def run_dir(out: str, name: str) -> str:
    return fs.join(fs.normalize(out), EVAL_DIR, "generations", name)


def image_path(d: str, key: str) -> str:
    return fs.join(d, f"{key}.png")


def existing_keys(d: str) -> set[str]:
    """Keys whose image is committed in run folder `d` (one listing, also on object stores)."""
    return {n[:-4] for n in fs.listdir(d) if n.endswith(".png") and not n.startswith(".")}


def resolve_checkpoint(checkpoint: str) -> Path:
    """A stage output folder means its newest complete checkpoint: record that exact folder."""
    from training import latest_checkpoint

    p = Path(checkpoint).resolve()
    return Path(latest_checkpoint(p) or p) if p.is_dir() else p


def default_name(checkpoint: str, stage: str | None = None) -> str:
    """`<stage>-step-NNNNNNNN` for a training stage, else the checkpoint folder/file name."""
    c = resolve_checkpoint(checkpoint)
    return f"{stage}-{c.name}" if stage else c.stem


def weights_pe(checkpoint: str, ecfg) -> dict:
    """The PE the DiT of `checkpoint` is built with ({base_size, pe_interpolation, source}), read
    before any actor loads it; ConfigError when an official file's training size is not given or
    contradicts what the weights record."""
    from _sigma.config import ConfigError
    from training import dit_pe

    try:
        return dit_pe(checkpoint, ecfg.weights_resolution, ecfg.weights_pe)
    except ValueError as e:
        raise ConfigError(f"eval.weights_resolution: {e}") from None


def protocol(cfg, checkpoint: str) -> dict:
    """Everything that determines the generated pixels (stored in generation.json, checked on resume)."""
    e, f = cfg.eval, cfg.features
    ckpt = str(resolve_checkpoint(checkpoint))
    return {"checkpoint": ckpt, "sampler": e.sampler, "steps": e.steps,
            "cfg_scale": e.cfg_scale, "gen_seed": e.gen_seed, "resolution": e.resolution, "aspect": e.aspect,
            "t5": e.t5 or f.t5, "vae": e.vae or f.vae, "max_length": e.max_length or f.t5_max_length,
            "scale_factor": e.scale_factor or f.scale_factor, "precision": e.precision,
            "pe": weights_pe(ckpt, e)}


def plan(rows: list[dict], ecfg) -> list[dict]:
    """Rows with seed, height, width, in generation order (bucket, key)."""
    from _sigma.buckets import table

    sizes = table(ecfg.resolution)
    side = ecfg.resolution
    ordered = sorted(rows, key=lambda r: (float(r["bucket"]), r["key"]))
    out = []
    for j, r in enumerate(ordered):
        # bucket keys are the 1024 table's; the 2880 table has its own keys: take the nearest one
        key = r["bucket"] if r["bucket"] in sizes else min(sizes, key=lambda k: abs(float(k) - float(r["bucket"])))
        h, w = sizes[key] if ecfg.aspect == "bucket" else (side, side)
        out.append({"key": r["key"], "prompt": r["prompt"], "seed": ecfg.gen_seed + j, "height": h, "width": w})
    return out


def runs(rows: list[dict]) -> list[list[dict]]:
    """Split rows into maximal runs of one size with consecutive seeds (one sampler call each)."""
    groups: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: r["seed"]):
        g = groups[-1] if groups else None
        if g and g[-1]["seed"] + 1 == r["seed"] and (g[-1]["height"], g[-1]["width"]) == (r["height"], r["width"]):
            g.append(r)
        else:
            groups.append([r])
    return groups


def save_png(img: np.ndarray, uri: str) -> None:
    """uint8 (H, W, 3) -> PNG, one atomic commit (a reader never sees a half-written file)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    fs.write_bytes(uri, buf.getvalue())


class Generator:
    """Ray actor stage: batch {key, prompt, seed, height, width} -> {key, status, error, seconds}."""

    def __init__(self, checkpoint: str, t5: str, vae: str, out_dir: str, sampler: str, steps: int,
                 cfg_scale: float, max_length: int, scale_factor: float, precision: str = "auto",
                 num_gpus: float = 0.0, image_size: int | None = None, pe_version: str = "sigma"):
        import torch

        from _sigma.device import pick_device_dtype
        from _sigma.models import load_t5, load_vae
        from training import encode_null, load_dit

        self.device, self.dtype = pick_device_dtype(precision, num_gpus)
        self.tok, self.t5 = load_t5(t5, self.device, self.dtype)
        # null caption = T5("") of this T5 (official load_checkpoint rule); image_size / pe_version =
        # the size a .pth that does not record its PE was TRAINED at (eval.weights_resolution)
        self.model = load_dit(checkpoint, device=self.device, image_size=image_size, version=pe_version,
                              null=encode_null(self.tok, self.t5, max_length)).to(self.dtype)
        self.vae = load_vae(vae, self.device, self.dtype)
        self.out_dir = out_dir
        self.sampler, self.steps, self.cfg_scale = sampler, steps, cfg_scale
        self.max_length, self.scale_factor = max_length, scale_factor

    def generate(self, group: list[dict]) -> np.ndarray:
        """One run of consecutive seeds and one size -> uint8 (B, H, W, 3)."""
        import torch

        from training import decode_latents, encode_prompts, sample_latents

        # Local inference mode, not a global switch: the stage also runs in-process (tests, --no-ray).
        with torch.inference_mode():
            y, mask = encode_prompts(self.tok, self.t5, [r["prompt"] for r in group], self.max_length)
            lat = sample_latents(self.model, y, mask, None, group[0]["height"], group[0]["width"],
                                 steps=self.steps, cfg=self.cfg_scale, sampler=self.sampler, seed=int(group[0]["seed"]))
            return decode_latents(self.vae, lat, self.scale_factor)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        status = {r["key"]: ("skipped", None, 0.0) for r in rows}
        have = existing_keys(self.out_dir)
        todo = [r for r in rows if r["key"] not in have]
        for group in runs(todo):
            t0 = time.time()
            try:
                imgs = self.generate(group)
                dt = (time.time() - t0) / len(group)
                for r, img in zip(group, imgs):
                    save_png(img, image_path(self.out_dir, r["key"]))
                    status[r["key"]] = ("ok", None, dt)
            except Exception as e:  # noqa: BLE001 - a failing batch is recorded per row, never fatal
                for r in group:
                    status[r["key"]] = ("failed", f"{type(e).__name__}: {str(e)[:300]}", 0.0)
        keys = [r["key"] for r in rows]
        return pa.table({"key": keys, "status": [status[k][0] for k in keys],
                         "error": pa.array([status[k][1] for k in keys], pa.string()),
                         "seconds": [float(status[k][2]) for k in keys]})


def _check_meta(d: str, meta: dict) -> None:
    uri = fs.join(d, META)
    if fs.isfile(uri):
        old = fs.read_json(uri)
        diff = {k: (old.get("protocol", {}).get(k), v) for k, v in meta["protocol"].items()
                if old.get("protocol", {}).get(k) != v}
        if old.get("benchmark_checksum") != meta["benchmark_checksum"]:
            diff["benchmark_checksum"] = (old.get("benchmark_checksum"), meta["benchmark_checksum"])
        if diff:
            raise RuntimeError(f"{d} holds images of another protocol ({diff}); use another --name")
    fs.write_json(uri, meta, sort_keys=True)


def generate(cfg, checkpoint: str, name: str | None = None, use_ray: bool = True, limit: int | None = None,
             progress: bool = True) -> dict:
    """Generate the missing images of run `name` (default: the checkpoint folder's name)."""
    from tqdm import tqdm

    out, ecfg = cfg.out, cfg.eval
    version, rows, info = current(cfg)
    name = name or default_name(checkpoint)
    d = run_dir(out, name)
    proto = protocol(cfg, checkpoint)
    checkpoint = proto["checkpoint"]  # the exact folder, even if training writes a newer one meanwhile
    _check_meta(d, {"format": FORMAT, "run": name, "benchmark_version": version,
                    "benchmark_checksum": info["checksum"], "n": info["n"], "protocol": proto})
    full = plan(rows, ecfg)
    planned = full[:limit] if limit else full
    have = existing_keys(d)
    todo = [r for r in planned if r["key"] not in have]
    summary = {"run": name, "dir": d, "benchmark_version": version, "planned": len(planned),
               "existing": len(planned) - len(todo), "ok": 0, "failed": 0, "failures": [], "seconds": 0.0}
    t0 = time.time()
    kwargs = dict(checkpoint=checkpoint, t5=proto["t5"], vae=proto["vae"], out_dir=d, sampler=ecfg.sampler,
                  steps=ecfg.steps, cfg_scale=ecfg.cfg_scale, max_length=proto["max_length"],
                  scale_factor=proto["scale_factor"], precision=ecfg.precision, num_gpus=ecfg.resources.num_gpus,
                  image_size=ecfg.weights_resolution, pe_version=ecfg.weights_pe)
    if todo:
        bar = tqdm(total=len(todo), desc=f"generate {name}", unit="img", disable=not progress, mininterval=1.0)
        if use_ray:
            import ray

            from _sigma.raystage import init_ray, map_stage

            init_ray(cfg.ray)
            # One block per batch keeps each batch a run of consecutive seeds (one sampler call).
            ds = ray.data.from_arrow(pa.Table.from_pylist(todo)).repartition(
                max(1, -(-len(todo) // ecfg.resources.batch_size)))
            results = map_stage(ds, Generator, ecfg.resources, constructor_kwargs=kwargs).iter_batches(
                batch_format="pyarrow", batch_size=None)
        else:
            gen = Generator(**kwargs)
            bs = ecfg.resources.batch_size
            results = (gen(pa.Table.from_pylist(todo[i:i + bs])) for i in range(0, len(todo), bs))
        for res in results:
            for r in res.to_pylist():
                if r["status"] == "failed":
                    summary["failed"] += 1
                    summary["failures"].append({"key": r["key"], "error": r["error"]})
                elif r["status"] == "ok":
                    summary["ok"] += 1
            bar.update(res.num_rows)
            faults.after_commit("eval_generate")  # this batch's images are committed
        bar.close()
    summary["seconds"] = round(time.time() - t0, 2)
    have = existing_keys(d)
    summary["complete"] = all(r["key"] in have for r in full)  # the whole benchmark
    fs.write_json(fs.join(d, "generate_summary.json"), summary)
    return summary


def main(argv=None) -> dict:
    from curation.config import pipeline_from_args
    from eval.cli import generate_parser

    args = generate_parser().parse_args(argv)
    cfg = pipeline_from_args(args)
    checkpoint, name = args.checkpoint, args.name
    if args.stage:
        from training import load_stage

        checkpoint = str(load_stage(args.config, args.stage).output_dir)
        name = name or default_name(checkpoint, args.stage)
    s = generate(cfg, checkpoint, name, use_ray=not args.no_ray, limit=args.limit)
    print(f"[eval.generate] {s['run']}: {s['ok']} written, {s['existing']} existing, {s['failed']} failed "
          f"of {s['planned']} ({s['seconds']} s) -> {s['dir']}", flush=True)
    for f in s["failures"][:5]:
        print(f"  failed {f['key']}: {f['error']}", flush=True)
    return s


if __name__ == "__main__":  # = sigma-eval-...: checks first, library logs to <output>/logs
    from eval import cli

    raise SystemExit(cli.generate())
