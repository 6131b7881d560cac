"""The features stage: `run_features(cfg, out, progress)` (called by curation.run).

selected rows (manifest) minus the exclusion list -> per target resolution a deterministic plan of
shards (keys sorted, cut at shard_max_samples / estimated shard_max_bytes) -> only shards not yet
done are computed on Ray Data:

  read (per download part, tasks) -> T5Embedder (actors) -> prepare_batch (decode, bucket,
  resize/crop, one row per target resolution; tasks) -> VaeEncoder (actors) -> driver writes each
  shard as soon as all its rows arrived (atomic) -> index.json per resolution, last.

T5 runs once per row whatever the number of resolutions. A killed run rerun with the same command
recomputes only the shards whose tar is missing (resume); stale temp files and shards outside the
plan are removed, so index and shards always agree.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa

from common import manifest
from common.config import ConfigError, fingerprint
from features import buckets, shards

PIPELINE_VERSION = "features/1"  # bump when preprocessing or the stored layout changes
_MANIFEST_COLS = ["key", "url", "caption", "caption_short", "caption_long", "aesthetic", "width", "height",
                  "selected", "status"]


def load_exclusions(path: str | None) -> set[str]:
    """Keys never to put in a shard: a text file (one key a line) or a parquet with a `key` column."""
    if not path:
        return set()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"features.exclude_keys: {p} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {str(k) for k in pq.read_table(p, columns=["key"]).column("key").to_pylist() if k is not None}
    return {ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")}


def _text(v) -> str | None:
    return v if isinstance(v, str) and v.strip() else None


def selected_rows(out: Path, exclude: set[str]) -> tuple[list[dict], dict]:
    """Rows to featurise (sorted by key) and counts of what was left out and why."""
    t = manifest.read_manifest(out, _MANIFEST_COLS)
    cols = set(t.column_names)
    if "selected" not in cols:
        raise ConfigError(f"{out}: the manifest has no `selected` column: run the select stage first")
    rows, stats = [], {"selected": 0, "excluded": 0, "no_caption": 0, "no_image": 0}
    for r in t.to_pylist():
        if not r.get("selected"):
            continue
        stats["selected"] += 1
        if r["key"] in exclude:
            stats["excluded"] += 1
            continue
        if r.get("status", "ok") != "ok" or not r.get("width") or not r.get("height"):
            stats["no_image"] += 1
            continue
        long_ = _text(r.get("caption_long"))
        short = _text(r.get("caption_short")) or _text(r.get("caption"))
        if long_ is None and short is None:
            stats["no_caption"] += 1
            continue
        rows.append({"key": r["key"], "url": r.get("url"), "text_long": long_, "text_short": short,
                     "aesthetic": r.get("aesthetic"), "orig_width": int(r["width"]), "orig_height": int(r["height"])})
    rows.sort(key=lambda r: r["key"])
    return rows, stats


def _content_hash(rows: list[dict]) -> str:
    """What a shard's bytes depend on besides the config: its rows (keys, captions, metadata)."""
    blob = [[r["key"], r["url"], r["text_long"], r["text_short"], r["aesthetic"], r["orig_width"],
             r["orig_height"]] for r in rows]
    return shards.keys_hash([json.dumps(b, default=str) for b in blob])


def estimate_bytes(row: dict, resolution: int, dim: int, n_tokens: int, text_dtype: str = "fp16") -> int:
    """Tar bytes of one sample: latent (8, h/8, w/8) fp16 + T5 tokens (+ fp8 scales) + json + tar headers."""
    _, h, w = buckets.assign(row["orig_width"], row["orig_height"], resolution)
    texts = len(row["text_long"] or "") + len(row["text_short"] or "")
    return 8 * (h // 8) * (w // 8) * 2 + shards.token_bytes(n_tokens, dim, text_dtype) + texts + 400 + 4 * (512 + 256) + 3 * 128


def plan_shards(rows: list[dict], resolution: int, max_samples: int, max_bytes: int, dim: int,
                n_tokens: list[int], text_dtype: str = "fp16") -> list[list[int]]:
    """Cut the key-sorted rows into shards (lists of row indices); a pure function of its inputs."""
    plan, cur, size = [], [], 0
    for i, r in enumerate(rows):
        est = estimate_bytes(r, resolution, dim, n_tokens[i], text_dtype)
        if cur and (len(cur) >= max_samples or (max_bytes and size + est > max_bytes)):
            plan.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += est
    if cur:
        plan.append(cur)
    return plan


def _model_info(fc) -> tuple[int, int, object | None]:
    """(T5 d_model, VAE latent channels, tokenizer or None) from configs only (no weights)."""
    from transformers import AutoConfig

    dim = int(AutoConfig.from_pretrained(fc.t5).d_model)
    try:
        from diffusers import AutoencoderKL

        latent_channels = int(AutoencoderKL.load_config(fc.vae).get("latent_channels", 4))
    except Exception:
        latent_channels = 4
    tok = None
    if fc.shard_max_bytes:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(fc.t5)
    return dim, latent_channels, tok


def _count_tokens(tok, rows: list[dict], max_length: int) -> list[int]:
    if tok is None:
        return [0] * len(rows)
    counts = [0] * len(rows)
    for kind in ("text_long", "text_short"):
        idx = [i for i, r in enumerate(rows) if r[kind]]
        for s in range(0, len(idx), 4096):
            chunk = idx[s:s + 4096]
            enc = tok([rows[i][kind] for i in chunk], max_length=max_length, truncation=True)["input_ids"]
            for i, ids in zip(chunk, enc):
                counts[i] += len(ids)
    return counts


def _read_images(item: dict, out: str):
    """flat_map over one download part: every planned row of that part with its image bytes."""
    from curation.download import iter_images

    wanted = {r["key"]: r for r in json.loads(item["rows"])}
    for key, data in iter_images(Path(out), int(item["part"])):
        r = wanted.pop(key, None)
        if r is not None:
            yield dict(r, image=data)
    for r in wanted.values():  # not in the tar: the row still flows, prepare records the reason
        yield dict(r, image=None)


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


def run_features(cfg, out: Path, progress: bool = True, executor: str = "ray") -> dict:
    """Plan, compute missing shards (executor "ray", or "local": same steps in-process), write indexes."""
    out, fc = Path(out), cfg.features
    t0 = time.time()
    # Every eval benchmark version kept under this output is held out (common.holdout: the union of
    # their exclusion lists), plus the user's own exclude_keys list: a leak would flatter FID.
    from common.holdout import excluded_keys

    rows, stats = selected_rows(out, excluded_keys(str(out)) | load_exclusions(fc.exclude_keys))
    stats["exclude_keys"] = fc.exclude_keys
    dim, latent_channels, tok = _model_info(fc)
    n_tokens = _count_tokens(tok, rows, fc.t5_max_length)
    fp_base = {"version": shards.FORMAT + "+" + PIPELINE_VERSION, "vae": fc.vae, "t5": fc.t5,
               "max_length": fc.t5_max_length, "precision": fc.precision}
    if fc.text_dtype != "fp16":  # only when set: fp16 shards written before the option stay valid
        fp_base["text_dtype"] = fc.text_dtype
    # Plan every resolution; find what is already done.
    todo: dict[int, tuple[int, int, list[int], str, str]] = {}  # shard gid -> (res, shard idx, rows, hash, fp)
    plans: dict[int, list[tuple[str, str, str]]] = {}
    for res in fc.resolutions:
        d = shards.shards_dir(out, res)
        fp = fingerprint(dict(fp_base, resolution=res))
        plan = plan_shards(rows, res, fc.shard_max_samples, fc.shard_max_bytes, dim, n_tokens, fc.text_dtype)
        plans[res] = []
        for i, idx in enumerate(plan):
            name, h = shards.shard_name(i), _content_hash([rows[j] for j in idx])
            plans[res].append((name, h, fp))
            if not shards.shard_done(d / name, h, fp):
                todo[len(todo)] = (res, i, idx, h, fp)
        if any(t[0] == res for t in todo.values()) and (d / shards.INDEX).exists():
            (d / shards.INDEX).unlink()  # the index must never describe shards being rewritten
        shards.clean_dir(d, keep={name for name, _, _ in plans[res]})
    # Compute the missing shards.
    written = 0
    if todo:
        written = _compute(cfg, out, rows, todo, progress, executor)
    # Index last, from the sidecars.
    summary = {"rows": len(rows), **stats, "resolutions": {}}
    for res in fc.resolutions:
        d = shards.shards_dir(out, res)
        sides = []
        for name, h, fp in plans[res]:
            side = shards.shard_done(d / name, h, fp)
            if side is None:
                raise RuntimeError(f"{d / name} missing after the features run; rerun the same command")
            sides.append(side)
        failed = [f for s in sides for f in s.get("failed", [])]
        index = shards.build_index(
            res, sides,
            vae={"name": fc.vae, "scale_factor": fc.scale_factor, "latent_channels": latent_channels},
            t5={"name": fc.t5, "max_length": fc.t5_max_length, "dim": dim, "dtype": fc.text_dtype},
            extra={"fingerprint": fingerprint(dict(fp_base, resolution=res)), "excluded": stats["excluded"],
                   "failed": failed})
        shards.write_index(d, index)
        summary["resolutions"][res] = {"shards": len(sides), "samples": index["samples"], "bytes": index["bytes"],
                                       "failed": len(failed), "buckets": len(index["buckets"])}
    summary.update(shards_written=written, seconds=round(time.time() - t0, 1))
    return summary


def _compute(cfg, out: Path, rows: list[dict], todo: dict, progress: bool, executor: str) -> int:
    from features.t5 import T5Embedder
    from features.vae import VaeEncoder, prepare_batch

    fc = cfg.features
    targets: dict[int, list[list[int]]] = {}  # row index -> [[resolution, gid], ...]
    for gid, (res, _, idx, _, _) in todo.items():
        for j in idx:
            targets.setdefault(j, []).append([res, gid])
    by_part: dict[int, list[dict]] = {}
    for j, tg in sorted(targets.items()):
        r = dict(rows[j], targets=json.dumps(tg))
        by_part.setdefault(int(r["key"].split("_", 1)[0]), []).append(r)
    items = [{"part": p, "rows": json.dumps(rs)} for p, rs in sorted(by_part.items())]
    expected = {gid: len(t[2]) for gid, t in todo.items()}
    t5r, vr = fc.t5_resources, fc.vae_resources
    t5_kw = dict(t5=fc.t5, max_length=fc.t5_max_length, precision=fc.precision, num_gpus=t5r.num_gpus,
                 chunk=t5r.batch_size, text_dtype=fc.text_dtype, batch_tokens=fc.t5_batch_tokens)
    vae_kw = dict(vae=fc.vae, precision=fc.precision, num_gpus=vr.num_gpus)
    count = [0]

    def on_part(gid: int, table: pa.Table) -> None:
        res, i, idx, h, fp = todo[gid]
        samples, failed = [], []
        for row in table.to_pylist():
            s, err = _sample(row)
            if s is None:
                failed.append({"key": row["key"], "error": err})
            else:
                samples.append(s)
        shards.write_shard(shards.shards_dir(out, res) / shards.shard_name(i), samples,
                           {"fingerprint": fp, "keys_hash": h, "planned": len(idx),
                            "failed": sorted(failed, key=lambda f: f["key"])})
        count[0] += 1

    if executor == "local":
        _run_local(items, out, T5Embedder(**t5_kw), VaeEncoder(**vae_kw), prepare_batch, t5r.batch_size,
                   vr.batch_size, expected, on_part)
        return count[0]
    import ray

    from common.raystage import collect_by_part, init_ray, map_stage
    from curation.config import Resources

    init_ray(getattr(cfg, "ray", None))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(_read_images, fn_kwargs={"out": str(out)})
    ds = map_stage(ds, T5Embedder, t5r, constructor_kwargs=t5_kw)
    ds = map_stage(ds, prepare_batch, Resources(batch_size=vr.batch_size, num_cpus=1.0))
    ds = map_stage(ds, VaeEncoder, vr, constructor_kwargs=vae_kw)
    collect_by_part(ds, expected, on_part, desc="features", progress=progress)
    return count[0]


def _run_local(items, out, t5, vae, prepare, t5_bs: int, vae_bs: int, expected: dict, on_part) -> None:
    """The same steps in this process, batch by batch (no Ray): debugging and tests."""
    buffers: dict[int, list[pa.Table]] = {}
    got: dict[int, int] = {}
    for item in items:
        read = list(_read_images(item, str(out)))
        for s in range(0, len(read), t5_bs):
            chunk = t5(pa.Table.from_pylist(read[s:s + t5_bs]))
            for v in range(0, chunk.num_rows, vae_bs):
                res = vae(prepare(chunk.slice(v, vae_bs)))
                parts = res.column("_part").to_pylist()
                for gid in sorted(set(parts)):
                    piece = res.filter(pa.array([p == gid for p in parts])).drop_columns(["_part"])
                    buffers.setdefault(gid, []).append(piece)
                    got[gid] = got.get(gid, 0) + piece.num_rows
                    if got[gid] == expected[gid]:
                        on_part(gid, pa.concat_tables(buffers.pop(gid), promote_options="permissive"))
    if buffers:
        raise RuntimeError(f"features: incomplete shards {sorted(buffers)}")
