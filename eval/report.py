"""Markdown + JSON comparison of every scored run: <output>/eval/report.md and report.json.

One table compares checkpoints (FID and CMMD with their CIs, KID +- std, CLIP-Score with its CI,
reward means, N); a row is comparable with the first only when the protocol agrees (benchmark
checksum, FID protocol, extractor sha256, CLIP model, generation settings) AND the run has an
image for every prompt. Below: the protocol written out, per-stratum tables (aspect bucket x prompt
length; category for MJHQ-30K) and the preference studies (eval.prefreport: Fig. 9-style chart,
shares with CIs, win rates, Bradley-Terry, human-AI kappa).
"""
from __future__ import annotations

import json

from _sigma import fs
from _sigma.holdout import EVAL_DIR

# Protocol keys that must agree for two rows of the table to be comparable.
COMPARABLE = ("benchmark_checksum", "prompt", "fid_protocol", "fid_extractor", "fid_extractor_sha256",
              "clip_model", "clip_pretrained", "cmmd_model", "cmmd_pretrained")
GEN_COMPARABLE = ("sampler", "steps", "cfg_scale", "gen_seed", "resolution", "aspect")


def load_scores(out: str) -> list[dict]:
    d = fs.join(fs.normalize(out), EVAL_DIR, "scores")
    return [fs.read_json(fs.join(d, n)) for n in fs.listdir(d) if n.endswith(".json")]


def _key(s: dict) -> tuple:
    p = s["protocol"]
    g = p.get("generation", {})
    return tuple(p.get(k) for k in COMPARABLE) + tuple(g.get(k) for k in GEN_COMPARABLE)


