"""The demo page in a real headless Chromium against the real server with a tiny random model.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``scripts/test`` installs them when
run as root) and ``selenium`` from the dev extra; skipped with the reason when any is missing.
A screenshot of each test's final page is written to ``artifacts/`` for people to look at.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "the browser test needs Chromium and its driver: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (dev extra)")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serverutil import TINY_MODEL_KWARGS, run_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
WAIT_S = 90  # the CPU is shared with other test runs; a tiny model still answers in well under a second

# The machine has no internet: everything that would phone home is switched off.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1100",
)


@contextlib.contextmanager
def chromium() -> Iterator[WebDriver]:
    with tempfile.TemporaryDirectory(prefix="tome-demo-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (*CHROMIUM_ARGS, f"--user-data-dir={profile}"):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@contextlib.contextmanager
def screenshot_on_exit(driver: WebDriver, name: str) -> Iterator[None]:
    """Save what the page showed at the end, also when an assertion failed."""
    try:
        yield
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        page_state = driver.execute_script(
            "return {status: document.getElementById('status').textContent,"
            " error: document.getElementById('error').textContent,"
            " r: document.getElementById('results').dataset.r}"
        )
        raise AssertionError(f"timed out waiting for {what}; page shows {page_state}") from None


def text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def shown_r(driver: WebDriver) -> str | None:
    """The r of the result on display (set only once its response has been rendered)."""
    return driver.find_element(By.ID, "results").get_attribute("data-r")


def shown_scores(driver: WebDriver) -> list[str]:
    return [
        li.get_attribute("data-score")
        for li in driver.find_elements(By.CSS_SELECTOR, "#predictions li.prediction")
    ]


def merge_pixels(driver: WebDriver) -> str:
    """The merge map as the page draws it, read back through a canvas."""
    return driver.execute_script(
        "const img = document.getElementById('merge-image');"
        "const canvas = document.createElement('canvas');"
        "canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;"
        "canvas.getContext('2d').drawImage(img, 0, 0);"
        "return canvas.toDataURL('image/png');"
    )


def merge_image_loaded(driver: WebDriver) -> bool:
    return bool(
        driver.execute_script(
            "const img = document.getElementById('merge-image');"
            "return !img.hidden && img.complete && img.naturalWidth > 0;"
        )
    )


def wait_until_models_loaded(driver: WebDriver) -> None:
    wait_for(
        driver,
        lambda d: (
            d.find_element(By.ID, "model-select").is_enabled()
            and d.find_element(By.ID, "model-select").get_attribute("value")
        ),
        "the model list",
    )


def make_photo(path: Path, size: int = 160) -> Path:
    """A synthetic picture with flat regions and edges, so that merging has something to merge."""
    image = Image.new("RGB", (size, size), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 2 // 3, size, size), fill=(60, 140, 60))
    draw.ellipse((size // 4, size // 5, size * 3 // 4, size * 7 // 10), fill=(230, 200, 40))
    draw.line((0, 0, size, size), fill=(250, 250, 250), width=5)
    image.save(path)
    return path


def classify_directly(base_url: str, image: Path, r: int) -> httpx.Response:
    with image.open("rb") as handle:
        return httpx.post(
            f"{base_url}/classify",
            params={"r": r, "top_k": 5},
            files={"file": (image.name, handle, "image/png")},
            timeout=WAIT_S,
        )


UPLOAD_LIMIT = 64 * 1024  # bytes: the bundled samples are < 30 KB, a 256x256 noise PNG is ~190 KB


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with run_server(env={"TOME_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}) as base_url:
        yield base_url


def test_slider_updates_predictions_tokens_and_merge_map(server: str, tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "shapes.png")
    with chromium() as driver, screenshot_on_exit(driver, "demo-browser"):
        driver.get(server + "/")
        wait_until_models_loaded(driver)
        slider = driver.find_element(By.ID, "r-slider")
        r_max = int(slider.get_attribute("max"))
        assert r_max >= 2, "the tiny test model should allow merging"

        # The keyboard moves the slider: Home is the lowest r, i.e. no merging.
        slider.send_keys(Keys.HOME)
        assert slider.get_attribute("value") == "0"
        driver.find_element(By.ID, "file-input").send_keys(str(photo))
        wait_for(driver, lambda d: shown_r(d) == "0" and merge_image_loaded(d), "the result at r=0")
        tokens_in, tokens_out = (int(part) for part in text(driver, "tokens").split("→"))
        assert tokens_in == tokens_out > 1
        assert len(shown_scores(driver)) == 5
        first_scores, first_map = shown_scores(driver), merge_pixels(driver)
        assert driver.find_element(By.ID, "original-image").is_displayed()
        assert text(driver, "speedup").startswith("1.00")

        slider.send_keys(Keys.END)
        assert text(driver, "r-value") == str(r_max)
        wait_for(
            driver, lambda d: shown_r(d) == str(r_max) and merge_image_loaded(d), f"the result at r={r_max}"
        )
        merged_in, merged_out = (int(part) for part in text(driver, "tokens").split("→"))
        assert merged_in == tokens_in and merged_out < tokens_out
        assert merge_pixels(driver) != first_map
        assert shown_scores(driver) != first_scores
        assert float(text(driver, "speedup").rstrip("×")) > 1.0
        assert text(driver, "inference-ms").endswith("ms") and text(driver, "total-ms").endswith("ms")
        assert str(r_max) in driver.find_element(By.ID, "merge-image").get_attribute("alt")

        # Key presses just slower than the page's debounce, so that each sends requests that the next
        # one makes stale: the page must end on the last r chosen, even if older answers arrive late.
        for _ in range(3):
            slider.send_keys(Keys.ARROW_LEFT)
            time.sleep(0.2)
        final_r = r_max - 3
        assert text(driver, "r-value") == str(final_r)
        wait_for(driver, lambda d: shown_r(d) == str(final_r), f"the result at r={final_r}")
        time.sleep(1.0)  # room for a stale answer to (wrongly) land
        assert shown_r(driver) == str(final_r)
        expected = classify_directly(server, photo, final_r).json()["tokens"]
        assert text(driver, "tokens") == f"{expected['input']} → {expected['output']}"
        assert not driver.find_element(By.ID, "error").is_displayed()
        # Script errors and Content-Security-Policy violations both land in the console.
        assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_auto_lets_the_server_choose_and_shows_the_r_it_chose(server: str, tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "shapes.png")
    with chromium() as driver, screenshot_on_exit(driver, "demo-browser-auto"):
        driver.get(server + "/")
        wait_until_models_loaded(driver)
        auto = driver.find_element(By.ID, "r-auto")
        assert auto.is_selected(), "the server's default r is auto, and the page starts there"
        assert text(driver, "r-value") == "auto"
        driver.find_element(By.ID, "file-input").send_keys(str(photo))
        results = driver.find_element(By.ID, "results")
        wait_for(driver, lambda d: results.get_attribute("data-r-auto") == "1", "an answer with r=auto")
        chosen = shown_r(driver)
        assert chosen is not None and chosen.isdigit()
        assert text(driver, "r-value") == f"auto: r={chosen}"
        assert "chosen by the server" in text(driver, "status")
        # Moving the slider leaves auto for a fixed r.
        driver.find_element(By.ID, "r-slider").send_keys(Keys.END)
        assert not auto.is_selected()
        r_max = driver.find_element(By.ID, "r-slider").get_attribute("max")
        fixed = results.get_attribute
        wait_for(driver, lambda d: shown_r(d) == r_max and fixed("data-r-auto") == "0", "the result at r_max")
        auto.click()
        wait_for(driver, lambda d: results.get_attribute("data-r-auto") == "1", "auto again")
        assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []


# Answers for r=1 reach the page 1.5 s late, complete (as if they had arrived just before the
# request was aborted), so only the page's own bookkeeping can keep them from overwriting newer ones.
DELAY_ANSWERS_FOR_R1 = """
const realFetch = window.fetch;
window.fetch = async (url, options) => {
  const response = await realFetch(url, options);
  if (new URL(url, location.href).searchParams.get("r") !== "1") return response;
  const body = await response.blob();
  await new Promise((resolve) => setTimeout(resolve, 1500));
  return new Response(body, {status: response.status, headers: response.headers});
};
"""


def test_late_answers_never_overwrite_newer_ones(server: str, tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "shapes.png")
    with chromium() as driver, screenshot_on_exit(driver, "demo-browser-late"):
        driver.get(server + "/")
        wait_until_models_loaded(driver)
        driver.execute_script(DELAY_ANSWERS_FOR_R1)
        slider = driver.find_element(By.ID, "r-slider")
        slider.send_keys(Keys.HOME, Keys.ARROW_RIGHT)
        driver.find_element(By.ID, "file-input").send_keys(str(photo))  # sends r=1, answered late
        time.sleep(0.3)
        slider.send_keys(Keys.ARROW_RIGHT)  # r=2, answered at once
        wait_for(driver, lambda d: shown_r(d) == "2", "the result at r=2")
        time.sleep(2.5)  # the r=1 answers have landed by now
        assert shown_r(driver) == "2"
        expected = classify_directly(server, photo, 2).json()["tokens"]
        assert text(driver, "tokens") == f"{expected['input']} → {expected['output']}"
        assert text(driver, "r-value") == "2"


def _not_an_image(folder: Path) -> tuple[Path, str]:
    path = folder / "notes.txt"
    path.write_text("these are notes, not pixels\n")
    return path, "text/plain"


def _too_large(folder: Path) -> tuple[Path, str]:
    path = folder / "noise.png"
    Image.effect_noise((256, 256), 64).convert("RGB").save(path)  # noise hardly compresses
    assert path.stat().st_size > UPLOAD_LIMIT
    return path, "image/png"


@pytest.mark.parametrize("make_upload", [_not_an_image, _too_large], ids=["non-image", "too-large"])
def test_rejected_upload_shows_the_servers_reason(
    server: str, tmp_path: Path, make_upload: Callable[[Path], tuple[Path, str]]
) -> None:
    upload, content_type = make_upload(tmp_path)
    with upload.open("rb") as handle:
        direct = httpx.post(
            f"{server}/classify", files={"file": (upload.name, handle, content_type)}, timeout=WAIT_S
        )
    assert 400 <= direct.status_code < 500
    detail = direct.json()["detail"]
    assert isinstance(detail, str) and detail

    with chromium() as driver, screenshot_on_exit(driver, f"demo-browser-{upload.stem}"):
        driver.get(server + "/")
        wait_until_models_loaded(driver)
        # A good image first, so that the test also sees the stale result go away.
        driver.find_element(By.ID, "file-input").send_keys(str(make_photo(tmp_path / "shapes.png")))
        wait_for(driver, merge_image_loaded, "the first result")
        driver.find_element(By.ID, "file-input").send_keys(str(upload))
        wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), "an error message")
        message = text(driver, "error")
        assert message == f"Error {direct.status_code}: {detail}"
        assert driver.find_element(By.ID, "error").get_attribute("role") == "alert"
        assert not shown_scores(driver)
        assert not driver.find_element(By.ID, "merge-image").is_displayed()
        assert text(driver, "tokens") == "–"


# A full queue is hard to provoke on cue, so the browser answers /classify the way the server does then.
ANSWER_QUEUE_FULL = """
const realFetch = window.fetch;
window.fetch = async (url, options) => {
  if (!String(url).startsWith("classify")) return realFetch(url, options);
  const body = JSON.stringify({detail: "the queue for model m at r=3 is full; retry later"});
  return new Response(body, {status: 429, headers: {"Content-Type": "application/json", "Retry-After": "2"}});
};
"""


def test_queue_full_answer_reads_as_advice(server: str, tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "shapes.png")
    with chromium() as driver, screenshot_on_exit(driver, "demo-browser-429"):
        driver.get(server + "/")
        wait_until_models_loaded(driver)
        driver.find_element(By.ID, "file-input").send_keys(str(photo))
        wait_for(driver, merge_image_loaded, "the first result")
        driver.execute_script(ANSWER_QUEUE_FULL)
        driver.find_element(By.ID, "r-slider").send_keys(Keys.ARROW_RIGHT)  # from auto to a fixed r
        wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), "an error message")
        expected = "Error 429: the queue for model m at r=3 is full; retry later. Try again in 2 s."
        assert text(driver, "error") == expected
        # The last good result stays visible, marked as out of date.
        assert "stale" in driver.find_element(By.ID, "results").get_attribute("class")
        assert len(shown_scores(driver)) == 5


def test_bundled_sample_from_the_keyboard_and_accessibility_smoke(server: str) -> None:
    with chromium() as driver, screenshot_on_exit(driver, "demo-browser-a11y"):
        driver.get(server + "/")
        wait_until_models_loaded(driver)
        sample = driver.find_element(By.CSS_SELECTOR, "button.sample")
        sample.send_keys(Keys.ENTER)
        wait_for(driver, merge_image_loaded, "the merge map of the sample")
        assert sample.get_attribute("aria-pressed") == "true"
        assert len(shown_scores(driver)) == 5
        assert text(driver, "status").startswith(sample.get_attribute("data-src").rsplit("/", 1)[-1])
        # After a result is shown, so that the images the page adds at run time are covered too.
        unlabeled = driver.execute_script(
            "return [...document.querySelectorAll('input, select, textarea, button')]"
            ".filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')"
            " && !el.textContent.trim() && !el.querySelector('img[alt]:not([alt=\"\"])'))"
            ".map(el => el.outerHTML.slice(0, 80));"
        )
        assert unlabeled == []
        missing_alt = driver.execute_script(
            "return [...document.images].filter(img => !img.getAttribute('alt')).map(img => img.outerHTML);"
        )
        assert missing_alt == []
        live = driver.execute_script(
            "return [...document.querySelectorAll('[aria-live], [role=alert], [role=status]')]"
            ".map(el => el.id);"
        )
        assert {"status", "error"} <= set(live)
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang")


def test_api_key_typed_into_the_page_is_sent(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "shapes.png")
    with (
        run_server(env={"TOME_API_KEY": "demo-secret"}) as base_url,
        chromium() as driver,
        screenshot_on_exit(driver, "demo-browser-key"),
    ):
        for path in ("/", "/static/app.js"):
            # The key is typed into the page, so the page itself must load without it (it holds no data).
            status = httpx.get(base_url + path, timeout=WAIT_S).status_code
            assert status == 200, f"GET {path} must not need the API key, got {status}"
        driver.get(base_url + "/")
        key_field = driver.find_element(By.ID, "api-key")
        driver.find_element(By.ID, "file-input").send_keys(str(photo))
        wait_for(driver, lambda d: "401" in text(d, "error"), "the server's 401")
        assert "API key" in text(driver, "error")
        assert key_field.is_displayed(), "the key field is revealed when the server asks for a key"

        key_field.send_keys("demo-secret", Keys.TAB)
        wait_for(
            driver, lambda d: shown_r(d) is not None and merge_image_loaded(d), "the result with the key"
        )
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert len(shown_scores(driver)) == 5
        assert driver.execute_script("return sessionStorage.getItem('tome-serve.api-key')") == "demo-secret"
        assert driver.execute_script("return localStorage.length") == 0, "the key must not outlive the tab"


def test_model_without_classifier_head_shows_its_merge_map(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "shapes.png")
    backbone = {"TOME_MODEL_KWARGS": json.dumps({**TINY_MODEL_KWARGS, "num_classes": 0})}
    with (
        run_server(env=backbone) as base_url,
        chromium() as driver,
        screenshot_on_exit(driver, "demo-browser-backbone"),
    ):
        driver.get(base_url + "/")
        wait_until_models_loaded(driver)
        driver.find_element(By.ID, "file-input").send_keys(str(photo))
        wait_for(driver, merge_image_loaded, "the merge map")
        r = shown_r(driver)
        with photo.open("rb") as handle:
            direct = httpx.post(
                f"{base_url}/visualize", params={"r": r}, files={"file": (photo.name, handle)}, timeout=WAIT_S
            )
        headers = direct.headers
        assert (
            text(driver, "tokens") == f"{headers['x-tome-tokens-input']} → {headers['x-tome-tokens-output']}"
        )
        assert text(driver, "inference-ms").endswith("ms") and text(driver, "total-ms").endswith("ms")
        assert "no classifier head" in text(driver, "predictions")
        assert "no classifier head" in text(driver, "weights-note")
        assert not driver.find_element(By.ID, "error").is_displayed()


def test_api_docs_show_every_operation_from_this_server_alone(server: str) -> None:
    """/docs renders Swagger UI from the server's own files (the machine has no internet), under its
    Content-Security-Policy: the operations are listed, not a white page."""
    classify = "#swagger-ui .opblock-post .opblock-summary-path[data-path='/classify']"
    with chromium() as driver, screenshot_on_exit(driver, "docs-browser"):
        driver.get(server + "/docs")
        try:
            WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, classify)
            )
        except TimeoutException:
            shown = driver.find_element(By.TAG_NAME, "body").text[:300]
            raise AssertionError(f"/docs lists no POST /classify; it shows {shown!r}") from None
        paths = {
            element.get_attribute("data-path")
            for element in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        }
        assert {"/classify", "/visualize", "/models"} <= paths, paths
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(url.startswith(server) for url in loaded), loaded
        errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors  # a script or style the policy refused would be reported here


SAMPLES = REPO / "server" / "static" / "samples"


def embed_directly(base_url: str, image: bytes, r: int) -> np.ndarray:
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    answer = httpx.post(f"{base_url}/v1/embeddings", json={"input": uri, "r": r}, timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json()["data"][0]["embedding"])


def neighbours(driver: WebDriver) -> list[tuple[str, float]]:
    items = driver.find_elements(By.CSS_SELECTOR, "#nearest li.neighbour")
    return [(li.get_attribute("data-name"), float(li.get_attribute("data-cosine"))) for li in items]


def shown_cosine(driver: WebDriver) -> tuple[str | None, str | None]:
    """(r, cosine to r=0) of the embedding on display, both None before one is shown."""
    cosine = driver.find_element(By.ID, "embed-cosine")
    return cosine.get_attribute("data-r"), cosine.get_attribute("data-cosine")


def test_embed_view_shows_the_cosine_to_r0_and_the_nearest_samples(server: str, tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "shapes.png")
    samples = {path.name: embed_directly(server, path.read_bytes(), 0) for path in SAMPLES.glob("*.jpg")}
    with chromium() as driver, screenshot_on_exit(driver, "demo-browser-embed"):
        driver.get(server + "/")
        wait_until_models_loaded(driver)
        assert not driver.find_element(By.ID, "embed").is_displayed(), "the page opens on predictions"
        driver.find_element(By.CSS_SELECTOR, "label[for=view-embed]").click()
        slider = driver.find_element(By.ID, "r-slider")
        slider.send_keys(Keys.END)
        r_max = int(slider.get_attribute("max"))
        driver.find_element(By.ID, "file-input").send_keys(str(photo))
        wait_for(driver, lambda d: shown_cosine(d)[0] == str(r_max), f"the embedding at r={r_max}")

        # The page's numbers are the API's: the photo at r_max against itself at r=0, and the samples at r=0.
        at_r = embed_directly(server, photo.read_bytes(), r_max)
        expected = float(at_r @ embed_directly(server, photo.read_bytes(), 0))
        assert float(shown_cosine(driver)[1]) == pytest.approx(expected, abs=1e-4)
        assert expected < 0.9999, "merging changes the embedding of the tiny model"
        assert text(driver, "embed-cosine") == f"{expected:.4f}"
        ranked = sorted(
            ((name, float(at_r @ vector)) for name, vector in samples.items()), key=lambda p: -p[1]
        )
        shown = neighbours(driver)
        assert [name for name, _ in shown] == [name for name, _ in ranked]
        assert [cos for _, cos in shown] == pytest.approx([cos for _, cos in ranked], abs=1e-4)
        assert merge_image_loaded(driver) and not driver.find_element(By.ID, "top").is_displayed()
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "demo-browser-embed-view.png"))

        # A sample at r=0 is its own nearest sample, at cosine 1, and its cosine to r=0 is 1.
        slider.send_keys(Keys.HOME)
        driver.find_element(By.CSS_SELECTOR, "button.sample[data-src$='coffee.jpg']").click()
        wait_for(
            driver,
            lambda d: shown_cosine(d)[0] == "0" and (neighbours(d) or [("", 0)])[0][0] == "coffee.jpg",
            "coffee.jpg at r=0",
        )
        assert neighbours(driver)[0][1] == pytest.approx(1.0, abs=1e-5)
        assert text(driver, "embed-cosine") == "1.0000"
        assert text(driver, "status").startswith("coffee.jpg at r=0: cosine 1.0000 to r=0")

        # Back to predictions: the classify view as before.
        driver.find_element(By.CSS_SELECTOR, "label[for=view-classify]").click()
        wait_for(driver, lambda d: len(shown_scores(d)) == 5, "the predictions again")
        assert not driver.find_element(By.ID, "embed").is_displayed()
        assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []
