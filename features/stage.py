"""The features stage: `run_features(cfg, out, progress)` (called by curation.run).

Driver coordinates, workers write (_sigma.partstage):
0. refuse to start (StaleHoldoutError) when a benchmark's hold-out list does not cover the current
   manifest parts (_sigma.holdout.check_current: parts added or rewritten after eval_split searched);
1. plan: one task per manifest part (`features.plan.plan_part`) cuts the part's rows into shards
   per target resolution and checks which of them are already on disk (sidecar matches the plan,
   tar verified by size and sha256); the driver gets a few numbers per shard, never rows;
2. compute the missing shards on Ray Data: read (per part, the plan recomputed on the worker) ->
   T5Embedder (actors) -> prepare_batch (decode, bucket, resize/crop, one row per target
   resolution; tasks) -> VaeEncoder (actors);
3. commit: one commit task per shard writes its tar (atomic) and then its sidecar (the done marker);
4. index.json per resolution, last, by the driver from the per-shard summaries.

T5 runs once per row whatever the number of resolutions. A killed run rerun with the same command
recomputes only shards that are missing, stale or fail verification; leftovers (temp files,
shards outside the plan) are removed and the index is deleted before any shard of its resolution
is rewritten, so index and shards always agree.
"""
from __future__ import annotations

import json
import time
from collections import Counter

from _sigma import fs, holdout, manifest
from _sigma.config import ConfigError, Resources, fingerprint
from _sigma.partstage import commit_groups, nodes_of, read_images, run_tasks
from _sigma import shards
from features import plan

PIPELINE_VERSION = "features/1"  # bump when preprocessing or the stored layout changes


def _model_info(fc) -> tuple[int, int]:
    """(T5 d_model, VAE latent channels) from the model configs only (no weights)."""
    from transformers import AutoConfig

    from _sigma.fetch import is_uri, read_config

    # a URI's config.json is read directly: the driver needs no copy of the weights
    dim = int(read_config(fc.t5)["d_model"] if is_uri(fc.t5) else AutoConfig.from_pretrained(fc.t5).d_model)
    try:
        from diffusers import AutoencoderKL

        vae_cfg = read_config(fc.vae) if is_uri(fc.vae) else AutoencoderKL.load_config(fc.vae)
        latent_channels = int(vae_cfg.get("latent_channels", 4))
    except Exception:  # noqa: BLE001 - a VAE folder without a readable config: SD/SDXL's 4
        latent_channels = 4
    return dim, latent_channels


def _fp_base(fc) -> dict:
    base = {"version": shards.FORMAT + "+" + PIPELINE_VERSION, "vae": fc.vae, "t5": fc.t5,
            "max_length": fc.t5_max_length, "precision": fc.precision}
    if fc.text_dtype != "fp16":  # only when set: fp16 shards written before the option stay valid
        base["text_dtype"] = fc.text_dtype
    return base


def _sample(row: dict) -> tuple[dict | None, str | None]:
    err = row.get("t5_error") or row.get("prep_error")
    if not err and row.get("latent") is None:
        err = "no latent"
    if err:
        return None, err
    meta = {"key": row["key"], "url": row["url"], "bucket": row["bucket"], "height": row["bucket_h"],
            "width": row["bucket_w"], "orig_height": row["orig_height"], "orig_width": row["orig_width"],
            "resolution": row["resolution"], "caption_long": row["text_long"], "caption_short": row["text_short"],
            "aesthetic": row["aesthetic"], "n_long": row["n_long"], "n_short": row["n_short"],
            "upscaled": bool(row["upscaled"])}
    return {"key": row["key"], "meta": meta, "latent": row["latent"], "t5_long": row["t5_long"],
            "t5_short": row["t5_short"]}, None


def commit_shard(gid: int, table, out: str, meta: dict) -> dict:
    """Commit task of one shard (on a worker): its rows -> tar + sidecar; returns the small summary
    the index is built from."""
    m = meta[gid]
    samples, failed = [], []
    for row in table.to_pylist():
        s, err = _sample(row)
        if s is None:
            failed.append({"key": row["key"], "error": err})
        else:
            samples.append(s)
    side = shards.write_shard(fs.join(shards.shards_dir(out, m["res"]), m["name"]), samples,
                              {"fingerprint": m["fp"], "keys_hash": m["hash"], "planned": m["planned"],
                               "part": m["part"], "resolution": m["res"],
                               "failed": sorted(failed, key=lambda f: f["key"])})
    summary = {k: side[k] for k in ("name", "samples", "bytes", "sha256", "buckets")}
    return dict(summary, res=m["res"], n_failed=len(failed))


def _read_part(item: dict, fc, dim: int, sources: list[str]):
    """flat_map step: the rows of one part that belong to shards being computed, with image bytes."""
    todo = {(r, i): (g, h) for r, i, g, h in json.loads(item["todo"])}
    yield from read_images(item, rows_fn=lambda out, part: plan.rows_for(out, part, fc, dim, sources, todo))


def _compute(cfg, out: str, todo: list[dict], fps: dict, dim: int, sources: list[str], progress: bool) -> dict:
    """Compute and commit the shards in `todo` (plan entries); returns {group id: commit summary}."""
    import ray

    from _sigma.raystage import map_stage
    from features.t5 import T5Embedder
    from features.vae import VaeEncoder, prepare_batch

    fc = cfg.features
    by_part: dict[int, list] = {}
    meta, expected = {}, {}
    for gid, e in enumerate(todo):
        by_part.setdefault(e["part"], []).append([e["res"], e["idx"], gid, e["hash"]])
        meta[gid] = {k: e[k] for k in ("res", "part", "idx", "name", "hash", "planned")} | {"fp": fps[e["res"]]}
        expected[gid] = e["planned"]
    # The todo list travels as a json string: a dict would become an Arrow struct column.
    items = [{"out": out, "part": p, "todo": json.dumps(v)} for p, v in sorted(by_part.items())]
    t5r, vr = fc.t5_resources, fc.vae_resources
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(_read_part, fn_kwargs={"fc": fc, "dim": dim, "sources": sources})
    ds = map_stage(ds, T5Embedder, t5r, constructor_kwargs=dict(
        t5=fc.t5, max_length=fc.t5_max_length, precision=fc.precision, num_gpus=t5r.num_gpus, chunk=t5r.batch_size,
        text_dtype=fc.text_dtype, batch_tokens=fc.t5_batch_tokens))
    ds = map_stage(ds, prepare_batch, Resources(batch_size=vr.batch_size, num_cpus=1.0))
    ds = map_stage(ds, VaeEncoder, vr, constructor_kwargs=dict(vae=fc.vae, precision=fc.precision,
                                                               num_gpus=vr.num_gpus))
    return commit_groups(ds, expected, commit_shard, out=out, stage="features", kwargs={"out": out, "meta": meta},
                         desc="features", progress=progress)


def run_features(cfg, out: str, progress: bool = True) -> dict:
    """Plan per part, compute the shards not yet done, write one index per resolution."""
    from _sigma.raystage import init_ray

    out, fc = fs.normalize(out), cfg.features
    t0 = time.time()
    init_ray(getattr(cfg, "ray", None))
    parts = manifest.list_parts(out)
    if not parts:
        raise ConfigError(f"{out} has no manifest yet: run the curation stages first")
    sources = plan.exclusion_sources(out, fc)
    # The eval hold-out must cover every part about to be sharded: a part added or rewritten after
    # eval_split last searched it could hold a copy of a benchmark image (StaleHoldoutError).
    holdout_cover = holdout.check_current(out)
    dim, latent_channels = _model_info(fc)
    fps = {res: fingerprint(dict(_fp_base(fc), resolution=res)) for res in fc.resolutions}
    plans = run_tasks(plan.plan_part, parts, kwargs={"out": out, "fc": fc, "dim": dim, "fps": fps, "sources": sources},
                      desc="features plan", progress=progress)
    entries = sorted((e for p in plans for e in p["shards"]), key=lambda e: (e["res"], e["part"], e["idx"]))
    todo = [e for e in entries if "side" not in e]
    for res in fc.resolutions:  # the index must never describe shards being rewritten or removed
        d = shards.shards_dir(out, res)
        removed = shards.clean_dir(d, keep={e["name"] for e in entries if e["res"] == res})
        if removed or any(e["res"] == res for e in todo):
            shards.delete_index(d)
    done = _compute(cfg, out, todo, fps, dim, sources, progress) if todo else {}
    by_name = {(s["res"], s["name"]): s for s in done.values()}
    stats = Counter()
    for p in plans:
        stats.update(p["stats"])
    summary = {"rows": sum(p["rows"] for p in plans), **{k: stats[k] for k in ("selected", "excluded", "no_caption",
                                                                              "no_image")},
               "exclude_keys": sources, "holdout_parts_covered": holdout_cover, "resolutions": {}}
    for res in fc.resolutions:
        sides = [e.get("side") or by_name[(res, e["name"])] for e in entries if e["res"] == res]
        index = shards.build_index(
            res, sides,
            vae={"name": fc.vae, "scale_factor": fc.scale_factor, "latent_channels": latent_channels},
            t5={"name": fc.t5, "max_length": fc.t5_max_length, "dim": dim, "dtype": fc.text_dtype},
            extra={"fingerprint": fps[res], "excluded": stats["excluded"]})
        shards.write_index(shards.shards_dir(out, res), index)
        summary["resolutions"][res] = {"shards": len(sides), "samples": index["samples"], "bytes": index["bytes"],
                                       "failed": index["failed"], "buckets": len(index["buckets"])}
    summary.update(shards_written=len(done), redone=dict(Counter(e["why"] for e in todo if e["why"] != "missing")),
                   seconds=round(time.time() - t0, 1), nodes=nodes_of(list(plans) + list(done.values())))
    return summary
