"""The app in a real browser: `streamlit run app/main.py` on 127.0.0.1 and Debian's chromium (headless,
through selenium and /usr/bin/chromedriver) open every page, wait for it to render, find no exception or
error element, and save a screenshot of each page. Nothing is downloaded; every wait is bounded; the server
is always killed. Set MOE_LENS_SCREENSHOTS=DIR to also copy the screenshots there (docs/screenshots)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from moe_lens.app_pages import PAGES as REGISTERED

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[1]
# the plotly charts each page must draw on sample_runs/; every registered page needs its number here
CHARTS = {"runs": 2, "load_balance": 3, "collapse": 2, "specialization": 3, "clusters": 1, "layers": 4, "literature": 7, "compare": 2,
          "sql": 0}
assert set(CHARTS) == {p.name for p in REGISTERED}, "CHARTS must name every page of moe_lens.app_pages.PAGES"
# url path, the page's title, the plotly charts it must draw
PAGES = [(p.url_path, p.title, CHARTS[p.name]) for p in REGISTERED]
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'

from selenium import webdriver  # noqa: E402  (installed by the README's ".[all]")
if not (CHROMIUM.exists() and DRIVER.exists()):
    msg = "Debian chromium + chromedriver not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg, allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("browser") / "sample_runs"  # what a fresh clone opens; a copy: no cache writes
    shutil.copytree(ROOT / "sample_runs", runs)
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
                             "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
                             "--browser.gatherUsageStats", "false", "--", "--runs-dir", str(runs)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MOE_LENS_CACHE": str(tmp_path_factory.mktemp("cache"))})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, f"streamlit did not start: see {log.name}"
            time.sleep(0.5)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1500,1100",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # WebGL (Clusters' scattergl) in software
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _rendered(driver, title: str, charts: int) -> bool:
    from selenium.webdriver.common.by import By

    if driver.find_elements(By.CSS_SELECTOR, ERRORS):
        return True  # rendered, with an error: the assertion below reports it
    titles = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "h1")]
    running = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] img, [data-testid="stSpinner"]')
    plots = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")
    return title in titles and len(plots) >= charts and not running


@pytest.mark.parametrize("path,title,charts", PAGES, ids=[p[1] for p in PAGES])
def test_page_in_browser(server: str, browser, path: str, title: str, charts: int, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/{path}")
    WebDriverWait(browser, 60, poll_frequency=0.5).until(lambda d: _rendered(d, title, charts))
    time.sleep(1.0)  # let plotly finish its transitions before the screenshot
    errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ERRORS)]
    assert not errors, errors
    shot = tmp_path / f"{path or 'runs'}.png"
    assert browser.save_screenshot(str(shot)) and 10_000 < shot.stat().st_size < 300_000  # docs/screenshots: small
    if os.environ.get("MOE_LENS_SCREENSHOTS"):
        out = Path(os.environ["MOE_LENS_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)
