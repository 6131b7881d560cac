"""The AI preference study (`python -m eval.preference judge`; the paper's GPT-4V comparison).

For a study (eval.prefstudy) a vision-language model gets two images per request, one prompt per
criterion (the prompts below; eval/README.md writes them out), and answers A, B or tie. Every pair
of runs on every prompt is asked in BOTH orders: a pair whose two verdicts disagree counts as a tie,
and the share of pairs where the same position won both times is the position-bias rate
(eval.prefstats). Answers are parsed strictly (`parse_answer`): anything but a bare A / B / tie (or a
last line `Answer: A`) is `invalid`, kept with its raw text, never a vote.

Storage and resume: `<study>/ai/<judge id>/judge.json` (engine, model, prompts) and records in
`records/<n>-<random>.jsonl` chunks, each one atomic write (_sigma.fs) of up to `flush_every`
answers: request id, pair, order, criterion, the request as sent (image data URLs replaced by
their source and sha256), raw answer, verdict, or the transport error. A rerun asks only the
requests without an answer (never answered, or failed); a killed run loses at most one chunk.
The judge id is a hash of what changes an answer (engine, model, prompts, answer mode, max_tokens,
temperature, image size), so another model or prompt is another folder, not a mix.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import uuid

from _sigma import fs
from eval.judge_engines import ANSWERS, make_engine
from eval.prefstudy import image_source, load

CRITERIA = ("quality", "alignment")
INTRO = {
    "quality": ("You are an expert judge of AI-generated images. Compare the image quality of two images, "
                "Image A and Image B: visual appeal, detail, sharpness, lighting, colour, composition, and "
                "freedom from artefacts such as distorted anatomy, malformed objects, garbled text or noise. "
                "Judge only image quality; ignore what the images depict and any prompt."),
    "alignment": ("You are an expert judge of AI-generated images. Both images, Image A and Image B, were "
                  "generated from the text prompt below. Compare how well each image matches the prompt: "
                  "the objects, their attributes and colours, counts, spatial relations, text and style it "
                  "asks for. Judge only image-text alignment; ignore image quality unless it hides content."
                  "\n\nPrompt: \"{prompt}\""),
}
QUESTION = {"quality": "Which image has the better image quality?",
            "alignment": "Which image matches the prompt better?"}
INSTRUCTION = "Answer with exactly one word: A, B, or tie."

_PREFIX = r"(?:(?:final\s+)?(?:answer|verdict|choice)\s*[:=\-]\s*)"
_ONE = re.compile(rf"^{_PREFIX}?(?:image\s+)?(a|b|tie)$", re.I)
_LAST = re.compile(rf"^{_PREFIX}(?:image\s+)?(a|b|tie)$", re.I)


def parts(criterion: str, prompt: str) -> list[tuple[str, str | int]]:
    """The request's content in order: text, image A, text, image B, question."""
    return [("text", INTRO[criterion].format(prompt=" ".join(prompt.split()))), ("text", "Image A:"), ("image", 0),
            ("text", "Image B:"), ("image", 1), ("text", f"{QUESTION[criterion]} {INSTRUCTION}")]


def _norm(s: str) -> str:
    s = s.strip().strip("*_`\"' ").strip()
    s = re.sub(r"^[(\[]\s*(.*?)\s*[)\]]$", r"\1", s)  # (A) / [B]
    return re.sub(r"[.!]+$", "", s).strip().strip("*_`\"' ").strip()


def parse_answer(text) -> str:
    """'A', 'B', 'tie' or 'invalid'. Accepted: the whole answer is one of the three words (any case,
    with markdown emphasis, quotes, brackets, a final period, an `Answer:` prefix or `Image `
    before the letter), or a multi-line answer whose LAST line is `Answer: X` / `Verdict: X` /
    `Final answer: X`. Everything else, including hedges ('A or B', 'both', 'A is better'), is invalid."""
    if not isinstance(text, str):
        return "invalid"
    lines = [ln for ln in (x.strip() for x in text.strip().splitlines()) if ln]
    if not lines:
        return "invalid"
    m = _ONE.match(_norm(lines[0])) if len(lines) == 1 else _LAST.match(_norm(lines[-1]))
    if not m:
        return "invalid"
    w = m.group(1).lower()
    return "tie" if w == "tie" else w.upper()


def judge_id(jc) -> str:
    what = {"engine": jc.engine, "model": jc.model, "answer": jc.answer, "max_tokens": jc.max_tokens,
            "temperature": jc.temperature, "image_max_side": jc.image_max_side, "prompts": prompts_text()}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", jc.model.rstrip("/").split("/")[-1])[:40] or "model"
    return f"{slug}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]}"


def prompts_text() -> dict:
    return {c: {"intro": INTRO[c], "question": QUESTION[c], "instruction": INSTRUCTION} for c in CRITERIA}


