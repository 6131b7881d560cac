"""The pairwise preference kit: the page in headless Debian Chromium (Selenium), choices recorded
by the local server, sides randomised and blind, win rates with confidence intervals."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from _sigma import fs
from eval import build_benchmark as bb
from eval import generate as g
from eval import preference as pref
from evaldata import make_output, pipeline_cfg

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _runs(tmp_path):
    out = tmp_path / "run"
    make_output(out)
    cfg = pipeline_cfg(out, n=6, aesthetic_quantile=0.0)
    bb.build(cfg)
    _, rows, _ = bb.current(cfg)
    for name, colour in (("ckptx", (220, 30, 30)), ("ckpty", (30, 30, 220))):  # A = red, B = blue
        for r in rows:
            g.save_png(np.full((64, 48, 3), colour, np.uint8), g.image_path(g.run_dir(str(out), name), r["key"]))
    return out, cfg, rows


def test_page_is_blind_and_sides_are_randomised(tmp_path):
    out, cfg, rows = _runs(tmp_path)
    page = pref.build_page(cfg, "ckptx", "ckpty", n=6)
    pairs = fs.read_json(fs.join(page, "pairs.json"))
    html = fs.read_text(fs.join(page, "index.html"))
    assert "ckptx" not in html and "ckpty" not in html  # the page never names the models
    lefts = [p["left"] for p in pairs["pairs"]]
    assert set(lefts) == {"ckptx", "ckpty"}  # both sides occur (seeded per key)
    for p in pairs["pairs"]:  # the image on each side is that run's image
        left = np.asarray(Image.open(fs.join(page, "img", f"{p['i']}-L.png")))
        assert (left[0, 0, 0] > 128) == (p["left"] == "ckptx")
    assert pref.build_page(cfg, "ckptx", "ckpty", n=6) == page and fs.read_json(fs.join(page, "pairs.json")) == pairs


def test_win_rates_and_intervals():
    pairs = {"page": "p1", "a": "a", "b": "b",
             "pairs": [{"i": i, "left": "a" if i % 2 else "b", "right": "b" if i % 2 else "a"} for i in range(40)]}
    # annotator 1 prefers a on 30 prompts, b on 6, ties 4; a later vote replaces an earlier one
    votes = []
    for i in range(40):
        want = "a" if i < 30 else ("b" if i < 36 else None)
        side = "tie" if want is None else ("left" if pairs["pairs"][i]["left"] == want else "right")
        votes.append({"i": i, "choice": side})
    votes.insert(0, {"i": 0, "choice": "tie"})  # superseded
    res = pref.win_rates(pairs, [{"page": "p1", "annotator": "x", "choices": votes}], b=500)
    assert (res["wins_a"], res["wins_b"], res["ties"], res["votes"]) == (30, 6, 4, 40)
    assert res["win_rate_a"] == pytest.approx(32 / 40)
    assert res["ci"][0] < 0.8 < res["ci"][1] and res["ci"][1] - res["ci"][0] < 0.35
    lo, hi = res["wilson_decisive"]  # independent: Wilson interval of 30 / 36 written out
    z, n, p = 1.959963984540054, 36, 30 / 36
    c, h = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((c - h, c + h))
    with pytest.raises(ValueError, match="page"):
        pref.win_rates(pairs, [{"page": "other", "choices": []}])


@pytest.mark.skipif(shutil.which(CHROMIUM) is None or shutil.which(DRIVER) is None,
                    reason="Debian chromium + chromium-driver missing: run `make browser`")
def test_page_in_headless_chromium_records_choices(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, cfg, rows = _runs(tmp_path)
    page = pref.build_page(cfg, "ckptx", "ckpty", n=6)
    pairs = fs.read_json(fs.join(page, "pairs.json"))["pairs"]
    srv = pref.make_server(page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,800",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(url)
        assert "Which image" in driver.title
        driver.find_element(By.ID, "annotator").send_keys("alice")
        driver.find_element(By.ID, "start").click()
        wait = WebDriverWait(driver, 20)
        for step, p in enumerate(pairs):
            wait.until(lambda d: d.find_element(By.ID, "progress").text == f"{step + 1} / {len(pairs)}")
            assert driver.find_element(By.ID, "prompt").text == " ".join(p["prompt"].split())
            wait.until(lambda d: d.execute_script("return document.getElementById('right').complete "
                                                  "&& document.getElementById('right').naturalWidth > 0"))
            if step == 0:
                shot = tmp_path / "preference.png"
                driver.save_screenshot(str(shot))
            # always pick the red image (run A), except a tie on the last prompt
            if step == len(pairs) - 1:
                driver.find_element(By.ID, "btn-tie").click()
            else:
                driver.find_element(By.ID, "btn-left" if p["left"] == "ckptx" else "btn-right").click()
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
        wait.until(lambda d: fs.isfile(fs.join(page, "choices", "alice.json"))
                   and len(fs.read_json(fs.join(page, "choices", "alice.json"))["choices"]) == len(pairs))
        assert driver.find_element(By.ID, "status").get_attribute("textContent") == "saved"
        assert driver.get_log("browser") == [] or all(e["level"] != "SEVERE" for e in driver.get_log("browser"))
    finally:
        driver.quit()
        srv.shutdown()
        srv.server_close()
    # the screenshot shows the two images side by side: a red and a blue region
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[0] > 100 and im.shape[1] > 100
    red = ((im[..., 0] > 180) & (im[..., 2] < 80)).sum()
    blue = ((im[..., 2] > 180) & (im[..., 0] < 80)).sum()
    assert red > 500 and blue > 500, (red, blue)
    doc = fs.read_json(fs.join(page, "choices", "alice.json"))
    assert [c["i"] for c in doc["choices"]] == [p["i"] for p in pairs]
    res = pref.win_rates_of_page(page)
    assert (res["wins_a"], res["wins_b"], res["ties"]) == (len(pairs) - 1, 0, 1) and res["a"] == "ckptx"
    assert res["win_rate_a"] == pytest.approx((len(pairs) - 0.5) / len(pairs))
    # the unblinding key is never served
    import urllib.error
    import urllib.request

    srv2 = pref.make_server(page)
    threading.Thread(target=srv2.serve_forever, daemon=True).start()
    try:
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{srv2.server_address[1]}/pairs.json", timeout=5)
        bad = urllib.request.Request(f"http://127.0.0.1:{srv2.server_address[1]}/api/choice",
                                     data=json.dumps({"annotator": "../x", "i": 0, "choice": "left"}).encode(),
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=5)
        assert e.value.code == 400
    finally:
        srv2.shutdown()
        srv2.server_close()
