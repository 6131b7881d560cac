"""`make demo`: the whole pipeline on the built-in sample, offline, on CPU, in a few minutes.

Serves the sample (real photos from scikit-image / scikit-learn, generated images, bad inputs)
from a local HTTP server it starts and stops itself, then runs each step as the command a user
would type (printed before it runs), so the demo doubles as a walkthrough.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from curation import demo_data as dd



def _env() -> dict:
    env = dict(os.environ)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        env.setdefault(k, v)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def step(title: str, args: list[str], timings: list, root: Path) -> None:
    cmd = [sys.executable, "-m", *args]
    print(f"\n=== {title}\n$ python -m {shlex.join(args)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=root, env=_env(), check=True)
    timings.append((title, time.time() - t0))


def show_filters(out: Path, n: int = 12) -> None:
    """The score stage's filter columns and select's verdict: the rows each filter rejected, then
    some kept ones (the whole table: the browser, or the manifest with DuckDB)."""
    from collections import Counter

    from _sigma import manifest

    cols = ["key", "aesthetic", "nsfw", "watermark", "clip_similarity", "text_truncated", "selected", "reject_reason"]
    rows = [r for r in manifest.read_manifest(str(out), cols).to_pylist() if r.get("nsfw") is not None
            or r.get("watermark") is not None or r.get("clip_similarity") is not None]
    if not rows:
        return
    filt = ("nsfw", "watermark", "low_clip_similarity")
    reasons = Counter(x for r in rows for x in (r["reject_reason"] or "").split(";") if x in filt)
    hit = [r for r in rows if any(x in filt for x in (r["reject_reason"] or "").split(";"))]
    shown = hit + [r for r in rows if r["selected"]][: max(0, n - len(hit))]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\n=== score filters (tiny twins): rows rejected by them {dict(reasons)}; a few rows:")
    print(f"  {'key':<13} {'aesthetic':>9} {'nsfw':>6} {'watermark':>9} {'clip_sim':>8} {'trunc':>5}  verdict")
    for r in shown:
        print(f"  {r['key']:<13} {f(r['aesthetic']):>9} {f(r['nsfw']):>6} {f(r['watermark']):>9} "
              f"{f(r['clip_similarity']):>8} {str(r['text_truncated'])[:5]:>5}  "
              f"{'selected' if r['selected'] else 'rejected: ' + (r['reject_reason'] or '?')}")


def main(argv=None) -> int:
    from _sigma.cli import make_parser, user_error

    ap = make_parser("sigma-demo", __doc__)
    ap.add_argument("--config", default="pipelines.yaml", help="the config, relative to --root")
    ap.add_argument("--keep", action="store_true", help="keep runs/demo from a previous demo (resume)")
    ap.add_argument("--root", default=".", help="folder holding the config and models/tiny; runs/ goes there")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if not (root / args.config).is_file():
        return user_error("sigma-demo", f"--config {root / args.config}: no such file (run it where pipelines.yaml is, "
                                        "or give --root)")
    cfg = ["--config", args.config, "--pipeline", "demo"]
    data = root / "runs" / "demo-data"
    out = root / "runs" / "demo"
    if not args.keep:
        # The sample's URLs carry a fresh port each time, so a new demo starts from a clean folder.
        shutil.rmtree(out, ignore_errors=True)
    t_start, timings = time.time(), []
    items = dd.demo_items() + dd.bad_items()
    with dd.DemoServer(items) as srv:
        expect = dd.write_url_list(srv, items, data / "urls.parquet")
        print(f"serving {len(items)} sample files on {srv.base}; {len(expect)} URL rows -> {data / 'urls.parquet'}")
        step("curation: download, score, dedup, select, caption, eval_split (the held-out eval benchmark: its "
             "rows, byte copies, near copies and prompt twins never enter training)",
             ["curation.run", *cfg, "--stages", "download,score,dedup,select,caption,eval_split"], timings, root)
    show_filters(out)
    step("features: VAE latents + T5 embeddings into bucketed shards (every held-out key excluded)",
         ["curation.run", *cfg, "--stages", "features"], timings, root)
    tr = ["training.launch", "--config", args.config, "--stage"]
    step("training: weak-to-strong stage 1 (256 px, Ray Train)", [*tr, "demo-256"], timings, root)
    step("training: stage 2 (512 px, PE interpolation from the 256 px weights)", [*tr, "demo-512"], timings, root)
    step("training: stage 3 (512 px + KV compression, Conv Avg Init)", [*tr, "demo-512-kv"], timings, root)
    step("sampling: images from the last checkpoint (DPM-Solver, CFG 4.5)",
         ["training.sample", "--checkpoint", "runs/demo/train/demo-512-kv", "--t5", "models/tiny/t5",
          "--vae", "models/tiny/vae", "--prompt", "a red circle on a blue background", "--height", "512",
          "--width", "512", "--steps", "10", "--device", "cpu", "--out", str(out / "report" / "samples")], timings, root)
    for stage in ("demo-256", "demo-512", "demo-512-kv"):
        step(f"eval: generate the benchmark prompts with the {stage} checkpoint",
             ["eval.generate", *cfg, "--stage", stage, "--name", stage], timings, root)
    runs = ["--runs", "demo-512-kv", "demo-512", "demo-256", "--name", "demo-study"]
    step("eval: human preference study of the 3 checkpoints (image quality and prompt match asked separately, "
         "neutral labels, random order; annotators open `python -m eval.preference serve --dir "
         "runs/demo/eval/preference/demo-study`)", ["eval.preference", "build", *cfg, *runs], timings, root)
    step("eval: AI preference (the paper's GPT-4V study) with the tiny VLM in process: every pair in both orders",
         ["eval.preference", "judge", *cfg, "--study", "demo-study"], timings, root)
    step("eval: FID (protocol, bootstrap CI), KID, CLIP-Score, reward models, per-stratum tables",
         ["eval.score", *cfg, "--run", "demo-256", "--run", "demo-512-kv"], timings, root)
    step("eval: Table 3 in one command (KV-compression ablation: FID, CMMD, CLIP-Score on the same prompts; "
         "train / test latency interleaved in one process, labelled with the device)",
         ["eval.table3", *cfg, "--stage", "demo-512", "--stage", "demo-512-kv", "--stage", "demo-256",
          "--train-batch", "2", "--test-steps", "4", "--repeats", "2", "--device", "cpu"], timings, root)
    step("caption statistics (PixArt-Sigma Table 1 layout, with the paper's rows)",
         ["curation.stats", *cfg, "--paper", "--no-progress"], timings, root)
    print("\n=== demo finished in %.0f s" % (time.time() - t_start))
    for title, dt in timings:
        print(f"  {dt:7.1f} s  {title}")
    report = out / "eval" / "report.md"
    if report.exists():  # the eval report: protocol, CIs, per-stratum table, the preference page
        print(f"\n=== {report}\n" + "\n".join(report.read_text().splitlines()[:60]))
    table3 = out / "eval" / "table3" / "table3.md"
    if table3.exists():
        print(f"\n=== {table3}\n" + table3.read_text())
    print(f"outputs: {out}  (manifest/, shards/, report/, eval/, train/)")
    print(f"\nbrowse the run (grid, filters, duplicates, what-if selection, report) at http://127.0.0.1:8000/ :\n"
          f"  python -m curation.browse --output {out.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
