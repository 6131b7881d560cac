"""The caption stage: `run_caption(cfg, out, progress) -> summary` (called by curation.run).

Captions the selected rows (`selected == true`) of every manifest part and adds the caption_*
columns (docs/ARCHITECTURE.md). Stage IO is _sigma.partstage: a plan task per part counts the rows
to caption (`plan_part`), the read step recomputes them on the worker reading the part's images
(`pending_rows`), the engine runs as a Ray Data step, and a commit task per part merges the new
captions into the manifest part and writes it atomically with the stage fingerprint
(`finish_part`). The driver sees counts only. Resume: a rerun with the same config captions only
rows that have no terminal caption_status (never captioned, or `failed_engine` last time); a
changed config recaptions every selected row. A selected row whose image is not in the download
tar gets `failed_image`. The raw alt text stays in `caption` (the short caption); `caption_short`
is that text, or the first sentence of the long caption when the alt text is junk
(`caption_short_derived`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from captioning.config import CaptionConfig
from captioning.worker import DONE_STATUSES, OUT_SCHEMA, short_caption

STAGE = "caption"
CAPTION_COLS = [n for n in OUT_SCHEMA.names if n not in ("key", "_part")]


def caption_fingerprint(c: CaptionConfig) -> str:
    """What changes the captions (not resources, concurrency or endpoints)."""
    from _sigma.config import fingerprint

    return fingerprint({"engine": c.engine, "hf_api": resolve_hf_api(c) if c.engine == "hf" else None,
                        "model": c.model, "prompt": c.prompt, "system": c.system_prompt,
                        "generation": c.generation, "quality": c.quality, "t5": c.t5_tokenizer,
                        "image_max_side": c.image_max_side, "precision": c.precision})


def pending_keys(table: pa.Table, fp_matches: bool) -> list[str]:
    """Keys of selected rows still to caption in one manifest part."""
    if "selected" not in table.column_names:
        return []
    sel = table.column("selected").to_pylist()
    keys = table.column("key").to_pylist()
    if fp_matches and "caption_status" in table.column_names:
        st = table.column("caption_status").to_pylist()
    else:
        st = [None] * len(keys)
    return [k for k, s, q in zip(keys, sel, st) if s and q not in DONE_STATUSES]


_READ_COLS = ["key", "caption", "selected", "caption_status", "caption_short_derived"]


def _part_counts(t: pa.Table) -> Counter:
    """Small per-part numbers the run's summary adds up: selected, caption statuses, derived shorts."""
    c: Counter = Counter()
    if "selected" in t.column_names:
        c["selected"] = sum(bool(s) for s in t.column("selected").to_pylist())
    if "caption_status" in t.column_names:
        c.update(f"status:{s}" for s in t.column("caption_status").to_pylist() if s is not None)
    if "caption_short_derived" in t.column_names:
        c["derived"] = sum(bool(s) for s in t.column("caption_short_derived").to_pylist())
    return c


def pending_rows(out: str, part: int, fp: str) -> list[dict]:
    """rows_fn of the read step (runs on the worker reading the part): the part's rows to caption
    now, with their alt text: selected rows without a terminal caption_status under this config."""
    from _sigma import manifest

    done = manifest.stage_done(out, part, STAGE, fp)
    t = manifest.read_part(out, part, _READ_COLS if done else ["key", "caption", "selected"])
    keys = set(pending_keys(t, done))
    alts = t.column("caption").to_pylist() if "caption" in t.column_names else [None] * t.num_rows
    return [{"key": k, "caption": a} for k, a in zip(t.column("key").to_pylist(), alts) if k in keys]


def plan_part(part: int, out: str, fp: str) -> dict:
    """Plan task of one part: rows to caption, whether the part needs a commit, its current counts."""
    from _sigma import manifest

    done = manifest.stage_done(out, part, STAGE, fp)
    t = manifest.read_part(out, part, _READ_COLS)
    n = len(pending_keys(t, done))
    return {"part": part, "n": n, "commit": bool(n) or not done, "counts": dict(_part_counts(t))}


def resolve_hf_api(c: CaptionConfig) -> str:
    """`hf_api: auto` -> sharecaptioner when the model's config.json names InternLM-XComposer (or the
    model is called ShareCaptioner), else chat_template. Reads a local folder or the HF cache only."""
    if c.hf_api != "auto":
        return c.hf_api
    import json

    conf = Path(c.model) / "config.json"
    if not conf.exists():
        try:
            from transformers.utils import cached_file

            conf = Path(cached_file(c.model, "config.json"))
        except Exception:  # noqa: BLE001 - not cached and offline: decide by name
            conf = None
    text = json.dumps(json.loads(conf.read_text())) if conf is not None and conf.exists() else ""
    if "XComposer" in text or "sharecaptioner" in c.model.lower():
        return "sharecaptioner"
    return "chat_template"


def engine_class(engine: str, hf_api: str = "chat_template"):
    if engine == "hf" and hf_api == "sharecaptioner":
        from captioning.sharecaptioner import ShareCaptioner as cls
    elif engine == "hf":
        from captioning.hf import HFCaptioner as cls
    elif engine == "openai":
        from captioning.openai_engine import OpenAICaptioner as cls
    else:
        raise ValueError(f"engine {engine!r} has no worker class (vllm runs through ray.data.llm)")
    return cls


