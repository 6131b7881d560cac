"""Markdown + JSON comparison of every scored run: <output>/eval/report.md and report.json.

One table compares checkpoints; below it the protocol is written out in full (benchmark version and
checksum, N, prompt field, FID extractor, resize policy and side, CLIP model, sampler, steps, cfg,
seed, resolution, package versions). Runs whose protocol differs from the first run's are flagged
in the table: their numbers are not comparable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from eval.build_benchmark import EVAL_DIR

# Protocol keys that must agree for two rows of the table to be comparable.
COMPARABLE = ("benchmark_checksum", "prompt", "fid_extractor", "fid_resize", "fid_size", "clip_model",
              "clip_pretrained")
GEN_COMPARABLE = ("sampler", "steps", "cfg_scale", "gen_seed", "resolution", "aspect")


def load_scores(out: Path) -> list[dict]:
    d = Path(out) / EVAL_DIR / "scores"
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []


def _key(s: dict) -> tuple:
    p = s["protocol"]
    g = p.get("generation", {})
    return tuple(p.get(k) for k in COMPARABLE) + tuple(g.get(k) for k in GEN_COMPARABLE)


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render(scores: list[dict]) -> str:
    if not scores:
        return "# Eval report\n\nNo scored runs yet.\n"
    base = scores[0]
    bp, bg = base["protocol"], base["protocol"].get("generation", {})
    lines = ["# Eval report", "",
             f"Benchmark `{bp['benchmark_version']}` (checksum `{bp['benchmark_checksum'][:16]}`), "
             f"N = {base['n_benchmark']} prompts, one image per prompt.", "",
             "| run | checkpoint | images | FID ↓ | CLIP-Score ↑ | prompts > 77 tokens | comparable | scored at |",
             "|---|---|---|---|---|---|---|---|"]
    for s in scores:
        g = s["protocol"].get("generation", {})
        same = "yes" if _key(s) == _key(base) else "**no** (protocol differs)"
        lines.append(f"| {s['run']} | `{g.get('checkpoint', '?')}` | {s['n_scored']}/{s['n_benchmark']} | "
                     f"{_fmt(s['fid'], '.4f')} | {_fmt(s['clip_score'], '.3f')} | "
                     f"{100 * s['prompts_truncated_frac']:.1f} % | {same} | {s['scored_at']} |")
    v = base["versions"]
    lines += ["", "## Protocol (of the first run; rows marked 'no' differ)", "",
              f"- Benchmark: version `{bp['benchmark_version']}`, checksum `{bp['benchmark_checksum']}`, "
              f"N = {base['n_benchmark']}, prompt field `{bp['prompt']}`",
              f"- FID: {bp['fid_metric']}; extractor `{bp['fid_extractor']}`; resize `{bp['fid_resize']}` to "
              f"{bp['fid_size']}x{bp['fid_size']} ({bp['fid_interpolation']}); reference images "
              f"{bp['reference_images']} (failed {bp['reference_failed']}, cache `{bp['reference_cache']}`)",
              f"- CLIP-Score: {bp['clip_score']}; model `{bp['clip_model']}` / `{bp['clip_pretrained']}`",
              f"- Generation: sampler `{bg.get('sampler')}` (dpm = DPM-Solver++ 2M), {bg.get('steps')} steps, "
              f"cfg {bg.get('cfg_scale')}, seed of prompt j = {bg.get('gen_seed')} + j (rows ordered by bucket, key), "
              f"resolution {bg.get('resolution')} ({bg.get('aspect')}), T5 `{bg.get('t5')}` "
              f"(max {bg.get('max_length')} tokens), VAE `{bg.get('vae')}` (scale {bg.get('scale_factor')}), "
              f"precision {bg.get('precision')}",
              f"- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    if bp["fid_extractor"].startswith("tiny"):
        lines += ["", "> FID here uses the tiny random-weight extractor (tests/demo): the numbers only check the "
                      "plumbing and are not comparable with any published FID."]
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> Path:
    out = Path(out)
    scores = load_scores(out)
    d = out / EVAL_DIR
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.md", render(scores)),
                       ("report.json", json.dumps({"runs": scores}, indent=2))):
        tmp = d / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, d / name)
    return d / "report.md"
