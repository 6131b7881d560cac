"""Main job: `sigma-curate --config pipelines.yaml --pipeline NAME [--stages a,b] [--set k=v]`
(the same as `python -m curation.run`).

Runs the pipeline's stages in order on Ray Data: an embedded local Ray when run directly, the
cluster when RAY_ADDRESS is set or under `ray job submit`. Every stage is resumable per part, so
a killed job rerun with the same command finishes the work without redoing finished parts.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone

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


PROG = "sigma-curate"
EPILOG = f"""stages, in the order they run: {' -> '.join(STAGES)}
pipelines: the names under `pipelines:` of --config{{pipelines}}

examples:
  {PROG} --pipeline demo --input urls.parquet --output runs/mine
  {PROG} --pipeline demo --output runs/mine --stages select,stats      # re-run two stages
  ray job submit --working-dir . -- {PROG} --pipeline pixart-sigma --output s3://bucket/run"""


def parse_args(argv=None):
    from _sigma.cli import add_verbose, make_parser, pipelines_note

    ap = make_parser(PROG, __doc__, EPILOG.format(pipelines=pipelines_note()))
    add_pipeline_args(ap, output=True)
    ap.add_argument("--input", help="URL list (parquet/csv/jsonl/txt file or a folder of them; local or "
                                    "s3:// / gs://); overrides input.path")
    ap.add_argument("--stages", help="comma-separated subset of the pipeline's stages, e.g. select,stats "
                                     "(default: the pipeline's `stages`)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    add_verbose(ap)
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
    if "download" in stages:  # the URL list, before Ray starts and before the output is touched
        from _sigma.cli import require_exists

        what = "--input" if args.input else "input.path"
        if not cfg.input.path:
            raise ConfigError("no URL list: give --input URL_LIST or set input.path")
        problem = require_exists(what, cfg.input.path)
        if problem:
            raise ConfigError(problem)
    return cfg, stages


def merge_timings(out: str, timings: list[dict]) -> list[dict]:
    """Every stage's latest timing: this command's stages replace their rows of the previous
    summary.json, the rows of stages it did not run are kept (make demo runs the pipeline as several
    commands; the report's stage table must not shrink to the last one). Pipeline stage order."""
    from _sigma import fs

    previous = []
    uri = fs.join(out, "report", "summary.json")
    if fs.exists(uri):
        try:
            previous = [t for t in fs.read_json(uri).get("stages") or [] if isinstance(t, dict) and "stage" in t]
        except (ValueError, OSError, AttributeError):  # an unreadable old summary only loses old rows
            previous = []
    latest = {t["stage"]: t for t in previous}
    latest.update({t["stage"]: t for t in timings})
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(latest.values(), key=lambda t: order.get(t["stage"], len(order)))


def summarize(cfg: PipelineConfig, out: str, timings: list[dict], stages_run: list[str] | None = None) -> dict:
    """The run's summary from the part footers (counts only) and each stage's own result; `timings`
    holds every stage's latest timing, `stages_run` the stages of the command that wrote it."""
    from _sigma import fs, manifest

    s = manifest.run_summary(out)
    return {"pipeline": cfg.name, "output": out, "rows": s["rows"], "status": s["status"], "selected": s["selected"],
            "stages": timings, "stages_run": stages_run if stages_run is not None else [t["stage"] for t in timings],
            "manifest": manifest.manifest_glob(out), "shards": fs.join(out, "shards"), "report": fs.join(out, "report")}


def print_summary(s: dict) -> None:
    print("\n=== curation.run summary ===")
    print(f"pipeline {s['pipeline']}: {s['rows']} rows, selected {s['selected']}")
    print("rows per status: " + ", ".join(f"{k}={v}" for k, v in sorted(s["status"].items())))
    print(f"{'stage':<10}{'seconds':>10}{'rows/s':>10}  details")
    ran = set(s.get("stages_run") or [st["stage"] for st in s["stages"]])
    for st in s["stages"]:
        earlier = "" if st["stage"] in ran else f"(earlier command, {st.get('finished_at', '?')}) "
        print(f"{st['stage']:<10}{st['seconds']:>10.1f}{st['rows_per_s']:>10.1f}  {earlier}"
              f"{json.dumps(st['result'], default=str)[:160]}")
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
                        "nodes": result.get("nodes") or {}, "result": result,
                        "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")})
        if name != "stats":
            check_invariants(out, info["rows"])
    summary = summarize(cfg, out, merge_timings(out, timings), stages)
    fs.write_json(fs.join(out, "report", "summary.json"), summary)
    return summary


def main(argv=None) -> int:
    from _sigma.cli import route_logs, user_error

    args = parse_args(argv)
    try:
        cfg, stages = resolve(args)
    except ConfigError as e:
        return user_error(PROG, str(e))
    try:
        log = route_logs(cfg.out, args.verbose, "curate")
    except OSError as e:
        return user_error(PROG, f"--output {cfg.out}: cannot create or write <output>/logs ({e.strerror or e})")
    if not args.verbose:
        print(f"(Ray / img2dataset logs: {log}; --verbose shows them here)", flush=True)
    try:
        summary = run(cfg, stages, progress=not args.no_progress)
    except ConfigError as e:  # found once running: the lock is held, the URL list is malformed, ...
        return user_error(PROG, str(e))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
