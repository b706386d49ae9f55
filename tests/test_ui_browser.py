"""The web interface (/ui) in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium)
against a live server on 127.0.0.1. Each test runs a view's main path and checks what the page shows. The
generate, feature, steer and preset tests use the embedded model (`slow`); the key prompt uses the scripted engine.
Without a browser every test here skips, saying so; `make test` installs one where it can (as root, via apt)."""

import json
import shutil
import urllib.request

import pytest

from server_util import LiveServer

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no headless browser here: install Debian's "
                                "chromium and chromium-driver (`make test` does, as root, where apt-get works)")
WAIT_S = 120


def chrome(width: int = 1280, height: int = 800):  # noqa: ANN201
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


@pytest.fixture(scope="module")
def browser():
    driver = chrome()
    yield driver
    driver.quit()


def wait(driver, predicate, timeout: float = WAIT_S):  # noqa: ANN001, ANN201
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def by(driver, css: str):  # noqa: ANN001, ANN201
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def a_described_latent(server) -> tuple[str, int]:  # noqa: ANN001
    """The SAE's id and a latent with top contexts: the first one the search for a common word finds."""
    sae = get_json(server.url + "/v1/saes")["data"][0]["id"]
    hits = get_json(f"{server.url}/v1/saes/{sae}/search?q=the&n=5")["data"]
    return sae, hits[0]["index"]


@pytest.mark.slow
def test_generate_streams_tokens_and_a_click_lists_the_tokens_latents(server, browser):
    browser.get(server.url + "/ui/")
    wait(browser, lambda d: by(d, "#gen-run"))
    by(browser, "#gen-max")[0].clear()
    by(browser, "#gen-max")[0].send_keys("8")
    by(browser, "#gen-run")[0].click()
    wait(browser, lambda d: len(by(d, "#gen-out .tok.gen")) >= 8)
    assert by(browser, "#gen-out .tok.prompt")  # the prompt's tokens, with their latents, come first
    by(browser, "#gen-out .tok.gen")[2].click()
    rows = wait(browser, lambda d: by(d, "#gen-side table.latents a"))
    assert all(r.text.startswith("#") for r in rows) and len(rows) >= 2
    rows[0].click()  # a latent links to its feature page
    wait(browser, lambda d: by(d, "#feat-stats"))


@pytest.mark.slow
def test_a_feature_page_shows_contexts_histogram_and_similar_latents(server, browser):
    sae, index = a_described_latent(server)
    browser.get(f"{server.url}/ui/features/{sae}/{index}")
    wait(browser, lambda d: by(d, "#feat-contexts tr"))
    assert "density" in by(browser, "#feat-stats")[0].text
    headings = [e.text for e in by(browser, "h3")]
    assert "Activation histogram" in headings and by(browser, "svg.hist rect")  # the latent's own, not top contexts
    assert by(browser, "#feat-promoted .logit")
    by(browser, "#feat-find-similar")[0].click()
    assert len(wait(browser, lambda d: by(d, "#feat-similar a"))) == 10


@pytest.mark.slow
def test_steer_shows_a_steered_and_unsteered_pair_and_saves_a_preset(server, browser):
    sae, index = a_described_latent(server)
    browser.get(f"{server.url}/ui/steer?sae={sae}&feature={index}")
    wait(browser, lambda d: by(d, "#st-edits .e-feature"))
    assert by(browser, "#st-edits .e-feature")[0].get_attribute("value") == str(index)  # from "steer with this"
    value = by(browser, "#st-edits .e-value")[0]
    value.clear()
    value.send_keys("60")
    by(browser, "#st-run")[0].click()
    wait(browser, lambda d: by(d, "#st-unsteered")[0].text not in ("", "…"))
    steered, plain = by(browser, "#st-steered")[0].text, by(browser, "#st-unsteered")[0].text
    assert steered and plain and steered != plain
    by(browser, "#st-preset-name")[0].send_keys("ui-preset")
    by(browser, "#st-save")[0].click()
    wait(browser, lambda d: "saved preset ui-preset" in by(d, "#toast")[0].text)
    browser.get(server.url + "/ui/adapters")
    listed = wait(browser, lambda d: [r.text for r in by(d, "#preset-list tr")][1:])
    assert any(r.startswith("ui-preset") for r in listed)


@pytest.mark.slow
def test_every_view_fits_a_narrow_window(server):
    driver = chrome(420, 800)
    try:
        for view in ("", "features", "steer", "adapters"):
            driver.get(f"{server.url}/ui/{view}")
            wait(driver, lambda d: by(d, "main h2"))
            overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, (view, overflow)
    finally:
        driver.quit()


def test_the_page_asks_for_the_key_and_keeps_it_in_the_session():
    """A server with an API key: the page itself loads without it, asks for it on the first API call, and then
    shows the server's models; the key lives in sessionStorage only."""
    from fake_engine import FakeEngine
    from saelora.serve.api.app import create_app

    with LiveServer(create_app(FakeEngine(), served_name="fake", api_key="s3cret")) as srv:
        driver = chrome()
        try:
            driver.get(srv.url + "/ui/")
            wait(driver, lambda d: d.execute_script("return document.getElementById('key-dialog').open"), 30)
            by(driver, "#key-input")[0].send_keys("s3cret")
            by(driver, "#key-ok")[0].click()
            wait(driver, lambda d: by(d, "#gen-model option"), 30)
            assert driver.execute_script("return sessionStorage.getItem('saelora.key')") == "s3cret"
            assert driver.execute_script("return localStorage.length") == 0
        finally:
            driver.quit()
