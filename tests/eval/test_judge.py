"""The AI judge in process (transformers, the tiny Llava of `make models`): every pair in both orders on
both criteria, strict parsing, every request and answer stored, resume asks only what is missing;
then the study's results and the Fig. 9 chart in the eval report."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from _sigma import fs
from _sigma.config import parse
from eval import judge as jg
from eval import prefstudy
from eval.config import JudgeConfig
from eval.prefserver import Recorder
from test_preference import make_study

# Answers the tiny random-weight Idefics3 gave through vLLM's OpenAI server (test_judge_vllm.py
# records them afresh on every run): byte soup in `free` mode, one of the words in `choice` mode.
RECORDED = {"\x15st\ufffdhow streetI": "invalid", "ked\x17 covered\ufffd^ pho blutain": "invalid", "tie": "tie"}
EDGE = {"A": "A", "b": "B", "Tie": "tie", "TIE.": "tie", " A\n": "A", "**B**": "B", "`A`": "A", "\"B\"": "B",
        "(A)": "A", "[b]": "B", "Image A": "A", "image b.": "B", "Answer: A": "A", "Final answer: tie": "tie",
        "Verdict - B": "B", "I compared both.\nThe left one is sharper.\nAnswer: A": "A",
        "A or B": "invalid", "Both": "invalid", "A is better": "invalid", "A, B": "invalid", "": "invalid",
        "   ": "invalid", "A\nB": "invalid", "Answer: A\nmaybe": "invalid", "C": "invalid", "equal": "invalid",
        "It's a tie": "invalid", "AB": "invalid", "Answer: A or B": "invalid", "The answer is A": "invalid",
        None: "invalid", 1: "invalid"}


def test_parse_answer_strict():
    for text, want in {**EDGE, **RECORDED}.items():
        assert jg.parse_answer(text) == want, repr(text)


def test_plan_every_pair_both_orders_both_criteria(tmp_path):
    _, d, _ = make_study(tmp_path, n=2)
    study, key = prefstudy.load(d)
    jobs = jg.plan(study, key)
    assert len(jobs) == 2 * 3 * 2 * 2 and len({j["id"] for j in jobs}) == len(jobs)
    for j in jobs:
        assert {j["a"], j["b"]} == set(j["pair"]) and (j["a"] == j["pair"][0]) == (j["order"] == 0)
    assert len(jg.plan(study, key, versus="ckpt-red")) == 2 * 2 * 2 * 2
    with pytest.raises(ValueError, match="not a run"):
        jg.plan(study, key, versus="nope")


def _judge_cfg(cfg, tiny, **kw):
    from dataclasses import replace

    jc = parse(JudgeConfig, {"engine": "hf", "model": str(tiny / "captioner"), "answer": "choice", **kw})
    return replace(cfg, eval=replace(cfg.eval, judge=jc))


def test_hf_judge_stores_everything_and_resumes(tmp_path, tiny_models):
    cfg, d, _ = make_study(tmp_path, n=3)
    cfg = _judge_cfg(cfg, tiny_models)
    study, key = prefstudy.load(d)
    total = len(jg.plan(study, key))  # 3 prompts x 3 pairs x 2 criteria x 2 orders = 36
    first = jg.run_judge(cfg, d, flush_every=4, progress=False, limit=10)  # a run cut short
    assert first["asked"] == 10 and first["already"] == 0
    jd = first["dir"]
    chunks = sorted(n for n in fs.listdir(fs.join(jd, "records")) if n.endswith(".jsonl"))
    assert len(chunks) == 3  # 4 + 4 + 2 answers, one atomic file each
    fs.delete(fs.join(jd, "records", chunks[0]))  # as if killed before that chunk was committed
    second = jg.run_judge(cfg, d, flush_every=4, progress=False)
    assert second["already"] == 6 and second["asked"] == total - 6
    assert jg.run_judge(cfg, d, progress=False)["asked"] == 0  # nothing missing: nothing asked
    recs = jg.load_records(jd)
    lines = sum(len(fs.read_text(fs.join(jd, "records", n)).splitlines()) for n in fs.listdir(fs.join(jd, "records")))
    assert set(recs) == {j["id"] for j in jg.plan(study, key)} and lines == total  # no gap, no duplicate
    for r in recs.values():
        assert r["verdict"] == jg.parse_answer(r["raw"]) and r["verdict"] in ("A", "B", "tie")
        assert set(r["scores"]) == {"A", "B", "tie"} and r["raw"] == max(r["scores"], key=r["scores"].get)
        msg = r["request"]["messages"][0]["content"]
        urls = [c["image_url"]["url"] for c in msg if c["type"] == "image_url"]
        for run, url in zip((r["a"], r["b"]), urls):  # image A is the first run of the order, sha256 pinned
            src = prefstudy.image_source(cfg.out, run, r["key"])
            assert url == f"run:{run}/{r['key']}.png sha256:{hashlib.sha256(fs.read_bytes(src)).hexdigest()}"
        text = " ".join(c["text"] for c in msg if c["type"] == "text")
        assert ("Prompt:" in text) == (r["criterion"] == "alignment")
    meta = fs.read_json(fs.join(jd, "judge.json"))
    assert meta["prompts"] == jg.prompts_text() and meta["model"] == str(tiny_models / "captioner")
    # another answer mode is another judge: a separate folder, asked from scratch
    other = jg.run_judge(_judge_cfg(cfg, tiny_models, answer="free", max_tokens=4), d, progress=False, limit=4)
    assert other["judge_id"] != first["judge_id"] and other["asked"] == 4
    fr = jg.load_records(other["dir"])
    assert all(r["verdict"] == jg.parse_answer(r["raw"]) for r in fr.values())


def test_results_chart_and_report(tmp_path, tiny_models):
    from eval import prefreport

    cfg, d, _ = make_study(tmp_path, n=4)
    cfg = _judge_cfg(cfg, tiny_models)
    jg.run_judge(cfg, d, progress=False)
    study, key = prefstudy.load(d)
    rec = Recorder(d)  # two annotators' answers through the server's own validation
    for who in ("ann1", "ann2"):
        for it in key["items"]:
            for q in study["questions"]:
                best = "ckpt-red" if (q == "quality") == (who == "ann1") else "ckpt-green"
                code, _ = rec.answer({"study": study["id"], "annotator": who, "item": it["i"], "question": q,
                                      "choice": it["order"].index(best)})
                assert code == 200
    fs.write_text(fs.join(d, "votes", "stray.json"), json.dumps({"study": "other", "annotator": "x", "answers": {}}))
    fs.write_text(fs.join(d, "votes", "torn.json"), '{"study": ')
    res = prefreport.write(d, b=200)
    h = res["sources"]["human"]
    assert h["annotators"] == 2 and h["answers"] == 16
    assert [x.split(":")[0] for x in h["skipped_files"]] == ["stray.json", "torn.json"]  # named, not fatal
    # quality: ann1 always red, ann2 always green -> 50 % each, blue 0 (plain recount of the votes)
    assert h["quality"]["share"] == pytest.approx([0.5, 0.5, 0.0]) and h["quality"]["comparisons"] == 16
    ai = [k for k in res["sources"] if k.startswith("ai:")]
    assert len(ai) == 1
    v = res["sources"][ai[0]]["verdicts"]
    assert v["requests"] == 4 * 3 * 2 * 2 and v["pairs_judged"] == 4 * 3 * 2 and v["invalid"] == 0
    assert sum(res["sources"][ai[0]]["quality"]["share"]) == pytest.approx(1.0)
    kap = res["kappa"][ai[0]]["quality"]
    assert kap["units"] == 4 * 3  # human units: pairs holding a chosen image (red-green twice, red-blue, green-blue)
    im = Image.open(fs.join(d, "fig9.png"))
    assert im.size[0] > 600 and im.size[1] > 300
    assert json.loads(fs.read_text(fs.join(d, "results.json")))["study"] == study["id"]
    # the eval report's section (eval.report calls it): the chart and the tables
    lines = "\n".join(prefreport.section(cfg.out))
    assert f"![preference shares](preference/{fs.basename(d)}/fig9.png)" in lines
    assert "Win rate, human" in lines and f"Agreement human vs {ai[0]}" in lines
    arr = np.asarray(im.convert("RGB")).astype(int)  # human bars blue, AI bars orange
    for c in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(arr - np.array(c)).sum(-1) < 30).sum() > 200, c


def test_openai_client_retries_auth_and_errors(tmp_path, monkeypatch):
    """A local endpoint: 503 is retried, the key from api_key_env is sent, a 400 is not retried and
    becomes the request's error (asked again by the next run), never a verdict."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from eval.judge_engines import OpenAIJudge

    seen = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            status, out = (503, b"busy") if len(seen) == 1 else (200, json.dumps(
                {"choices": [{"message": {"content": "Answer: B"}}], "usage": {"completion_tokens": 3}}).encode())
            if self.path.startswith("/bad"):
                status, out = 400, b'{"error": "unsupported"}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    buf = __import__("io").BytesIO()
    Image.new("RGB", (300, 100), (9, 9, 9)).save(buf, format="PNG")
    png = buf.getvalue()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        jc = parse(JudgeConfig, {"base_url": url + "/v1", "model": "m", "api_key_env": "MY_JUDGE_KEY", "retries": 2,
                                 "image_max_side": 64, "answer": "choice"})
        out = dict(OpenAIJudge(jc).run([("j1", jg.parts("alignment", "a cat"), lambda: [png, png])]))
        assert out["j1"]["raw"] == "Answer: B" and jg.parse_answer(out["j1"]["raw"]) == "B"
        assert len(seen) == 2 and seen[1][0] == "/v1/chat/completions" and seen[1][1] == "Bearer sk-test"
        body = seen[1][2]
        imgs = [c["image_url"]["url"] for c in body["messages"][0]["content"] if c["type"] == "image_url"]
        assert len(imgs) == 2 and all(u.startswith("data:image/png;base64,") for u in imgs)
        import base64

        assert Image.open(__import__("io").BytesIO(base64.b64decode(imgs[0].split(",", 1)[1]))).size == (64, 21)
        assert body["structured_outputs"] == {"choice": ["A", "B", "tie"]} and body["max_tokens"] == 16
        bad = parse(JudgeConfig, {"base_url": url + "/bad/v1", "model": "m", "retries": 3})
        res = dict(OpenAIJudge(bad).run([("j2", jg.parts("quality", "x"), lambda: [png, png])]))
        assert res["j2"]["error"].startswith("HTTPError: HTTP 400") and len(seen) == 3  # not retried
    finally:
        srv.shutdown()
        srv.server_close()
