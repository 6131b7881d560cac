"""The human study's page in headless Debian Chromium (Selenium): a 3-run study clicked through with
mouse clicks, double clicks, keys, key auto-repeat, a fast double key press and undos; the votes
the server recorded are checked against what was clicked (unblinded with the study's key)."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from _sigma import fs
from eval import prefstudy
from eval.prefserver import make_server
from test_preference import COLOURS, make_study

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None or shutil.which(DRIVER) is None,
                                reason="Debian chromium + chromium-driver missing: run `make browser`")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


def _ready(driver, wait, step: int):
    wait.until(lambda dr: dr.execute_script("return document.body.dataset.state") == "ready"
               and dr.execute_script("return document.body.dataset.step") == str(step))


def test_page_records_exactly_one_vote_per_step(tmp_path, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg, d, _ = make_study(tmp_path, n=4)
    study, key = prefstudy.load(d)
    items = key["items"]
    steps = [(it, q) for it in items for q in study["questions"]]  # the page's order: prompt, then question
    # What the "annotator" means to pick at each step (a run, so the check is unblinded): red is best
    # quality except on prompt 1, green matches best, except blue on prompt 2.
    want = []
    for it, q in steps:
        want.append("ckpt-red" if q == "quality" and it["i"] != 1 else "ckpt-blue" if q == "quality" else
                    "ckpt-blue" if it["i"] == 2 else "ckpt-green")
    srv = make_server(d)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    wait = WebDriverWait(driver, 30)

    def ready(step: int):
        _ready(driver, wait, step)

    def label(step: int, run: str) -> int:
        return steps[step][0]["order"].index(run)

    def keys(s: str):
        ActionChains(driver).send_keys(s).perform()

    try:
        driver.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        assert driver.title == "Image preference study"
        driver.find_element(By.ID, "annotator").send_keys("alice")
        driver.find_element(By.ID, "start").click()
        ready(0)
        assert driver.find_element(By.ID, "prompt").text == " ".join(items[0]["prompt"].split())
        assert "1 / 4" in driver.find_element(By.ID, "progress").text
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        # step 0: a double click on the image: one vote, and step 1 is not skipped
        ActionChains(driver).double_click(driver.find_element(By.ID, f"img-{label(0, want[0])}")).perform()
        ready(1)
        # step 1: a key
        keys(str(label(1, want[1]) + 1))
        ready(2)
        # step 2: auto-repeat keydowns of a held key (as the browser sends them) while the step is ready:
        # all ignored, nothing recorded, still step 2
        driver.execute_script("for (let n = 0; n < 5; n++) document.dispatchEvent(new KeyboardEvent('keydown', "
                              "{key: arguments[0], repeat: true, bubbles: true}));", str(label(2, want[2]) % 3 + 1))
        time.sleep(0.6)
        ready(2)
        assert len(fs.read_json(fs.join(d, "votes", "alice.json"))["answers"]) == 2
        # step 2: first a wrong answer, undone with the Undo button, then the right one; then a fast
        # double key press: one answer, the next step is not answered by the second press
        wrong = (label(2, want[2]) + 1) % 3
        driver.find_element(By.ID, f"btn-{wrong}").click()
        ready(3)
        driver.find_element(By.ID, "undo").click()
        ready(2)
        k = str(label(2, want[2]) + 1)
        keys(k + k)
        ready(3)
        # step 3: answer, undo with the `u` key, answer again by clicking the button
        driver.find_element(By.ID, f"img-{(label(3, want[3]) + 2) % 3}").click()
        ready(4)
        keys("u")
        ready(3)
        driver.find_element(By.ID, f"btn-{label(3, want[3])}").click()
        for s in range(4, len(steps)):  # the rest: alternate clicks and keys, a double click on a button
            ready(s)
            if s == 5:
                ActionChains(driver).double_click(driver.find_element(By.ID, f"btn-{label(s, want[s])}")).perform()
            elif s % 2:
                keys(str(label(s, want[s]) + 1))
            else:
                driver.find_element(By.ID, f"img-{label(s, want[s])}").click()
        wait.until(lambda dr: dr.execute_script("return document.body.dataset.state") == "done")
        assert driver.find_element(By.ID, "done").is_displayed()
        assert f"{len(steps)} / {len(steps)} answers saved" in driver.find_element(By.ID, "progress").text
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
        assert severe == []
    finally:
        srv.shutdown()
        srv.server_close()
    doc = fs.read_json(fs.join(d, "votes", "alice.json"))
    assert len(doc["answers"]) == len(steps) and doc["undone"] == 2
    got = {(a["item"], a["question"]): items[a["item"]]["order"][a["choice"]] for a in doc["answers"].values()}
    assert got == {(it["i"], q): w for (it, q), w in zip(steps, want)}
    # the screenshot shows the three images: red, green and blue regions
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for c in COLOURS.values():
        assert (np.abs(im - np.array(c)).sum(-1) < 40).sum() > 500, c


def test_ranking_page_records_full_rankings(tmp_path, driver):
    """build --ranking: each step is answered by clicking the images best to worst (the last one is
    implied); `u` first takes back a partial pick, then the previous answer."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg, d, _ = make_study(tmp_path, n=2, ranking=True, name="ranked")
    study, key = prefstudy.load(d)
    steps = [(it, q) for it in key["items"] for q in study["questions"]]
    want = ["ckpt-blue", "ckpt-red", "ckpt-green"]  # best to worst, every step
    srv = make_server(d)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    wait = WebDriverWait(driver, 30)
    try:
        driver.delete_all_cookies()
        driver.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        driver.find_element(By.ID, "annotator").send_keys("dora")
        driver.find_element(By.ID, "start").click()
        for s, (it, _) in enumerate(steps):
            _ready(driver, wait, s)
            lab = [it["order"].index(r) for r in want]
            if s == 1:  # a wrong first pick, taken back with `u` before the ranking is complete
                driver.find_element(By.ID, f"img-{lab[2]}").click()
                assert driver.find_element(By.ID, f"fig-{lab[2]}").text.startswith("#1")
                ActionChains(driver).send_keys("u").perform()
                _ready(driver, wait, 1)
                assert "#" not in driver.find_element(By.ID, f"fig-{lab[2]}").text
            driver.find_element(By.ID, f"img-{lab[0]}").click()
            ActionChains(driver).send_keys(str(lab[1] + 1)).perform()  # keys work as well
        wait.until(lambda dr: dr.execute_script("return document.body.dataset.state") == "done")
    finally:
        srv.shutdown()
        srv.server_close()
    doc = fs.read_json(fs.join(d, "votes", "dora.json"))
    assert len(doc["answers"]) == len(steps) and doc["undone"] == 0
    for a in doc["answers"].values():
        order = key["items"][a["item"]]["order"]
        assert [order[j] for j in a["ranking"]] == want and order[a["choice"]] == want[0]
