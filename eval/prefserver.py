"""The human study's server (`python -m eval.preference serve`): the page, its images, and answers.

Blindness by construction: a GET is answered only when its raw request target (exactly as it came
on the request line: no decoding, no dot-segment or slash clean-up) is one of an allow-list built at
start: `/`, `/index.html` and `/img/<i>-<j>.png` for the files of the study's site/img folder.
Every other spelling (`/./key.json`, `//index.html`, `/img/../..`, `/%69ndex.html`, `/img\\x`,
a trailing slash, a query string, an absolute URI) is a 404. The unblinding key and the votes live
outside site/ anyway, so even a bug here could not reach them.

Answers (POST, JSON, at most 16 KiB): `/api/answer` {study, annotator, item, question, choice |
ranking, t}, `/api/undo` {study, annotator, item, question}, `/api/progress` {study, annotator} ->
the annotator's own answered steps (never choices, never anyone else's). Anything malformed, an
unknown study / prompt / question / key, a choice outside the shown images, a ranking that is not a
permutation, an annotator name outside [A-Za-z0-9_.-]{1,64}: 400. An answer to a step already
answered: 409 (undo it first), so one (prompt, question) holds exactly one vote per annotator.
Each annotator's file `votes/<annotator>.json` is rewritten atomically (_sigma.fs) on each change.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from _sigma import fs
from eval.prefstudy import NAME_RE, load

MAX_BODY = 16 << 10
IMG_RE = re.compile(r"^\d{1,6}-\d{1,3}\.png$")
ANSWER_KEYS = {"study", "annotator", "item", "question", "choice", "ranking", "t"}
STEP_KEYS = {"study", "annotator", "item", "question"}


class BadRequest(ValueError):
    pass


def _int(v, name: str, hi: int) -> int:
    if type(v) is not int or not 0 <= v < hi:  # bool is an int subclass: refused by `type is`
        raise BadRequest(f"{name}: an integer in [0, {hi}) required")
    return v


class Recorder:
    """Validates answers against the study and keeps one atomically rewritten file per annotator."""

    def __init__(self, d: str):
        self.d = d
        self.study, key = load(d)
        self.n, self.k = len(key["items"]), self.study["k"]
        self.questions = list(self.study["questions"])
        self.lock = threading.Lock()
        self.docs: dict[str, dict] = {}

    def _check(self, v, keys: set[str], required: set[str]) -> str:
        if not isinstance(v, dict):
            raise BadRequest("a JSON object required")
        extra, missing = set(v) - keys, required - set(v)
        if extra or missing:
            raise BadRequest(f"unknown fields {sorted(extra)}" if extra else f"missing fields {sorted(missing)}")
        if v["study"] != self.study["id"]:
            raise BadRequest("unknown study (reload the page)")
        who = v["annotator"]
        if not isinstance(who, str) or not NAME_RE.match(who) or who.startswith("."):
            raise BadRequest("annotator: 1-64 letters, digits, . _ - (not starting with .)")
        if "item" in required:
            _int(v["item"], "item", self.n)
            if v["question"] not in self.questions:
                raise BadRequest(f"question: one of {self.questions}")
        return who

    def _doc(self, who: str) -> dict:
        if who not in self.docs:
            uri = fs.join(self.d, "votes", f"{who}.json")
            self.docs[who] = fs.read_json(uri) if fs.isfile(uri) else {
                "study": self.study["id"], "annotator": who, "answers": {}, "undone": 0}
        return self.docs[who]

    def _save(self, who: str) -> None:
        fs.write_json(fs.join(self.d, "votes", f"{who}.json"), self.docs[who])

    def answer(self, v) -> tuple[int, dict]:
        who = self._check(v, ANSWER_KEYS, STEP_KEYS)
        if self.study["ranking"]:
            r = v.get("ranking")
            if "choice" in v or not isinstance(r, list) or sorted(x if type(x) is int else -1 for x in r) != \
                    list(range(self.k)):
                raise BadRequest(f"ranking: a permutation of 0..{self.k - 1} required (and no choice)")
            rec = {"choice": r[0], "ranking": r}
        else:
            if "ranking" in v:
                raise BadRequest("this study asks for the best image only: no ranking")
            rec = {"choice": _int(v.get("choice"), "choice", self.k)}
        t = v.get("t")
        if t is not None and (not isinstance(t, str) or len(t) > 40):
            raise BadRequest("t: a timestamp string")
        step = f"{v['item']}:{v['question']}"
        with self.lock:
            doc = self._doc(who)
            if step in doc["answers"]:
                return 409, {"error": "already answered (undo it first)", "step": step}
            doc["answers"][step] = {"item": v["item"], "question": v["question"], **rec, "t": t,
                                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self._save(who)
            return 200, {"ok": True, "answers": len(doc["answers"])}

    def undo(self, v) -> tuple[int, dict]:
        who = self._check(v, STEP_KEYS, STEP_KEYS)
        step = f"{v['item']}:{v['question']}"
        with self.lock:
            doc = self._doc(who)
            removed = doc["answers"].pop(step, None) is not None
            if removed:
                doc["undone"] += 1
                self._save(who)
            return 200, {"ok": True, "removed": removed, "answers": len(doc["answers"])}

    def progress(self, v) -> tuple[int, dict]:
        who = self._check(v, {"study", "annotator"}, {"study", "annotator"})
        with self.lock:
            done = [[a["item"], a["question"]] for a in self._doc(who)["answers"].values()]
        return 200, {"done": done}


def make_server(d: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A threaded HTTP server for study folder `d` (not started: call serve_forever)."""
    d = fs.normalize(d)
    site = fs.join(d, "site")
    index = fs.join(site, "index.html")
    if not fs.isfile(index):
        raise FileNotFoundError(f"{index}: build the study first (python -m eval.preference build)")
    allow = {"/": (index, "text/html; charset=utf-8"), "/index.html": (index, "text/html; charset=utf-8")}
    for name in fs.listdir(fs.join(site, "img")):
        if IMG_RE.match(name):
            allow[f"/img/{name}"] = (fs.join(site, "img", name), "image/png")
    rec = Recorder(d)
    posts = {"/api/answer": rec.answer, "/api/undo": rec.undo, "/api/progress": rec.progress}

    class Handler(BaseHTTPRequestHandler):
        server_version = "sigma-preference"
        sys_version = ""

        def log_message(self, *args):  # quiet: annotators' requests are not worth a log line
            pass

        def _raw_target(self) -> str:
            # http.server rewrites a leading '//' in self.path; the request line keeps what was sent.
            parts = self.requestline.split(" ")
            return parts[1] if len(parts) == 3 else ""

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: dict) -> None:
            self._send(code, json.dumps(obj).encode())

        def do_GET(self):
            hit = allow.get(self._raw_target())
            if hit is None:
                return self._json(404, {"error": "not found"})
            try:
                data = fs.read_bytes(hit[0])
            except OSError:
                return self._json(404, {"error": "not found"})
            self._send(200, data, hit[1])

        def do_POST(self):
            fn = posts.get(self._raw_target())
            if fn is None:
                return self._json(404, {"error": "not found"})
            try:
                if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                    raise BadRequest("Content-Type: application/json required")
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit() or int(length) > MAX_BODY:
                    raise BadRequest(f"Content-Length of at most {MAX_BODY} bytes required")
                body = json.loads(self.rfile.read(int(length)) or b"null")
                code, obj = fn(body)
            except (BadRequest, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                return self._json(400, {"error": str(e)[:300]})
            self._json(code, obj)

    return ThreadingHTTPServer((host, port), Handler)


def serve(d: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    srv = make_server(d, host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"[eval.preference] study page: http://{shown}:{srv.server_address[1]}/ (bound to {host}; "
          "Ctrl-C stops)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
