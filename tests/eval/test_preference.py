"""The preference study: the draw, blind page, the allow-list server against raw HTTP requests (every
unblinding spelling), answer validation, and the numbers (shares, win rates, Bradley-Terry, kappa)
against independent computations (plain recounts, choix's BT fit, scipy, scikit-learn)."""
from __future__ import annotations

import http.client
import json
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from _sigma import fs
from eval import build_benchmark as bb
from eval import generate as g
from eval import prefstats as ps
from eval import prefstudy
from eval.prefserver import make_server
from evaldata import make_output, pipeline_cfg

COLOURS = {"ckpt-red": (220, 30, 30), "ckpt-green": (30, 200, 30), "ckpt-blue": (30, 30, 220)}


def make_study(tmp_path, n_bench=6, n=6, ranking=False, name=None):
    out = tmp_path / "run"
    make_output(out)
    cfg = pipeline_cfg(out, n=n_bench, aesthetic_quantile=0.0)
    bb.build(cfg)
    _, rows, _ = bb.current(cfg)
    for run, colour in COLOURS.items():
        for r in rows:
            g.save_png(np.full((40, 56, 3), colour, np.uint8), g.image_path(g.run_dir(str(out), run), r["key"]))
    d = prefstudy.ensure_study(cfg, list(COLOURS), n=n, seed=3, name=name, ranking=ranking)
    prefstudy.build_site(cfg, d)
    return cfg, d, rows


def colour_of(path) -> str:
    px = np.asarray(Image.open(path).convert("RGB"))[0, 0]
    return next(r for r, c in COLOURS.items() if tuple(px) == c)


def test_study_is_blind_random_and_idempotent(tmp_path):
    cfg, d, rows = make_study(tmp_path, n=5)
    study, key = prefstudy.load(d)
    assert study["n"] == 5 and study["k"] == 3 and study["runs"] == list(COLOURS)
    # the first 5 benchmark keys in sha256(3:key) order: recomputed here with hashlib
    import hashlib

    want = sorted((r["key"] for r in rows), key=lambda k: hashlib.sha256(f"3:{k}".encode()).digest()[:8])[:5]
    assert [it["key"] for it in key["items"]] == want
    html = fs.read_text(fs.join(d, "site", "index.html"))
    assert not any(r in html for r in COLOURS) and "key.json" not in html  # the page names no run
    assert sorted(fs.listdir(fs.join(d, "site"))) == ["img", "index.html"]  # the key is outside site/
    firsts = set()
    for it in key["items"]:  # label j of prompt i shows run order[j]'s image
        assert sorted(it["order"]) == sorted(COLOURS)
        firsts.add(it["order"][0])
        for j, run in enumerate(it["order"]):
            assert colour_of(fs.join(d, "site", "img", f"{it['i']}-{j}.png")) == run
    assert len(firsts) > 1  # orders differ between prompts
    assert prefstudy.ensure_study(cfg, list(COLOURS), n=5, seed=3) == d
    with pytest.raises(ValueError, match="other settings"):
        prefstudy.ensure_study(cfg, list(COLOURS), n=4, seed=3)
    with pytest.raises(ValueError, match="at least 2"):
        prefstudy.ensure_study(cfg, ["ckpt-red"], n=4)
    with pytest.raises(ValueError, match="letters"):
        prefstudy.ensure_study(cfg, ["ckpt-red", "../x"], n=4)