def finish_part(part: int, new: pa.Table | None, out: str, fp: str) -> dict:
    """Commit task of one part (on a worker): this run's rows over the part's caption columns, the
    part written with the stage done; returns the part's counts."""
    from _sigma import manifest

    base = manifest.read_part(out, part)
    prev_ok = manifest.stage_done(out, part, STAGE, fp)
    schema = pa.schema([OUT_SCHEMA.field("key")] + [OUT_SCHEMA.field(c) for c in CAPTION_COLS])
    if prev_ok and all(c in base.column_names for c in CAPTION_COLS):
        cols = base.select(["key"] + CAPTION_COLS).cast(schema)  # keep earlier results of rows not redone
    else:
        cols = pa.table({"key": base.column("key"),
                         **{c: pa.nulls(base.num_rows, OUT_SCHEMA.field(c).type) for c in CAPTION_COLS}}, schema=schema)
    if new is not None and new.num_rows:
        new = new.drop_columns([c for c in new.column_names if c == "_part"])
        idx = {k: i for i, k in enumerate(new.column("key").to_pylist())}
        rows = cols.to_pylist()
        fresh = new.to_pylist()
        for r in rows:
            if r["key"] in idx:
                r.update(fresh[idx[r["key"]]])
        cols = pa.Table.from_pylist(rows, schema=schema)
    # Every row gets its short caption (also rows not selected): the alt text unless it is junk.
    alts = base.column("caption").to_pylist() if "caption" in base.column_names else [None] * base.num_rows
    short, derived = cols.column("caption_short").to_pylist(), cols.column("caption_short_derived").to_pylist()
    for i, d in enumerate(derived):
        if d is None:
            short[i], derived[i] = short_caption(alts[i], None)
    cols = cols.set_column(cols.column_names.index("caption_short"), "caption_short", pa.array(short, pa.string()))
    cols = cols.set_column(cols.column_names.index("caption_short_derived"), "caption_short_derived",
                           pa.array(derived, pa.bool_()))
    merged = manifest.update_part(out, part, cols, STAGE, fp)
    return {"counts": dict(_part_counts(merged))}


def summarize(counts: Counter) -> dict:
    """The stage's summary from the per-part counts (plan / commit tasks), never from rows."""
    by_status = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("status:")}
    sel = counts.get("selected", 0)
    return {"selected": sel, "caption_status": by_status,
            "captioned_ok": by_status.get("ok", 0) + by_status.get("too_long", 0),
            "short_derived": counts.get("derived", 0), "not_attempted": sel - sum(by_status.values())}


def runtime_env(c: CaptionConfig) -> dict | None:
    """The caption actors' Ray runtime_env: their own pip packages (hf engine only, e.g.
    transformers==4.31.0 for Share-Captioner) and env vars."""
    env: dict = {}
    if c.runtime_env_pip and c.engine == "hf":
        env["pip"] = list(c.runtime_env_pip)
    if c.runtime_env_vars:
        env["env_vars"] = dict(c.runtime_env_vars)
    return env or None


def run_caption(cfg, out: str, progress: bool = True) -> dict:
    """Plan per part (counts), caption the pending rows on Ray Data, commit each part on a worker."""
    import functools

    import ray

    from _sigma import fs, manifest
    from _sigma.partstage import commit_groups, nodes_of, read_images, run_tasks
    from _sigma.raystage import init_ray, map_stage

    c: CaptionConfig = cfg.caption
    out, fp = fs.normalize(out), caption_fingerprint(c)
    init_ray(getattr(cfg, "ray", None))
    plans = run_tasks(plan_part, manifest.list_parts(out), kwargs={"out": out, "fp": fp}, desc="caption plan",
                      progress=progress)
    expected = {p["part"]: p["n"] for p in plans if p["commit"]}  # 0 rows: commit the empty columns anyway
    busy = [p for p, n in expected.items() if n]
    ds = None
    if busy:
        ds = ray.data.from_items([{"out": out, "part": p} for p in busy], override_num_blocks=len(busy))
        ds = ds.flat_map(functools.partial(read_images, rows_fn=functools.partial(pending_rows, fp=fp)))
        if c.engine == "vllm":
            from captioning.vllm_engine import caption_dataset

            ds = caption_dataset(ds, c)
        else:
            res = c.resources
            ds = map_stage(ds, engine_class(c.engine, resolve_hf_api(c)), res,
                           constructor_kwargs={"cfg": c, "num_gpus": res.num_gpus}, runtime_env=runtime_env(c))
    done = commit_groups(ds, expected, finish_part, out=out, stage=STAGE, kwargs={"out": out, "fp": fp},
                         desc="caption", progress=progress)
    counts: Counter = Counter()
    for p in plans:
        counts.update(done[p["part"]]["counts"] if p["part"] in done else p["counts"])
    summary = summarize(counts)
    summary.update(parts_captioned=len(busy), rows_attempted=sum(expected.values()), parts_committed=len(done),
                   nodes=nodes_of(list(plans) + list(done.values())))
    return summary
