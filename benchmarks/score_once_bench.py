"""Score stage on a crawl full of byte copies: each distinct sha256 scored once vs every row scored.

Baseline (measured in the same process, on a copy of the same download output): the score
pipeline before issue 22 item 10 -- every downloaded row read from its part's tar, decoded and run
through the Scorer, then committed per part. Ours: `curation.score.run_score` (owner map by sha256,
one scoring per distinct image, values fanned out to the copies). Prints rows/s of each, the ratio
ours / baseline and whether byte copies got identical values in each; then the scoring step alone
(decode + CLIP + aesthetic, in this process, no Ray start-up): the Scorer over every row vs
ScoreOnce over the distinct images.

    .venv/bin/python benchmarks/score_once_bench.py [--rows 240] [--distinct 80] [--rounds 2]
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["SIGMA_QUIET"] = "1"

from _sigma import manifest  # noqa: E402
from _sigma.config import parse  # noqa: E402
from curation import demo_data as dd  # noqa: E402
from curation.config import PipelineConfig  # noqa: E402
from curation.download import run_download  # noqa: E402
from curation.inputs import prepare_inputs  # noqa: E402
from curation.score import Scorer, _plan, downloaded_rows, finish_part, run_score, score_fingerprint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def score_every_row(cfg, out: str) -> dict:
    """The pre-22.10 score pipeline: the same plan, reader, Scorer and commit, one scoring per row."""
    import ray

    from _sigma.partstage import commit_groups, pending_parts, read_images, run_tasks
    from _sigma.raystage import map_stage

    fp = score_fingerprint(cfg)
    todo = pending_parts(out, "score", fp)
    expected = {p["part"]: p["n"] for p in run_tasks(_plan, todo, kwargs={"out": out}, progress=False)}
    s = cfg.score
    ds = ray.data.from_items([{"out": out, "part": p} for p in todo], override_num_blocks=len(todo))
    ds = ds.flat_map(functools.partial(read_images, rows_fn=downloaded_rows))
    ds = map_stage(ds, Scorer, s.resources, constructor_kwargs=dict(
        clip_model=s.clip_model, clip_pretrained=s.clip_pretrained, aesthetic_weights=s.aesthetic_weights,
        max_pixels=s.max_pixels, precision=s.precision, num_gpus=s.resources.num_gpus))
    done = commit_groups(ds, expected, finish_part, out=out, stage="score", kwargs={"out": out, "fp": fp},
                         progress=False)
    return {"parts_scored": len(done), "images_scored": sum(expected.values())}


def copies_identical(out: str) -> bool:
    groups = defaultdict(set)
    for r in manifest.read_manifest(out, ["sha256", "aesthetic"]).to_pylist():
        groups[r["sha256"]].add(r["aesthetic"])
    return all(len(v) == 1 for v in groups.values())


def step_alone(cfg, bodies: list[bytes], pick: list[int], batch: int, rounds: int) -> tuple[float, float]:
    """Seconds of the scoring step alone, in this process (no Ray, no start-up): the Scorer over every
    row vs ScoreOnce over the distinct images with their copies; best of `rounds`."""
    import pyarrow as pa

    from curation.score_once import ScoreOnce

    s = cfg.score
    kw = dict(clip_model=s.clip_model, clip_pretrained=s.clip_pretrained, aesthetic_weights=s.aesthetic_weights,
              max_pixels=s.max_pixels, precision=s.precision)
    once = ScoreOnce(**kw)
    every = once.scorer  # the same model instance: only the work differs
    rows = pa.table({"_part": [0] * len(pick), "key": [f"{i:06d}" for i in range(len(pick))],
                     "image": [bodies[j] for j in pick]})
    copies = defaultdict(list)
    for i, j in enumerate(pick):
        copies[j].append({"_part": 0, "key": f"{i:06d}"})
    owners = pa.table({"_part": [0] * len(copies), "key": [c[0]["key"] for c in copies.values()],
                       "image": [bodies[j] for j in copies], "copies": list(copies.values())})
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for k, (fn, t) in enumerate(((every, rows), (once, owners))):
            t0 = time.perf_counter()
            n = sum(fn(t.slice(o, batch)).num_rows for o in range(0, t.num_rows, batch))
            best[k] = min(best[k], time.perf_counter() - t0)
            assert n == len(pick)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--distinct", type=int, default=80)
    ap.add_argument("--side", type=int, default=640)
    ap.add_argument("--part-size", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", default=str(ROOT / "models" / "tiny"))
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    c = list(dd.COLOURS)
    bodies = [dd._jpeg(dd.synthetic(c[i % len(c)], c[(i + 3) % len(c)], dd.SHAPES[i % 3],
                                    (args.side, args.side * 3 // 4), i)) for i in range(args.distinct)]
    # rows pick their image round-robin with a stride: copies spread over parts and batches
    pick = [(i * 7) % args.distinct for i in range(args.rows)]
    items = [dd.Item(f"img_{i:05d}.jpg", bodies[j], f"row {i}") for i, j in enumerate(pick)]
    work = Path(tempfile.mkdtemp(prefix="oncebench"))
    t = args.tiny
    cfg = parse(PipelineConfig, {
        "name": "bench", "output": str(work / "base"), "input": {"path": str(work / "urls.parquet"),
                                                                "part_size": args.part_size},
        "download": {"processes": 2, "threads": 16, "timeout": 10, "allow_private_addresses": True},
        "score": {"clip_model": f"{t}/clip/model_config.json",
                  "clip_pretrained": f"{t}/clip/open_clip_model.safetensors",
                  "aesthetic_weights": f"{t}/aesthetic.pth", "precision": "fp32",
                  "resources": {"batch_size": args.batch_size}}})
    with dd.DemoServer(items) as srv:
        dd.write_url_list(srv, items, work / "urls.parquet", with_edge_rows=False)
        prepare_inputs(cfg.input, cfg.out)
        run_download(cfg, cfg.out, progress=False)
    best = {"every_row": float("inf"), "once": float("inf")}
    same = {}
    for _ in range(args.rounds):
        for mode in ("every_row", "once"):  # interleaved: the machine's load hits both alike
            out = str(work / mode)
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(cfg.out, out)
            t0 = time.perf_counter()
            summary = score_every_row(cfg, out) if mode == "every_row" else run_score(cfg, out, progress=False)
            best[mode] = min(best[mode], time.perf_counter() - t0)
            assert summary["images_scored"] == args.rows
            same[mode] = copies_identical(out)
    t_every, t_once = step_alone(cfg, bodies, pick, args.batch_size, args.rounds + 1)
    rate = {k: args.rows / v for k, v in best.items()}
    print(f"rows {args.rows}, distinct images {args.distinct} ({args.side}px JPEG), parts of {args.part_size}, "
          f"batch {args.batch_size}, tiny CLIP fp32 on CPU, best of {args.rounds}")
    print(f"every row scored (before) : {rate['every_row']:8.1f} rows/s  copies identical: {same['every_row']}")
    print(f"each sha256 once (now)    : {rate['once']:8.1f} rows/s  copies identical: {same['once']}")
    print(f"ratio now/before          : {rate['once'] / rate['every_row']:.3f}  "
          f"(model work {args.distinct}/{args.rows} = {args.distinct / args.rows:.2f} of before)")
    print(f"scoring step alone, in this process: every row {args.rows / t_every:8.1f} rows/s, each sha256 once "
          f"{args.rows / t_once:8.1f} rows/s, ratio {t_every / t_once:.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