def _f(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ci(ci, spec: str = ".4f") -> str:
    return "" if not ci else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _comparable(s: dict, base: dict) -> str:
    if _key(s) != _key(base):
        return "**no** (protocol differs)"
    if not s.get("comparable", True):
        return f"**no** ({s.get('incomparable_because')})"
    return "yes"


def _strata_table(s: dict, field: str, cols: tuple[str, ...]) -> list[str]:
    rows = s.get(field) or []
    if not rows:
        return []
    names = list(s.get("rewards", {}))
    head = [*cols, "n", "FID", "CLIP-Score", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(c)) for c in cols] + [str(r["n"]), _f(r.get("fid")), _f(r.get("clip_score"), ".3f")]
        cells += [_f(r.get(n), ".4f") for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def preference_section(out: str) -> list[str]:
    """Every preference study (eval.prefreport): Fig. 9-style chart, shares, win rates, BT, kappa."""
    from eval.prefreport import section

    return section(out)


def render(scores: list[dict], out: str | None = None) -> str:
    if not scores:
        return "# Eval report\n\nNo scored runs yet.\n"
    base = scores[0]
    bp, bg = base["protocol"], base["protocol"].get("generation", {})
    names = list(base.get("rewards", {}))
    lines = ["# Eval report", "",
             f"Benchmark `{bp['benchmark_version']}` ({bp['benchmark_source']}, checksum "
             f"`{bp['benchmark_checksum'][:16]}`), N = {base['n_benchmark']} prompts, one image per prompt. "
             f"Intervals: {int(100 * bp['ci'])} %, {bp['bootstrap']} resamples: FID and CMMD by half-sampling "
             "without duplicate images (median-centred, so an interval always contains its estimate), means by "
             "the percentile bootstrap over prompts (eval/README.md).", "",
             "| run | checkpoint | images | FID ↓ | CMMD ↓ | KID ↓ (± std) | CLIP-Score ↑ | "
             + "".join(f"{n} ↑ | " for n in names) + "comparable | scored at |",
             "|" + "---|" * (9 + len(names))]
    for s in scores:
        g = s["protocol"].get("generation", {})
        k = s.get("kid") or {}
        rw = "".join(f"{_f(s['rewards'].get(n, {}).get('mean'))}{_ci(s['rewards'].get(n, {}).get('ci'))} | "
                     for n in names)
        lines.append(f"| {s['run']} | `{g.get('checkpoint', '?')}` | {s['n_scored']}/{s['n_benchmark']} | "
                     f"{_f(s['fid'])}{_ci(s.get('fid_ci'))} | {_f(s.get('cmmd'))}{_ci(s.get('cmmd_ci'))} | "
                     f"{_f(k.get('kid'), '.5f')} ± {_f(k.get('kid_std'), '.5f')} | "
                     f"{_f(s['clip_score'], '.3f')}{_ci(s.get('clip_score_ci'), '.3f')} | {rw}"
                     f"{_comparable(s, base)} | {s['scored_at']} |")
    ref = bp["reference_set"]
    sha = bp.get("fid_extractor_sha256")
    lines += ["", "## Protocol (of the first run; rows marked 'no' differ)", "",
              f"- Benchmark: version `{bp['benchmark_version']}`, source `{bp['benchmark_source']}`, checksum "
              f"`{bp['benchmark_checksum']}`, N = {base['n_benchmark']}, prompt field `{bp['prompt']}`; "
              f"held out of training: {bp['hold_out_check']['held_out']} keys, none in the "
              f"{bp['hold_out_check']['training_shard_keys']} training-shard keys (checked at scoring)",
              f"- FID: protocol `{bp['fid_protocol']}` (eval/README.md says what it is comparable with), extractor "
              f"`{bp['fid_extractor']}`" + (f" sha256 `{sha}`" if sha else "") + f", N = {bp['N']} generated images vs "
              f"{ref['n_images']} reference images of `{ref['source']}`"
              + (f" at `{ref['path']}`" if ref.get("path") else "") + f" (failed {ref['failed']}, cache `{ref['cache']}`)",
              f"- KID: {bp['kid']}; CLIP-Score: {bp['clip_score']}; model `{bp['clip_model']}` / `{bp['clip_pretrained']}`",
              *([f"- CMMD: {bp['cmmd']['estimator']}, sigma {bp['cmmd']['sigma']}, x{bp['cmmd']['scale']:g}; model "
                 f"`{bp['cmmd']['cmmd_model']}` / `{bp['cmmd']['cmmd_pretrained']}` (comparable only with the same "
                 f"model), {bp['cmmd']['n_reference']} reference embeddings"] if bp.get("cmmd") else []),
              f"- Rewards: " + (", ".join(f"{k} (`{v}`)" for k, v in bp["rewards"].items()) or "none configured"),
              f"- Generation: sampler `{bg.get('sampler')}` (dpm = DPM-Solver++ 2M), {bg.get('steps')} steps, "
              f"cfg {bg.get('cfg_scale')}, seed of prompt j = {bg.get('gen_seed')} + j (rows ordered by bucket, key), "
              f"resolution {bg.get('resolution')} ({bg.get('aspect')}), T5 `{bg.get('t5')}` "
              f"(max {bg.get('max_length')} tokens), VAE `{bg.get('vae')}` (scale {bg.get('scale_factor')}), "
              f"precision {bg.get('precision')}",
              "- Versions: " + ", ".join(f"{k} {val}" for k, val in base["versions"].items())]
    if bp["fid_extractor"].startswith("tiny"):
        lines += ["", "> FID here uses the tiny random-weight extractor (tests/demo): the numbers only check the "
                      "plumbing and are not comparable with any published FID."]
    for s in scores:
        table = _strata_table(s, "strata", ("bucket", "length_bin"))
        if table:
            lines += ["", f"## Per stratum: `{s['run']}` (aspect bucket x prompt-length bin; compare a stratum "
                          "across runs, not strata with each other: FID is biased at small n)", ""] + table
        cats = _strata_table(s, "categories", ("category",))
        if cats:
            lines += ["", f"## Per category: `{s['run']}`", ""] + cats
    if out is not None:
        lines += preference_section(out)
    return "\n".join(lines) + "\n"


def write_report(out: str) -> str:
    scores = load_scores(out)
    d = fs.join(fs.normalize(out), EVAL_DIR)
    md = fs.join(d, "report.md")
    fs.write_text(md, render(scores, out))
    fs.write_text(fs.join(d, "report.json"), json.dumps({"runs": scores}, indent=2, default=str))
    return md
