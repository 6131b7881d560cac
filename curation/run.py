"""Main job: `python -m curation.run --config pipelines.yaml --pipeline NAME [--stages a,b] [--set k=v]`.

Runs the pipeline's stages in order on Ray Data: an embedded local Ray when run directly, the
cluster when RAY_ADDRESS is set or under `ray job submit`. Every stage is resumable per part, so
a killed job rerun with the same command finishes the work without redoing finished parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

for _k, _v in {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)
if not os.environ.get("RAY_ADDRESS"):  # embedded Ray on the loopback address; never for a cluster's job
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _sigma.config import ConfigError, save_resolved  # noqa: E402
from curation.config import STAGES, PipelineConfig, add_pipeline_args, pipeline_from_args  # noqa: E402


def _stage_fn(name: str):
    """The entry point of each stage: fn(cfg, out, progress) -> summary dict."""
    if name == "download":
        from curation.download import run_download as fn
    elif name == "score":
        from curation.score import run_score as fn
    elif name == "dedup":
        from curation.dedup import run_dedup as fn
    elif name == "select":
        from curation.select import run_select as fn
    elif name == "caption":
        from captioning.stage import run_caption as fn
    elif name == "eval_split":
        from eval.build_benchmark import run_eval_split as fn
    elif name == "features":
        from features.stage import run_features as fn
    elif name == "stats":
        from curation.stats import run_stats as fn
    else:  # config validation makes this unreachable
        raise ConfigError(f"unknown stage {name!r}")
    return fn


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m curation.run", description=__doc__.splitlines()[0])
    add_pipeline_args(ap, output=True)
    ap.add_argument("--input", help="URL list (parquet/csv/jsonl/txt); overrides input.path")
    ap.add_argument("--stages", help="comma-separated subset of the pipeline's stages, e.g. select,stats")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def resolve(args) -> tuple[PipelineConfig, list[str]]:
    extra = [f"input.path={args.input}"] if args.input else []
    # saved by run() once the lock is held and the inputs are checked: a refused run changes nothing
    cfg = pipeline_from_args(args, extra, save=False)
    stages = list(cfg.stages)
    if args.stages is not None:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        if not wanted:
            raise ConfigError(f"--stages {args.stages!r}: no stage named; give e.g. --stages select,stats "
                              f"(allowed: {', '.join(STAGES)})")
        bad = [s for s in wanted if s not in STAGES]
        if bad:
            raise ConfigError(f"--stages: unknown stage {bad[0]!r}; allowed: {', '.join(STAGES)}")
        stages = [s for s in STAGES if s in wanted]
    # model paths of these stages' config sections (eval_split loads no model)
    pipeline_from_args(args, extra, check=[s for s in stages if s != "eval_split"], save=False)
    return cfg, stages


def summarize(cfg: PipelineConfig, out: str, timings: list[dict]) -> dict:
    """The run's summary from the part footers (counts only) and each stage's own result."""
    from _sigma import fs, manifest

    s = manifest.run_summary(out)
    return {"pipeline": cfg.name, "output": out, "rows": s["rows"], "status": s["status"], "selected": s["selected"],
            "stages": timings, "manifest": manifest.manifest_glob(out),
            "shards": fs.join(out, "shards"), "report": fs.join(out, "report")}


def print_summary(s: dict) -> None:
    print("\n=== curation.run summary ===")
    print(f"pipeline {s['pipeline']}: {s['rows']} rows, selected {s['selected']}")
    print("rows per status: " + ", ".join(f"{k}={v}" for k, v in sorted(s["status"].items())))
    print(f"{'stage':<10}{'seconds':>10}{'rows/s':>10}  details")
    for st in s["stages"]:
        print(f"{st['stage']:<10}{st['seconds']:>10.1f}{st['rows_per_s']:>10.1f}  {json.dumps(st['result'], default=str)[:160]}")
    print(f"manifest: {s['manifest']}\nshards:   {s['shards']}\nreport:   {s['report']}")


def run(cfg: PipelineConfig, stages: list[str], progress: bool = True) -> dict:
    """Everything is validated (config, lock, URL list, stage order) before the resolved config is
    saved and the first stage starts: a refused run changes nothing in the output."""
    from _sigma import fs
    from _sigma.runlock import run_lock

    out = fs.normalize(cfg.output)
    with run_lock(out):
        return _run_locked(cfg, stages, out, progress)


def _run_locked(cfg: PipelineConfig, stages: list[str], out: str, progress: bool) -> dict:
    from _sigma import fs
    from _sigma.manifest import check_invariants, list_parts
    from _sigma.raystage import init_ray
    from curation.inputs import prepare_inputs

    init_ray(cfg.ray)
    info = prepare_inputs(cfg.input, out, progress=progress)
    if "download" not in stages and not list_parts(out):
        raise ConfigError(f"{out} has no manifest yet: run the download stage first")
    save_resolved(cfg, out, extra={"stages_run": stages})
    timings = []
    for name in stages:
        fn = _stage_fn(name)
        print(f"--- stage {name}", flush=True)
        t0 = time.time()
        result = fn(cfg, out, progress) or {}
        dt = time.time() - t0
        # nodes: {Ray node id: tasks} where the stage's plan / commit tasks ran (_sigma.partstage)
        timings.append({"stage": name, "seconds": round(dt, 2), "rows_per_s": round(info["rows"] / max(dt, 1e-9), 1),
                        "nodes": result.get("nodes") or {}, "result": result})
        if name != "stats":
            check_invariants(out, info["rows"])
    summary = summarize(cfg, out, timings)
    fs.write_json(fs.join(out, "report", "summary.json"), summary)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, stages = resolve(args)
        summary = run(cfg, stages, progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
