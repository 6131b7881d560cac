"""A preference study: which prompts, which runs, in which order each prompt shows them.

The paper's protocol (PixArt-Sigma Sec. 4.1, Fig. 9): prompts drawn at random from the evaluation
set, every model's image for each prompt, people (and a VLM judge) say which is best on two separate
criteria: image quality, and how well the image matches the prompt. One study folder serves both
sources, so they judge the same prompts and their agreement can be measured:

  <output>/eval/preference/<name>/
    study.json          runs, prompt count, seed, benchmark version, questions (not served)
    key.json            the unblinding key: per prompt, which run is behind each neutral label (not served)
    site/index.html     the annotators' page (eval.preference_html); the ONLY folder the server reads
    site/img/<i>-<j>.png  image of label j for prompt i (neutral names, order drawn per prompt)
    votes/<annotator>.json  one answer per (prompt, question) per annotator (eval.prefserver)
    ai/<judge id>/       the AI judge's requests and answers (eval.judge)

Draw: the benchmark rows that have an image in every run, ordered by sha256(seed:key) (the
benchmark's own rank), the first n. Order of the images of prompt i: the runs sorted by
sha256(seed:order:key:run), so a run sits at each position about equally often.
"""
from __future__ import annotations

import hashlib
import json
import re

from _sigma import fs
from _sigma.holdout import EVAL_DIR

FORMAT = "sigma-preference-study/1"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # run, study and annotator names
# The two questions of the paper, asked separately. The wording is shown on the page.
QUESTIONS = {
    "quality": "Which image has the best image quality? Judge the picture itself (detail, sharpness, "
               "lighting, composition, no artefacts); ignore the prompt.",
    "alignment": "Which image matches the prompt best? Judge only how well its content follows the prompt "
                 "(objects, attributes, counts, relations, style).",
}


def studies_root(out: str) -> str:
    return fs.join(fs.normalize(out), EVAL_DIR, "preference")


def study_dir(out: str, name: str) -> str:
    if not NAME_RE.match(name) or name.startswith("."):
        raise ValueError(f"study name {name!r}: letters, digits, . _ - only")
    return fs.join(studies_root(out), name)


def default_name(runs: list[str]) -> str:
    name = "__".join(runs)
    return name if len(name) <= 64 else "study-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _rank(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big")


def check_runs(runs: list[str]) -> list[str]:
    runs = list(runs)
    if len(runs) < 2:
        raise ValueError(f"a study compares at least 2 runs, got {len(runs)}")
    for r in runs:
        if not NAME_RE.match(r) or r.startswith("."):
            raise ValueError(f"run name {r!r}: letters, digits, . _ - only")
    if len(set(runs)) != len(runs):
        raise ValueError(f"runs repeat: {runs}")
    return runs


def draw(rows: list[dict], have: list[set[str]], n: int, seed: int) -> list[dict]:
    """The first n benchmark rows (sha256(seed:key) order) that every run has an image for."""
    common = set.intersection(*have) if have else set()
    eligible = [r for r in rows if r["key"] in common]
    return sorted(eligible, key=lambda r: (_rank(seed, r["key"]), r["key"]))[:n]


def order_of(seed: int, key: str, runs: list[str]) -> list[str]:
    """Runs in the order prompt `key` shows them (label j = position j)."""
    return sorted(runs, key=lambda r: (_rank(seed, f"order:{key}:{r}"), r))


def ensure_study(cfg, runs: list[str], n: int = 300, seed: int = 0, name: str | None = None,
                 ranking: bool = False) -> str:
    """Write study.json + key.json (once); a rerun with the same settings returns the same study,
    other settings under the same name are refused. Returns the study folder."""
    from eval.build_benchmark import current
    from eval.generate import existing_keys, run_dir

    runs = check_runs(runs)
    if n < 1:
        raise ValueError(f"n: got {n}, allowed: >= 1")
    d = study_dir(cfg.out, name or default_name(runs))
    version, rows, _ = current(cfg)
    settings = {"runs": runs, "n_requested": n, "seed": seed, "benchmark_version": version, "ranking": ranking}
    if fs.isfile(fs.join(d, "study.json")):
        old = fs.read_json(fs.join(d, "study.json"))
        if {k: old.get(k) for k in settings} != settings:
            raise ValueError(f"{d} holds a study with other settings ({ {k: old.get(k) for k in settings} }); "
                             "pick another --name")
        return d
    have = [existing_keys(run_dir(cfg.out, r)) for r in runs]
    for r, h in zip(runs, have):
        if not h:
            raise ValueError(f"run {r!r} has no generated image under {run_dir(cfg.out, r)} (run eval.generate)")
    chosen = draw(rows, have, n, seed)
    if not chosen:
        raise ValueError(f"runs {runs} have no benchmark prompt with an image in every run")
    sid = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]  # names no run
    items = [{"i": i, "key": r["key"], "prompt": r["prompt"], "order": order_of(seed, r["key"], runs)}
             for i, r in enumerate(chosen)]
    fs.write_json(fs.join(d, "key.json"), {"format": FORMAT, "id": sid, "items": items})
    fs.write_json(fs.join(d, "study.json"), {"format": FORMAT, "id": sid, **settings, "n": len(items),
                                             "questions": list(QUESTIONS), "k": len(runs)})
    return d


def load(d: str) -> tuple[dict, dict]:
    """(study.json, key.json) of study folder d."""
    return fs.read_json(fs.join(d, "study.json")), fs.read_json(fs.join(d, "key.json"))


def image_source(cfg_out: str, run: str, key: str) -> str:
    from eval.generate import image_path, run_dir

    return image_path(run_dir(cfg_out, run), key)


def build_site(cfg, d: str) -> str:
    """Copy each prompt's images under neutral names and write the page; returns site/index.html."""
    from eval.preference_html import render

    study, key = load(d)
    site = fs.join(d, "site")
    have = {n for n in fs.listdir(fs.join(site, "img"))}
    items = []
    for it in key["items"]:
        names = []
        for j, run in enumerate(it["order"]):
            name = f"{it['i']}-{j}.png"
            if name not in have:  # a rerun copies only what is missing
                fs.write_bytes(fs.join(site, "img", name), fs.read_bytes(image_source(cfg.out, run, it["key"])))
            names.append(f"img/{name}")
        items.append({"i": it["i"], "prompt": it["prompt"], "images": names})
    page = {"study": study["id"], "k": study["k"], "ranking": study["ranking"],
            "questions": [{"id": q, "text": QUESTIONS[q]} for q in study["questions"]], "items": items}
    html = fs.join(site, "index.html")
    fs.write_text(html, render(page))
    return html


def list_studies(out: str) -> list[str]:
    root = studies_root(out)
    return [fs.join(root, n) for n in sorted(fs.listdir(root)) if fs.isfile(fs.join(root, n, "study.json"))]
