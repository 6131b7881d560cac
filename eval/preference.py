"""Pairwise preference kit (PixArt-Sigma's main evaluation: people choose between two models).

  python -m eval.preference build --config pipelines.yaml --pipeline NAME --a RUN_A --b RUN_B [--n 300]
  python -m eval.preference serve --dir <page folder> [--port 8765]     # annotators open the URL
  python -m eval.preference winrate --dir <page folder> [downloaded.json ...]

`build` writes <out>/eval/preference/<A>__vs__<B>/: `index.html` (one prompt at a time, two
images side by side), `img/<i>-L.png` / `img/<i>-R.png` (neutral names: the page never says which
model made which image; sides are drawn per prompt from sha256(seed:key)), and `pairs.json`, the
unblinding key the page does not load. Prompts are the first n benchmark prompts (in sha256(seed:key)
order) that both runs have images for.

Recording: each click (or key: 1 / left arrow = left, t = tie, 2 / right arrow = right) is POSTed to
the small local server (`serve`, 127.0.0.1 only), which keeps one atomically rewritten
`choices/<annotator>.json` per annotator (through _sigma.fs: local or object store). Opened
without the server (file://), the page keeps choices in the browser and offers them as a JSON
download in the same format; `winrate` takes such files as extra arguments.

`winrate` unblinds with pairs.json, keeps each annotator's last vote per prompt, and reports the
win rate of A = (wins + ties / 2) / votes with a percentile bootstrap CI over prompts (votes on the
same prompt move together) and the Wilson interval of the decisive votes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re

import numpy as np

from _sigma import fs
from _sigma.holdout import EVAL_DIR

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def pages_root(out: str) -> str:
    return fs.join(fs.normalize(out), EVAL_DIR, "preference")


def _side(seed: int, key: str) -> int:
    return hashlib.sha256(f"{seed}:side:{key}".encode()).digest()[0] & 1


def build_page(cfg, a: str, b: str, n: int = 300, seed: int = 0) -> str:
    """Write the page for runs a vs b; returns the page folder."""
    from eval.build_benchmark import current
    from eval.generate import existing_keys, image_path, run_dir
    from eval.stratify import rank

    for r in (a, b):
        if not NAME_RE.match(r):
            raise ValueError(f"run name {r!r}: letters, digits, . _ - only")
    out = cfg.out
    version, rows, info = current(cfg)
    da, db = run_dir(out, a), run_dir(out, b)
    both = existing_keys(da) & existing_keys(db)
    chosen = sorted((r for r in rows if r["key"] in both), key=lambda r: (rank(seed, r["key"]), r["key"]))[:n]
    if not chosen:
        raise ValueError(f"runs {a} and {b} have no benchmark prompt with an image in both")
    page = fs.join(pages_root(out), f"{a}__vs__{b}")
    pairs, items = [], []
    for i, r in enumerate(chosen):
        left, right = (a, b) if _side(seed, r["key"]) == 0 else (b, a)
        for side, run in (("L", left), ("R", right)):
            fs.write_bytes(fs.join(page, "img", f"{i}-{side}.png"), fs.read_bytes(image_path(run_dir(out, run), r["key"])))
        pairs.append({"i": i, "key": r["key"], "prompt": r["prompt"], "left": left, "right": right})
        items.append({"i": i, "prompt": r["prompt"], "left": f"img/{i}-L.png", "right": f"img/{i}-R.png"})
    page_id = hashlib.sha256(f"{a}|{b}|{seed}|{version}".encode()).hexdigest()[:12]  # neutral: names no run
    fs.write_json(fs.join(page, "pairs.json"), {"page": page_id, "a": a, "b": b, "seed": seed,
                                                "benchmark_version": version, "pairs": pairs})
    fs.write_text(fs.join(page, "index.html"), _html(page_id, items))
    return page


def _html(page_id: str, items: list[dict]) -> str:
    from eval.preference_html import TEMPLATE

    data = json.dumps({"page": page_id, "items": items}, ensure_ascii=False).replace("</", "<\\/")
    return TEMPLATE.replace("__DATA__", data)


# --- recording server ---------------------------------------------------------------------------

def make_server(page: str, host: str = "127.0.0.1", port: int = 0):
    """A ThreadingHTTPServer serving `page` (via _sigma.fs) and recording POST /api/choice."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    lock = threading.Lock()
    votes: dict[str, dict] = {}
    page_id = fs.read_json(fs.join(page, "pairs.json"))["page"]
    types = {"html": "text/html; charset=utf-8", "png": "image/png", "json": "application/json"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?", 1)[0].lstrip("/") or "index.html"
            if path == "pairs.json" or ".." in path or not re.fullmatch(r"[A-Za-z0-9_./-]+", path):
                return self._send(404, b'{"error": "not found"}')  # never serve the unblinding key
            try:
                data = fs.read_bytes(fs.join(page, *path.split("/")))
            except (FileNotFoundError, OSError):
                return self._send(404, b'{"error": "not found"}')
            self._send(200, data, types.get(path.rsplit(".", 1)[-1], "application/octet-stream"))

        def do_POST(self):
            if self.path != "/api/choice":
                return self._send(404, b'{"error": "not found"}')
            try:
                v = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length", 0)), 1 << 16)))
                who, i, choice = str(v["annotator"]), int(v["i"]), str(v["choice"])
                if not NAME_RE.match(who) or choice not in ("left", "right", "tie") or i < 0:
                    raise ValueError("bad vote")
            except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
                return self._send(400, json.dumps({"error": str(e)[:200]}).encode())
            with lock:
                doc = votes.setdefault(who, _load_votes(page, page_id, who))
                doc["choices"].append({"i": i, "choice": choice, "t": v.get("t")})
                fs.write_json(fs.join(page, "choices", f"{who}.json"), doc)
            self._send(200, b'{"ok": true}')

    return ThreadingHTTPServer((host, port), Handler)


def _load_votes(page: str, page_id: str, who: str) -> dict:
    uri = fs.join(page, "choices", f"{who}.json")
    if fs.isfile(uri):  # a restarted server continues the annotator's file
        return fs.read_json(uri)
    return {"page": page_id, "annotator": who, "choices": []}


# --- win rates ----------------------------------------------------------------------------------

def win_rates(pairs_doc: dict, choice_docs: list[dict], b: int = 2000, ci: float = 0.95, seed: int = 0) -> dict:
    """Unblinded win rate of run A over run B with a bootstrap CI over prompts and a Wilson CI."""
    side = {p["i"]: p for p in pairs_doc["pairs"]}
    last: dict[tuple[str, int], str] = {}
    for doc in choice_docs:
        if doc.get("page") not in (None, pairs_doc["page"]):
            raise ValueError(f"choices of page {doc.get('page')!r} given for page {pairs_doc['page']!r}")
        for c in doc.get("choices", []):
            if c.get("i") in side and c.get("choice") in ("left", "right", "tie"):
                last[(str(doc.get("annotator")), int(c["i"]))] = c["choice"]
    a = pairs_doc["a"]
    score: dict[int, list[float]] = {}  # prompt -> A's points per vote (1 win, 0.5 tie, 0 loss)
    wins_a = wins_b = ties = 0
    for (_, i), ch in last.items():
        if ch == "tie":
            pts, ties = 0.5, ties + 1
        else:
            won = side[i]["left" if ch == "left" else "right"]
            pts = 1.0 if won == a else 0.0
            wins_a, wins_b = wins_a + (won == a), wins_b + (won != a)
        score.setdefault(i, []).append(pts)
    votes = wins_a + wins_b + ties
    res = {"a": a, "b": pairs_doc["b"], "votes": votes, "prompts": len(score), "annotators": len({w for w, _ in last}),
           "wins_a": wins_a, "wins_b": wins_b, "ties": ties, "win_rate_a": None, "ci": None, "wilson_decisive": None,
           "ci_level": ci}
    if not votes:
        return res
    res["win_rate_a"] = (wins_a + 0.5 * ties) / votes
    prompts = sorted(score)
    sums = np.array([sum(score[i]) for i in prompts])
    counts = np.array([len(score[i]) for i in prompts])
    rng = np.random.default_rng(seed)
    boot = [sums[idx].sum() / counts[idx].sum() for idx in (rng.integers(0, len(prompts), len(prompts)) for _ in range(b))]
    lo = (1 - ci) / 2
    res["ci"] = [float(np.quantile(boot, lo)), float(np.quantile(boot, 1 - lo))]
    if wins_a + wins_b:
        res["wilson_decisive"] = wilson(wins_a, wins_a + wins_b, ci)
    return res


def wilson(k: int, n: int, ci: float = 0.95) -> list[float]:
    from scipy.stats import norm

    z = norm.ppf(1 - (1 - ci) / 2)
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(c - h), float(c + h)]


