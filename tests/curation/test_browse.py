"""curation.browse in a real headless Chromium (Debian's chromium + chromedriver, `make browser`).

The run is synthetic (curation.browse.sample: manifest, download tars, candidate pairs, report,
written through _sigma.manifest / _sigma.fs). Every number the page shows is checked against an
independent computation: DuckDB straight over the manifest parquet for filters, a plain loop for
the what-if selection, _sigma.buckets.assign for the buckets.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from _sigma import fs
from _sigma.images import iter_download_images
from curation.browse import sample
from curation.browse.app import serve
from curation.browse.filters import FilterError
from curation.browse.store import Run
from _sigma.buckets import assign

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAGE = 48
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return sample.make_run(str(tmp_path_factory.mktemp("browse") / "run"))


@pytest.fixture(scope="module")
def base(run, tmp_path_factory):
    srv = serve(run["out"], port=0, cache_dir=str(tmp_path_factory.mktemp("cache")), quiet=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def driver():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian chromium + chromedriver are not installed: run `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sigma-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
              "--window-size=1400,1000"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------------

def ddb_count(out: str, where: str) -> int:
    """The same WHERE clause straight over the manifest files (no browser code involved)."""
    glob = fs.join(out, "manifest", "part-*.parquet")
    return duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', union_by_name=true) WHERE {where}").fetchall()[0][0]


def counter(d, name: str) -> int:
    return int(d.execute_script(f"return document.body.dataset.{name} || '0'"))


def after(d, name: str, action, timeout: float = 20):
    """Do `action`, then wait until the page counter `name` (renders / whatifs) moved past its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = counter(d, name)
    action()
    WebDriverWait(d, timeout).until(lambda _: counter(d, name) > before)


def shot(d, path) -> None:
    d.save_screenshot(str(path))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f"{path}: not a non-empty PNG"


def grid_count(d) -> tuple[int, int]:
    from selenium.webdriver.common.by import By

    count = d.find_element(By.ID, "count").get_attribute("data-count")
    return int(count), len(d.find_elements(By.CSS_SELECTOR, "#grid .card"))


def open_page(d, url: str, counter_name: str = "renders") -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    d.get("about:blank")  # a fresh page load: a hash-only change would keep the old page and counters
    d.get(url)
    WebDriverWait(d, 20).until(lambda _: counter(d, counter_name) > 0)


def expected_whatif(rows, pairs, min_side, aes_min, max_ar, min_ar, t) -> list[dict]:
    """Rows select would keep: thresholds, then duplicates greedily in rank order (own loop)."""
    def passes(r):
        if r["status"] != "ok" or r["width"] is None:
            return False
        ratio = r["height"] / r["width"]
        return (min(r["width"], r["height"]) >= min_side and min_ar <= ratio <= max_ar
                and (aes_min is None or r["aesthetic"] >= aes_min))

    cand = [r for r in rows if passes(r)]
    keys = {r["key"] for r in cand}
    edges = [(a, b) for a, b, s, _ in pairs if s >= t and a in keys and b in keys]
    kept: set[str] = set()
    for r in sorted(cand, key=lambda r: (-r["width"] * r["height"], -r["aesthetic"], r["key"])):
        if not any((a == r["key"] and b in kept) or (b == r["key"] and a in kept) for a, b in edges):
            kept.add(r["key"])
    return [r for r in cand if r["key"] in kept]


# --- tests --------------------------------------------------------------------------------------