@pytest.fixture()
def served(tmp_path):
    cfg, d, rows = make_study(tmp_path, n=4)
    # decoys a path trick might reach: files beside and above site/
    fs.write_text(fs.join(d, "site", "secret.txt"), "x")
    srv = make_server(d)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield d, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """One GET with the request target sent byte for byte (no client-side normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


UNBLIND = ["/key.json", "/./key.json", "/../key.json", "/site/../key.json", "/img/../../key.json",
           "/img/..%2f..%2fkey.json", "/%2e%2e/key.json", "/%2E%2E/%2E%2E/key.json", "/img/%2e%2e/%2e%2e/key.json",
           "//key.json", "/.//key.json", "/key.json/", "/key.json?x=1", "/KEY.JSON", "/key%2ejson", "/k%65y.json",
           "/..\\key.json", "/img\\..\\..\\key.json", "\\key.json", "/study.json", "/votes/alice.json", "/votes/",
           "/votes", "/ai/", "/results.json", "/secret.txt", "/./secret.txt", "/img/", "/img", "/img/.", "/img/..",
           "/img/../index.html", "//index.html", "/./index.html", "/index.html/", "/index.html?", "/%69ndex.html",
           "/img//0-0.png", "/img/./0-0.png", "/img/0-0.png/", "/img/0-0.png?x", "/img/0-0%2epng", "/img%2f0-0.png",
           "/IMG/0-0.png", "http://x/key.json", "http://x/index.html", "*", "/img/9-9.png", "/img/0-3.png",
           "/choices/alice.json", "/pairs.json", "/api/answer", "/api/progress"]


def test_server_serves_only_the_page_and_images(served):
    d, port = served
    # something to find: a recorded vote and the key
    assert raw_get(port, "/")[0] == 200 and raw_get(port, "/index.html")[0] == 200
    code, body = raw_get(port, "/img/0-0.png")
    assert code == 200 and body == fs.read_bytes(fs.join(d, "site", "img", "0-0.png"))
    key_bytes = fs.read_bytes(fs.join(d, "key.json"))
    for target in UNBLIND:
        code, body = raw_get(port, target)
        assert code in (400, 404, 405, 501), (target, code)
        assert b"order" not in body and key_bytes[:40] not in body, target
    # http.client sends the path as given too (no normalisation): same answers
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for target in ("/./key.json", "/key.json/", "/.//key.json", "//key.json"):
        c.request("GET", target)
        r = c.getresponse()
        r.read()
        assert r.status == 404, target
    c.close()


def post(port, path, body, ctype="application/json"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, body=data, headers={"Content-Type": ctype})
    r = c.getresponse()
    out = (r.status, json.loads(r.read() or b"{}"))
    c.close()
    return out


def test_answers_are_validated_and_recorded_once(served):
    d, port = served
    study, key = prefstudy.load(d)
    sid = study["id"]
    ok = {"study": sid, "annotator": "alice", "item": 1, "question": "quality", "choice": 2}
    bad = [dict(ok, study="other"), dict(ok, annotator="../bob"), dict(ok, annotator=".hidden"), dict(ok, annotator=""),
           dict(ok, annotator="a" * 65), dict(ok, item=4), dict(ok, item=-1), dict(ok, item="1"), dict(ok, item=True),
           dict(ok, item=1.0), dict(ok, question="overall"), dict(ok, choice=3), dict(ok, choice=-1),
           dict(ok, choice=None), dict(ok, choice="left"), dict(ok, ranking=[0, 1, 2]), dict(ok, extra=1),
           {k: v for k, v in ok.items() if k != "item"}, [ok], "x", None]
    for b in bad:
        assert post(port, "/api/answer", b)[0] == 400, b
    assert post(port, "/api/answer", b"{not json")[0] == 400
    assert post(port, "/api/answer", ok, ctype="text/plain")[0] == 400
    assert post(port, "/api/../api/answer", ok)[0] == 404 and post(port, "//api/answer", ok)[0] == 404
    assert not fs.exists(fs.join(d, "votes", "alice.json"))  # nothing stored by the bad ones
    assert post(port, "/api/answer", ok) == (200, {"ok": True, "answers": 1})
    assert post(port, "/api/answer", dict(ok, choice=0))[0] == 409  # the step holds one vote: the first
    assert post(port, "/api/answer", dict(ok, question="alignment", choice=0))[0] == 200
    assert post(port, "/api/answer", dict(ok, annotator="bob", choice=1))[0] == 200
    # progress: only the asker's own steps, never choices
    code, prog = post(port, "/api/progress", {"study": sid, "annotator": "alice"})
    assert code == 200 and sorted(map(tuple, prog["done"])) == [(1, "alignment"), (1, "quality")]
    assert "choice" not in json.dumps(prog)
    assert post(port, "/api/undo", {"study": sid, "annotator": "alice", "item": 1, "question": "quality"})[1]["removed"]
    assert post(port, "/api/answer", dict(ok, choice=1))[0] == 200  # after the undo: the new answer counts
    doc = fs.read_json(fs.join(d, "votes", "alice.json"))
    assert {k: v["choice"] for k, v in doc["answers"].items()} == {"1:quality": 1, "1:alignment": 0}
    assert doc["undone"] == 1
    for target in ("/votes/alice.json", "/votes/bob.json", "/api/progress"):  # no GET of anyone's votes
        assert raw_get(port, target)[0] == 404


def test_ranking_study_validates_permutations(tmp_path):
    cfg, d, _ = make_study(tmp_path, n=3, ranking=True, name="ranked")
    srv = make_server(d, host="0.0.0.0")  # serve --host: reachable from other machines
    assert srv.server_address[0] == "0.0.0.0"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        sid = prefstudy.load(d)[0]["id"]
        base = {"study": sid, "annotator": "carol", "item": 0, "question": "alignment"}
        for r in ([0, 1], [0, 1, 1], [0, 1, 3], [2, 1, 0, 3], "012", [0.0, 1, 2]):
            assert post(port, "/api/answer", dict(base, ranking=r))[0] == 400, r
        assert post(port, "/api/answer", dict(base, choice=0))[0] == 400
        assert post(port, "/api/answer", dict(base, ranking=[2, 0, 1]))[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    study, key = prefstudy.load(d)
    comps = ps.human_comparisons(study, key, [fs.read_json(fs.join(d, "votes", "carol.json"))])
    order = key["items"][0]["order"]  # ranking [2, 0, 1]: label 2 > label 0 > label 1
    beats = {(c[3], c[4]) if c[5] == 1 else (c[4], c[3]) for c in comps}
    assert beats == {(order[2], order[0]), (order[2], order[1]), (order[0], order[1])}


# --- numbers ---------------------------------------------------------------------------------------

RUNS = ["m0", "m1", "m2", "m3"]
# A hand-made table: (prompt, winner, loser) or (prompt, a, b, "tie"); m3 loses mostly, m0 wins mostly,
# every model wins and loses at least once (strongly connected: a finite BT MLE exists).
TABLE = [(0, "m0", "m1"), (0, "m0", "m2"), (0, "m3", "m0"), (1, "m1", "m2"), (1, "m0", "m1"), (1, "m2", "m3"),
         (2, "m1", "m3"), (2, "m0", "m3"), (2, "m2", "m0"), (3, "m1", "m0"), (3, "m2", "m1"), (3, "m0", "m3"),
         (4, "m0", "m2"), (4, "m1", "m3"), (4, "m3", "m2"), (5, "m0", "m1"), (5, "m2", "m3"), (5, "m1", "m2"),
         (6, "m0", "m2", "tie"), (6, "m1", "m3", "tie"), (7, "m0", "m3")]


def _comps(table):
    pos = {r: i for i, r in enumerate(RUNS)}
    out = []
    for t in table:
        a, b = t[1], t[2]
        x, y = (a, b) if pos[a] < pos[b] else (b, a)
        s = 0.5 if len(t) == 4 else (1.0 if a == x else 0.0)
        out.append(("quality", t[0], "r", x, y, s))
    return out


def test_win_rates_shares_and_bt_against_independent_fits():
    res = ps.summarise(_comps(TABLE), RUNS, b=400, seed=1)
    # plain recount of the table
    for i, a in enumerate(RUNS):
        for j, b in enumerate(RUNS):
            if i == j:
                continue
            w = sum(1 for t in TABLE if len(t) == 3 and t[1:] == (a, b)) + 0.5 * sum(
                1 for t in TABLE if len(t) == 4 and {t[1], t[2]} == {a, b})
            n = sum(1 for t in TABLE if {t[1], t[2]} == {a, b})
            assert res["count"][i][j] == n
            assert (res["win_rate"][i][j] == pytest.approx(w / n)) if n else np.isnan(res["win_rate"][i][j])
    pts = {r: sum(1 for t in TABLE if len(t) == 3 and t[1] == r) + 0.5 * sum(1 for t in TABLE if len(t) == 4 and r in t)
           for r in RUNS}
    assert res["share"] == pytest.approx([pts[r] / len(TABLE) for r in RUNS])
    for s, (lo, hi) in zip(res["share"], res["share_ci"]):
        assert lo <= s <= hi and hi - lo < 0.5
    # Bradley-Terry: choix's published fit on the same data (a tie = one win each way, so the data is
    # every decisive comparison twice; the MLE is unchanged by doubling all counts)
    import choix

    data = [(RUNS.index(t[1]), RUNS.index(t[2])) for t in TABLE if len(t) == 3] * 2
    data += [p for t in TABLE if len(t) == 4 for p in ((RUNS.index(t[1]), RUNS.index(t[2])),
                                                       (RUNS.index(t[2]), RUNS.index(t[1])))]
    ref = choix.ilsr_pairwise(len(RUNS), data, alpha=0.0, max_iter=10000, tol=1e-12)
    assert not res["bt"]["regularised"]
    assert np.array(res["bt"]["log_strength"]) == pytest.approx(ref - ref.mean(), abs=1e-6)
    # and scipy on the log-likelihood written out
    from scipy.optimize import minimize

    W = np.array(res["wins"])

    def nll(t):
        t = np.r_[0.0, t]
        return -sum(W[i, j] * (t[i] - np.logaddexp(t[i], t[j])) for i in range(4) for j in range(4) if i != j)

    th = np.r_[0.0, minimize(nll, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x]
    p = np.exp(th) / np.exp(th).sum()
    assert res["bt"]["strength"] == pytest.approx(p, abs=1e-5)


def test_bt_without_finite_mle_is_regularised_and_named():
    table = [(0, "m0", "m1"), (1, "m0", "m2"), (2, "m1", "m2"), (3, "m0", "m1")]  # m0 never loses; m3 absent
    res = ps.summarise(_comps(table), RUNS, b=50)
    bt = res["bt"]
    assert bt["regularised"] and np.isnan(bt["strength"][3])
    assert bt["strength"][0] > bt["strength"][1] > bt["strength"][2] > 0


def test_ai_pairs_both_orders_ties_on_disagreement_and_position_bias():
    def rec(item, x, y, crit, order, verdict):
        a, b = (x, y) if order == 0 else (y, x)
        return {"id": f"{item}:{x}:{y}:{crit}:{order}", "item": item, "pair": [x, y], "criterion": crit,
                "order": order, "a": a, "b": b, "verdict": verdict, "raw": verdict}

    recs = [rec(0, "m0", "m1", "quality", 0, "A"), rec(0, "m0", "m1", "quality", 1, "B"),  # consistent: m0
            rec(1, "m0", "m1", "quality", 0, "A"), rec(1, "m0", "m1", "quality", 1, "A"),  # first slot twice -> tie
            rec(2, "m0", "m1", "quality", 0, "tie"), rec(2, "m0", "m1", "quality", 1, "B"),  # disagree -> tie
            rec(3, "m0", "m1", "quality", 0, "B"), rec(3, "m0", "m1", "quality", 1, "invalid"),  # incomplete
            rec(4, "m0", "m1", "quality", 0, "B")]  # other order missing
    comps, st = ps.ai_comparisons({r["id"]: r for r in recs})
    assert [(c[1], c[5]) for c in comps] == [(0, 1.0), (1, 0.5), (2, 0.5)]
    assert st["pairs_judged"] == 3 and st["pairs_incomplete"] == 2 and st["invalid"] == 1
    assert st["disagree_rate"] == pytest.approx(2 / 3) and st["position_bias_rate"] == pytest.approx(1 / 3)
    assert st["first_position_share"] == pytest.approx(3 / 7)  # A in 3 of the 7 decisive verdicts


def test_cohen_kappa_against_sklearn():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    human, ai = [], []
    for it in range(60):
        truth = rng.choice([1.0, 0.0, 0.5], p=[0.5, 0.35, 0.15])
        human.append(("alignment", it, "h1", "m0", "m1", truth))
        ai.append(("alignment", it, "ai", "m0", "m1", truth if rng.random() < 0.7 else rng.choice([1.0, 0.0, 0.5])))
    ai.append(("alignment", 99, "ai", "m0", "m1", 1.0))  # a unit only the AI judged: not counted
    k = ps.agreement(human, ai)["alignment"]
    lab = {1.0: "x", 0.0: "y", 0.5: "tie"}
    assert k["units"] == 60
    assert k["kappa"] == pytest.approx(cohen_kappa_score([lab[c[5]] for c in human], [lab[c[5]] for c in ai[:60]]))
    assert ps.agreement(human, [])["quality"] == {"units": 0, "kappa": None, "agreement": None}