def plan(study: dict, key: dict, versus: str | None = None) -> list[dict]:
    """Every (prompt, pair of runs, criterion, order) to ask. versus: only pairs with that run
    (the paper's GPT-4V setting: PixArt-Sigma against each other model)."""
    runs = study["runs"]
    if versus is not None and versus not in runs:
        raise ValueError(f"--versus {versus!r} is not a run of the study ({runs})")
    jobs = []
    for it in key["items"]:
        for x, y in itertools.combinations(runs, 2):
            if versus is not None and versus not in (x, y):
                continue
            for c in CRITERIA:
                for order, (first, second) in enumerate(((x, y), (y, x))):
                    jobs.append({"id": f"{it['i']}:{x}:{y}:{c}:{order}", "item": it["i"], "key": it["key"],
                                 "pair": [x, y], "criterion": c, "order": order, "a": first, "b": second,
                                 "prompt": it["prompt"]})
    return jobs


def judge_dir(d: str, jid: str) -> str:
    return fs.join(d, "ai", jid)


def load_records(jd: str) -> dict[str, dict]:
    """Latest record per request id over every chunk (an answer beats an earlier error)."""
    best: dict[str, dict] = {}
    for name in fs.listdir(fs.join(jd, "records")):
        if not name.endswith(".jsonl") or name.startswith("."):
            continue
        for line in fs.read_text(fs.join(jd, "records", name)).splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            old = best.get(r["id"])
            if old is None or "error" in old or ("error" not in r and r["at"] >= old["at"]):
                best[r["id"]] = r
    return best


def run_judge(cfg, d: str, versus: str | None = None, flush_every: int = 32, progress: bool = True,
              limit: int | None = None) -> dict:
    """Ask every missing request of study d; returns a summary (counts of verdicts, errors, asked)."""
    jc = cfg.eval.judge
    study, key = load(d)
    jid = judge_id(jc)
    jd = judge_dir(d, jid)
    meta = {"judge_id": jid, "engine": jc.engine, "model": jc.model,
            "base_url": jc.base_url if jc.engine == "openai" else None, "answer": jc.answer,
            "max_tokens": jc.max_tokens, "temperature": jc.temperature, "image_max_side": jc.image_max_side,
            "prompts": prompts_text(), "study": study["id"], "versus": versus}
    if not fs.isfile(fs.join(jd, "judge.json")):
        fs.write_json(fs.join(jd, "judge.json"), meta)
    done = {k for k, r in load_records(jd).items() if "error" not in r}
    todo = [j for j in plan(study, key, versus) if j["id"] not in done][:limit]
    counts = {"asked": len(todo), "already": len(done), **{a: 0 for a in ANSWERS}, "invalid": 0, "error": 0}
    if not todo:
        return {"judge_id": jid, "dir": jd, **counts}
    engine = make_engine(jc)
    by_id = {j["id"]: j for j in todo}

    shas: dict[str, list[str]] = {}  # request id -> sha256 of the two images as read

    def loader(jid_: str, srcs: list[str]):
        def load():
            data = [fs.read_bytes(u) for u in srcs]
            shas[jid_] = [hashlib.sha256(b).hexdigest() for b in data]
            return data
        return load

    def jobs():
        for j in todo:
            srcs = [image_source(cfg.out, j["a"], j["key"]), image_source(cfg.out, j["b"], j["key"])]
            yield j["id"], parts(j["criterion"], j["prompt"]), loader(j["id"], srcs)

    buf: list[dict] = []

    def flush():
        if buf:
            name = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.jsonl"
            fs.write_text(fs.join(jd, "records", name), "".join(json.dumps(r) + "\n" for r in buf))
            buf.clear()

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"judge {jid}", disable=not progress)
    for jid_, res in engine.run(jobs()):
        j = by_id[jid_]
        rec = {k: j[k] for k in ("id", "item", "key", "pair", "criterion", "order", "a", "b")}
        rec["request"] = _request_record(jc, j, shas.pop(jid_, None))
        rec["at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
        if "error" in res:
            rec["error"] = res["error"]
            counts["error"] += 1
        else:
            rec.update(res)
            rec["verdict"] = parse_answer(res["raw"])
            counts[rec["verdict"]] += 1
        buf.append(rec)
        bar.update(1)
        if len(buf) >= flush_every:
            flush()
    flush()
    bar.close()
    return {"judge_id": jid, "dir": jd, **counts}


def _request_record(jc, j: dict, shas: list[str] | None) -> dict:
    """The request as sent, images named by source instead of inlined (the files are in the run
    folders; their sha256 pins the exact bytes)."""
    msg = []
    for kind, v in parts(j["criterion"], j["prompt"]):
        if kind == "text":
            msg.append({"type": "text", "text": v})
        else:
            run = j["a"] if v == 0 else j["b"]
            sha = f" sha256:{shas[v]}" if shas else ""
            msg.append({"type": "image_url", "image_url": {"url": f"run:{run}/{j['key']}.png{sha}"}})
    return {"model": jc.model, "engine": jc.engine, "messages": [{"role": "user", "content": msg}],
            "max_tokens": jc.max_tokens, "temperature": jc.temperature, "answer": jc.answer}


def list_judges(d: str) -> list[str]:
    root = fs.join(d, "ai")
    return [fs.join(root, n) for n in fs.listdir(root) if fs.isfile(fs.join(root, n, "judge.json"))]