def list_pages(out: str) -> list[dict]:
    root = pages_root(out)
    pages = []
    for name in fs.listdir(root):
        pj = fs.join(root, name, "pairs.json")
        if fs.isfile(pj):
            doc = fs.read_json(pj)
            pages.append({"dir": fs.join(root, name), "html": fs.join(root, name, "index.html"), "a": doc["a"],
                          "b": doc["b"], "pairs": len(doc["pairs"])})
    return pages


def win_rates_of_page(page: dict | str, extra: list[str] = ()) -> dict:
    d = page["dir"] if isinstance(page, dict) else fs.normalize(page)
    pairs_doc = fs.read_json(fs.join(d, "pairs.json"))
    docs = [fs.read_json(fs.join(d, "choices", n)) for n in fs.listdir(fs.join(d, "choices")) if n.endswith(".json")]
    docs += [fs.read_json(p) for p in extra]
    return win_rates(pairs_doc, docs)


def main(argv=None):
    from curation.config import add_pipeline_args, pipeline_from_args

    ap = argparse.ArgumentParser(description="Pairwise preference pages and win rates.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = add_pipeline_args(sub.add_parser("build"))
    b.add_argument("--a", required=True)
    b.add_argument("--b", required=True)
    b.add_argument("--n", type=int, default=300)
    b.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, default=8765)
    w = sub.add_parser("winrate")
    w.add_argument("--dir", required=True)
    w.add_argument("files", nargs="*", help="choices downloaded from the page (JSON)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        cfg = pipeline_from_args(args, save=False)  # the page folder records its own inputs
        page = build_page(cfg, args.a, args.b, args.n, args.seed)
        print(f"[eval.preference] page: {fs.join(page, 'index.html')}\n  serve it: python -m eval.preference serve "
              f"--dir {page}", flush=True)
        return page
    if args.cmd == "serve":
        srv = make_server(fs.normalize(args.dir), port=args.port)
        print(f"[eval.preference] http://127.0.0.1:{srv.server_address[1]}/ (Ctrl-C to stop)", flush=True)
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            srv.server_close()
        return None
    res = win_rates_of_page(args.dir, args.files)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