def test_grid_filters_sort_and_paging(driver, base, run, tmp_path):
    from selenium.webdriver.common.by import By

    d, out = driver, run["out"]
    open_page(d, base + "/#/rows")
    total, cards = grid_count(d)
    assert total == ddb_count(out, "true") == len(run["rows"]) and cards == min(PAGE, total)

    where = "aesthetic > 5 AND status = 'ok'"
    box = d.find_element(By.ID, "where")
    box.clear()
    box.send_keys(where)
    after(d, "renders", d.find_element(By.ID, "apply").click)
    n, cards = grid_count(d)
    assert n == ddb_count(out, where) and cards == min(PAGE, n) and 0 < n < total
    shot(d, tmp_path / "grid_filtered.png")

    for label, where in (("selected", "selected"),
                         ("rejected: duplicate", "list_contains(string_split(reject_reason, ';'), 'duplicate')"),
                         ("degenerate captions", "caption_status = 'degenerate'"),
                         ("over 300 T5 tokens", "caption_t5_tokens > 300")):
        btn = d.find_element(By.XPATH, f"//button[@class='preset' and text()='{label}']")
        after(d, "renders", btn.click)
        n, cards = grid_count(d)
        assert n == ddb_count(out, where) and cards == min(PAGE, n) and n > 0, label
    # the most common aspect bucket at 256 px (_sigma.buckets.assign), as its preset filters it
    ok = [r for r in run["rows"] if r["width"]]
    top_bucket, top_n = Counter(assign(r["width"], r["height"], 256)[0] for r in ok).most_common(1)[0]
    after(d, "renders", d.find_element(By.XPATH, f"//button[@class='preset' and text()='bucket {top_bucket}']").click)
    assert grid_count(d)[0] == top_n

    # sort by aesthetic, descending, over every row; then the second page
    after(d, "renders", d.find_element(By.XPATH, "//button[@class='preset' and text()='all rows']").click)
    from selenium.webdriver.support.ui import Select

    after(d, "renders", lambda: Select(d.find_element(By.ID, "sort")).select_by_value("aesthetic"))
    after(d, "renders", d.find_element(By.ID, "desc").click)
    first = d.find_element(By.CSS_SELECTOR, "#grid .card").get_attribute("data-key")
    best = max((r for r in ok), key=lambda r: (r["aesthetic"], r["key"]))
    assert first == best["key"]
    after(d, "renders", d.find_element(By.ID, "next").click)
    assert grid_count(d) == (total, total - PAGE)
    imgs = d.execute_script("return [...document.querySelectorAll('#grid img.thumb')].map(i => i.src)")
    assert imgs and all("/thumb/" in s for s in imgs)


def test_filter_box_refuses_anything_but_a_filter(driver, base, run):
    from selenium.webdriver.common.by import By

    d = driver
    open_page(d, base + "/#/rows")
    box = d.find_element(By.ID, "where")
    for where, expect in (("aesthetic >>> 2", "does not exist"),
                          ("key IN (SELECT column0 FROM read_csv('/etc/passwd'))", "disabled by configuration"),
                          ("length((SELECT string_agg(content, '') FROM read_text('/etc/passwd'))) > 0", "disabled"),
                          ("true; DROP TABLE m", "';' is not allowed"),
                          ("true) OR (true", "unbalanced parentheses")):
        box.clear()
        box.send_keys(where)
        after(d, "renders", d.find_element(By.ID, "apply").click)
        err = d.find_element(By.ID, "error")
        assert err.is_displayed() and expect in err.text, (where, err.text)
        assert "root:" not in d.page_source
    box.clear()
    box.send_keys("status = 'ok'")
    after(d, "renders", d.find_element(By.ID, "apply").click)
    assert not d.find_element(By.ID, "error").is_displayed()
    assert grid_count(d)[0] == ddb_count(run["out"], "status = 'ok'")  # the table is intact


def test_filters_cannot_reach_python_objects_or_files(run, tmp_path):
    """DuckDB's Python replacement scans would read a local variable named in a query; the store
    switches them off with file access."""
    import pyarrow as pa

    r = Run(run["out"])
    secret = pa.table({"s": ["do-not-show"]})  # noqa: F841 (a name a replacement scan would find)
    with pytest.raises(FilterError):
        r.count("exists (SELECT * FROM secret)")
    with pytest.raises(FilterError, match="disabled"):
        r.count(f"exists (SELECT * FROM read_parquet('{run['out']}/manifest/part-00000.parquet'))")
    with pytest.raises(FilterError):
        r.query("SET enable_external_access = true")
    assert r.count("true") == len(run["rows"])


