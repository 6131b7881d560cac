"""The caption stage: `run_caption(cfg, out, progress) -> summary` (called by curation.run).

Captions the selected rows (`selected == true`) of every manifest part and adds the caption_*
columns (docs/ARCHITECTURE.md). Resume: each part is committed atomically with the stage
fingerprint; a rerun with the same config captions only rows that have no terminal caption_status
(never captioned, or `failed_engine` last time); a changed config recaptions every selected row.
The raw alt text stays in `caption` (the short caption); `caption_short` is that text, or the
first sentence of the long caption when the alt text is junk (`caption_short_derived`).
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
    from common.config import fingerprint

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


def _read_images(task: dict) -> list[dict]:
    """One row per pending key of a part, with its image bytes (null if absent from the tar)."""
    from curation.download import iter_images

    want = set(task["keys"])
    found = {k: b for k, b in iter_images(Path(task["out"]), task["part"]) if k in want}
    return [{"_part": task["part"], "key": k, "caption": alt, "image": found.get(k)}
            for k, alt in zip(task["keys"], task["alts"])]


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


def finish_part(out: Path, part: int, new: pa.Table | None, fp: str) -> None:
    """Merge this run's rows over the part's caption columns and commit the part (stage done)."""
    from common import manifest

    base = manifest.read_part(out, part)
    prev_ok = manifest.stage_done(out, part, STAGE, fp)
    if prev_ok and all(c in base.column_names for c in CAPTION_COLS):
        old = base.select(["key"] + CAPTION_COLS)  # keep earlier results of rows not redone
    else:
        old = pa.Table.from_pydict({"key": base.column("key").to_pylist(),
                                    **{c: pa.nulls(base.num_rows, OUT_SCHEMA.field(c).type) for c in CAPTION_COLS}})
    cols = old.cast(pa.schema([OUT_SCHEMA.field("key")] + [OUT_SCHEMA.field(c) for c in CAPTION_COLS]))
    if new is not None and new.num_rows:
        new = new.drop_columns([c for c in new.column_names if c == "_part"])
        idx = {k: i for i, k in enumerate(new.column("key").to_pylist())}
        rows = cols.to_pylist()
        fresh = new.to_pylist()
        for r in rows:
            if r["key"] in idx:
                r.update(fresh[idx[r["key"]]])
        cols = pa.Table.from_pylist(rows, schema=cols.schema)
    # Every row gets its short caption (also rows not selected): the alt text unless it is junk.
    alts = base.column("caption").to_pylist() if "caption" in base.column_names else [None] * base.num_rows
    short, derived = cols.column("caption_short").to_pylist(), cols.column("caption_short_derived").to_pylist()
    for i, d in enumerate(derived):
        if d is None:
            short[i], derived[i] = short_caption(alts[i], None)
    cols = cols.set_column(cols.column_names.index("caption_short"), "caption_short", pa.array(short, pa.string()))
    cols = cols.set_column(cols.column_names.index("caption_short_derived"), "caption_short_derived",
                           pa.array(derived, pa.bool_()))
    manifest.update_part(out, part, cols, STAGE, fp)


def summarize(out: Path) -> dict:
    from common import manifest

    t = manifest.read_manifest(out, ["selected", "caption_status", "caption_short_derived"])
    status = Counter(t.column("caption_status").to_pylist()) if "caption_status" in t.column_names else Counter()
    sel = sum(bool(s) for s in t.column("selected").to_pylist()) if "selected" in t.column_names else 0
    derived = (sum(bool(s) for s in t.column("caption_short_derived").to_pylist())
               if "caption_short_derived" in t.column_names else 0)
    by_status = {k: v for k, v in status.items() if k is not None}
    return {"selected": sel, "caption_status": by_status, "captioned_ok": by_status.get("ok", 0)
            + by_status.get("too_long", 0), "short_derived": derived,
            "not_attempted": sel - sum(by_status.values())}


def runtime_env(c: CaptionConfig) -> dict | None:
    """The caption actors' Ray runtime_env: their own pip packages (hf engine only, e.g.
    transformers==4.31.0 for Share-Captioner) and env vars."""
    env: dict = {}
    if c.runtime_env_pip and c.engine == "hf":
        env["pip"] = list(c.runtime_env_pip)
    if c.runtime_env_vars:
        env["env_vars"] = dict(c.runtime_env_vars)
    return env or None


def run_caption(cfg, out: Path, progress: bool = True) -> dict:
    import ray

    from common import manifest
    from common.raystage import collect_by_part, map_stage

    c: CaptionConfig = cfg.caption
    out, fp = Path(out), caption_fingerprint(c)
    tasks, expected, empty = [], {}, []
    for p in manifest.list_parts(out):
        done = manifest.stage_done(out, p, STAGE, fp)
        cols = ["key", "caption", "selected"] + (["caption_status"] if done else [])
        t = manifest.read_part(out, p)
        t = t.select([x for x in cols if x in t.column_names])
        keys = pending_keys(t, done)
        if keys:
            alts = dict(zip(t.column("key").to_pylist(), t.column("caption").to_pylist())) \
                if "caption" in t.column_names else {}
            # Lists aligned with keys (a dict would become an Arrow struct with one field per key).
            tasks.append({"out": str(out), "part": p, "keys": keys, "alts": [alts.get(k) for k in keys]})
            expected[p] = len(keys)
        elif not done:
            empty.append(p)
    for p in empty:  # nothing selected: still record the stage (and its empty columns) as done
        finish_part(out, p, None, fp)
    if tasks:
        ds = ray.data.from_items(tasks).flat_map(_read_images)
        if c.engine == "vllm":
            from captioning.vllm_engine import caption_dataset

            ds = caption_dataset(ds, c)
        else:
            res = c.resources
            ds = map_stage(ds, engine_class(c.engine, resolve_hf_api(c)), res,
                           constructor_kwargs={"cfg": c, "num_gpus": res.num_gpus},
                           runtime_env=runtime_env(c))
        collect_by_part(ds, expected, lambda p, t: finish_part(out, p, t, fp), desc="caption", progress=progress)
    summary = summarize(out)
    summary.update(parts_captioned=len(tasks), rows_attempted=sum(expected.values()))
    return summary