def test_row_detail_and_broken_image(driver, base, run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = driver
    open_page(d, base + "/#/rows")
    first = d.find_element(By.CSS_SELECTOR, "#grid .card")
    key = first.get_attribute("data-key")
    after(d, "renders", first.find_element(By.CSS_SELECTOR, "a.thumblink").click)
    row = next(r for r in run["rows"] if r["key"] == key)
    assert d.find_element(By.ID, "caption-long").text == row["caption_long"]
    assert d.find_element(By.ID, "caption-short").text == row["caption_short"]
    assert d.find_element(By.ID, "caption-model").text == row["caption_model"]
    names = {th.text for th in d.find_elements(By.CSS_SELECTOR, "#columns th")}
    assert set(sample.SCHEMA.names) <= names and "bucket" in names
    WebDriverWait(d, 10).until(lambda _: d.execute_script("const i = document.getElementById('full'); "
                                                          "return i && i.complete && i.naturalWidth > 0"))
    shot(d, tmp_path / "row.png")

    after(d, "renders", lambda: d.get(base + f"/#/row/{run['broken']}"))
    err = d.find_element(By.ID, "image-error")
    assert "no longer decodes" in err.text and run["broken"] in err.text
    d.get(base + f"/image/{run['broken']}")  # the image URL itself is a page that says why
    assert "Image unavailable" in d.find_element(By.ID, "error-title").text
    assert "no longer decodes" in d.find_element(By.ID, "error-message").text


def test_duplicate_group_side_by_side(driver, base, run, tmp_path):
    from selenium.webdriver.common.by import By

    d = driver
    near = [r for r in run["rows"] if r["dup_kind"] == "near"]
    kept = Counter(r["duplicate_of"] for r in near).most_common(1)[0][0]
    member = next(r for r in near if r["duplicate_of"] == kept)
    open_page(d, base + f"/#/dups/{member['key']}")
    assert d.find_element(By.CSS_SELECTOR, "#dups-kept .card").get_attribute("data-key") == kept
    cards = d.find_elements(By.CSS_SELECTOR, "#dups-members .card")
    members = sorted(r["key"] for r in run["rows"] if r["duplicate_of"] == kept)
    assert sorted(c.get_attribute("data-key") for c in cards) == members
    assert ddb_count(run["out"], f"duplicate_of = '{kept}'") == len(cards)
    for c in cards:
        r = next(r for r in run["rows"] if r["key"] == c.get_attribute("data-key"))
        assert f"similarity {r['dup_similarity']:.4f}" in c.text
    pair_rows = d.find_elements(By.CSS_SELECTOR, "#dups-pairs tr")[1:]
    group = set(members) | {kept}
    expect = [p for p in run["pairs"] if p[0] in group or p[1] in group]
    assert len(pair_rows) == len(expect)
    assert {tr.find_elements(By.TAG_NAME, "td")[2].text for tr in pair_rows} == {f"{p[2]:.4f}" for p in expect}
    shot(d, tmp_path / "dups.png")


def test_whatif_sliders(driver, base, run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d, rows = driver, run["rows"]
    open_page(d, base + "/#/whatif", "whatifs")
    would = int(d.find_element(By.ID, "wi-would").get_attribute("data-count"))
    assert would == sum(r["selected"] for r in rows) == ddb_count(run["out"], "selected")  # = select's own result
    cfg = sample.SELECT
    after(d, "whatifs", lambda: d.find_element(By.ID, "wi-min_side").send_keys(*[Keys.ARROW_RIGHT] * 20))
    after(d, "whatifs", lambda: d.find_element(By.ID, "wi-dedup_threshold").send_keys(*[Keys.ARROW_LEFT] * 40))
    min_side = int(d.find_element(By.ID, "wi-min_side-val").get_attribute("value"))
    t = float(d.find_element(By.ID, "wi-dedup_threshold-val").get_attribute("value"))
    # several what-ifs may be in flight while keys arrive: wait for the one of the final values
    WebDriverWait(d, 20).until(lambda _: (lambda p: p.get("min_side") == min_side and p.get("dedup_threshold") == t)(
        json.loads(d.find_element(By.ID, "wi-would").get_attribute("data-params") or "{}")))
    assert min_side == cfg["min_side"] + 20 * 16 and t == pytest.approx(cfg["dedup_threshold"] - 0.04)
    keep = expected_whatif(rows, run["pairs"], min_side, cfg["aesthetic_min"], cfg["max_aspect_ratio"],
                           cfg["min_aspect_ratio"], t)
    assert int(d.find_element(By.ID, "wi-would").get_attribute("data-count")) == len(keep)
    buckets = {tr.get_attribute("data-bucket"): int(tr.find_elements(By.TAG_NAME, "td")[1].text)
               for tr in d.find_elements(By.CSS_SELECTOR, "#wi-buckets tr[data-bucket]")}
    expect = Counter(assign(r["width"], r["height"], 256)[0] for r in keep)
    assert {b: n for b, n in buckets.items() if n} == dict(expect)
    line = d.find_element(By.ID, "wi-set").text
    assert f"--set select.min_side={min_side}" in line and "--stages select" in line
    assert re.search(r"--set select\.dedup_threshold=0\.91\d*", line)
    assert d.find_elements(By.CSS_SELECTOR, "#wi-margins .card img")
    shot(d, tmp_path / "whatif.png")


def test_report_page(driver, base, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from curation.stats.table1 import PAPER_TABLE1

    d = driver
    open_page(d, base + "/#/report")
    rows = d.find_elements(By.CSS_SELECTOR, "#t1 tr")[1:]
    sources = Counter(tr.find_elements(By.TAG_NAME, "td")[0].text for tr in rows)
    assert sources == {"ours": 3, "paper": len(PAPER_TABLE1)}
    WebDriverWait(d, 10).until(lambda _: d.execute_script(
        "const i = [...document.querySelectorAll('#figures img')]; "
        "return i.length === 3 && i.every(x => x.complete && x.naturalWidth > 0)"))
    assert "Figure 6" in d.find_element(By.ID, "figures").text
    assert "sample-256" in d.find_element(By.ID, "eval").text and "321.5" in d.find_element(By.ID, "eval").text
    assert "select" in d.find_element(By.ID, "summary").text
    shot(d, tmp_path / "report.png")


def test_error_pages_for_missing_and_unfinished_runs(driver, tmp_path):
    from selenium.webdriver.common.by import By

    missing, empty = str(tmp_path / "nope"), tmp_path / "empty"
    empty.mkdir()
    for out, title, status, text in ((missing, "Cannot browse this run", 404, "no run folder"),
                                     (str(empty), "Cannot browse this run", 503, "no manifest yet")):
        srv = serve(out, port=0, cache_dir=str(tmp_path / "c"), quiet=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{srv.server_port}/"
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url)
            assert e.value.code == status
            driver.get(url)
            assert driver.find_element(By.ID, "error-title").text == title
            assert text in driver.find_element(By.ID, "error-message").text
            if out == str(empty):  # the run gets a manifest: the same server now shows it
                sample.make_run(out, parts=1, rows_per_part=10)
                assert urllib.request.urlopen(url).status == 200
        finally:
            srv.shutdown()
            srv.server_close()


def test_nothing_outside_the_run_is_served(base, run, tmp_path):
    outside = os.path.join(os.path.dirname(run["out"]), "secret.png")
    with open(outside, "w") as f:
        f.write("SECRET-OUTSIDE-THE-RUN")
    link = os.path.join(run["out"], "report", "link.png")
    if not os.path.lexists(link):
        os.symlink(outside, link)
    from curation.browse import report

    report._listed.clear()  # list the run again now: the symlink must be in the listing and still refused
    host, port = base.rsplit(":", 1)
    bad = ["/run/report/../../secret.png", "/run/report/..%2f..%2fsecret.png", "/run/%2e%2e/secret.png",
           "/run/report/link.png", "/run/manifest/part-00000.parquet", "/run//etc/passwd", "/run/%2fetc%2fpasswd",
           "/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/store.py", "/static//etc/passwd",
           "/thumb/..%2f..%2fetc%2fpasswd", "/thumb/00000_000000.jpg", "/image/..%2f..%2fsecret.png",
           "/api/row/..%2f..%2fetc", "/api/dups/00000_000000%00", "/thumb/00000_000000%0a", "/image/00000_000000%0A"]
    for path in bad:
        for _hop in range(2):  # werkzeug answers '//' with a redirect to the merged path: follow it once
            c = http.client.HTTPConnection(host.split("//")[1], int(port), timeout=10)
            c.request("GET", path)  # sent as is: no client-side normalisation of '..'
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status not in (301, 302, 307, 308):
                break
            path = urllib.parse.urlsplit(r.getheader("Location")).path
            assert path.startswith("/") and "://" not in r.getheader("Location").replace(base, "")
        assert r.status in (400, 404), (path, r.status)
        assert b"SECRET-OUTSIDE" not in body and b"root:" not in body and b"import " not in body, path
    assert urllib.request.urlopen(base + "/run/report/table1.csv").read().startswith(b"pipeline,dataset")


def test_s3_run_through_the_command_line(s3_bucket, run, tmp_path):
    """A run on S3 (moto server): `python -m curation.browse` binds 127.0.0.1 by default, counts
    match DuckDB over a local copy, thumbnails come from the tar on S3 through the index, and the
    bytes it reads are the ones _sigma.images.iter_download_images yields."""
    out = f"{s3_bucket}/runs/sample"
    remote = sample.make_run(out, parts=2, rows_per_part=12, seed=3, report=False)
    local = sample.make_run(str(tmp_path / "twin"), parts=2, rows_per_part=12, seed=3, report=False)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "curation.browse", "--output", out, "--port", "0",
                             "--cache-dir", str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO)
    try:
        url, lines = None, []
        deadline = time.time() + 60
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"at (http://[\d.]+:\d+/)", line)
            url = m.group(1) if m else None
        assert url and url.startswith("http://127.0.0.1:"), lines
        for where in ("true", "selected", "status = 'ok' AND aesthetic > 5"):
            q = urllib.parse.urlencode({"where": where})
            got = json.loads(urllib.request.urlopen(f"{url}api/rows?{q}").read())["count"]
            assert got == ddb_count(local["out"], where), where
        key = next(r["key"] for r in remote["rows"] if r["key"] in remote["images"] and r["key"] != remote["broken"])
        thumb = urllib.request.urlopen(f"{url}thumb/{key}")
        assert thumb.headers["Content-Type"] == "image/jpeg" and thumb.read()[:2] == b"\xff\xd8"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    from curation.browse.images import Images

    imgs = Images(out, str(tmp_path / "cache2"))
    for p in (0, 1):
        for k, data in iter_download_images(out, p):
            assert imgs.original(k) == data


def test_whatif_filter_sliders_follow_select(tmp_path):
    """The nsfw / watermark / clip_similarity sliders count what curation.select.reject_reasons
    (select's own rule) rejects on the same manifest; "null" turns a filter off."""
    import numpy as np
    import pyarrow as pa

    from _sigma import manifest
    from curation.browse import whatif
    from curation.config import SelectConfig
    from curation.select import reject_reasons

    out = sample.make_run(str(tmp_path / "run"), report=False)["out"]
    rng = np.random.default_rng(24)
    for p in manifest.list_parts(out):
        t = manifest.read_part(out, p)
        n = t.num_rows
        for col, lo, hi in (("nsfw", 0, 1), ("watermark", 0, 1), ("clip_similarity", -0.2, 0.5)):
            v = rng.uniform(lo, hi, n)
            t = t.append_column(col, pa.array([None if i % 9 == 4 else float(x) for i, x in enumerate(v)], pa.float64()))
        manifest.write_part(out, p, t, "score", "synthetic")
    rules = {"nsfw_max": 0.5, "watermark_max": 0.7, "clip_similarity_min": 0.1}
    run = Run(out)
    w = whatif.whatif(run, {k: str(v) for k, v in rules.items()})
    t = manifest.read_manifest(out)
    ref = reject_reasons(t, SelectConfig(**{k: v for k, v in sample.SELECT.items()}, **rules))
    assert w["passes"] == sum(r is None for r in ref) < sum(r is None for r in reject_reasons(t, SelectConfig(
        **sample.SELECT)))
    got = {r["reason"]: r["n"] for r in w["reasons"]}
    for reason in ("nsfw", "watermark", "low_clip_similarity"):
        assert got[reason] == sum(reason in (r or "").split(";") for r in ref) > 0
    assert "--set select.nsfw_max=0.5" in w["set_line"] and "--set select.clip_similarity_min=0.1" in w["set_line"]
    assert any(m["margin"] == "nsfw_max" and m["rows"] for m in w["margins"])
    off = whatif.whatif(run, {k: "null" for k in rules})
    assert off["passes"] == sum(r is None for r in reject_reasons(t, SelectConfig(**sample.SELECT)))
    assert run.info()["ranges"]["filters"] == {"nsfw": True, "watermark": True, "clip_similarity": True}
