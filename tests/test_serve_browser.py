"""`clipstyle serve` driven by a real, headless Chromium as a person would: upload, type, start,
watch the preview change, stop, download; a second run finishes and its style is applied.

Needs Debian's chromium and chromium-driver (.ci/run installs them); skipped only when they are
absent. Screenshots of each state go to the test's folder, and also to the folder in
CLIPSTYLE_SCREENSHOTS when it is set (docs/serve is made this way, see docs/serve.md).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
pytest.importorskip("starlette")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from clipstyle.images import fit_size
from clipstyle.serve.jobs import JobQueue
from serve_support import running

from conftest import PATIENCE, tiny_models

SIZE = 64  # the form's size field in this test: small, for tiny models on a CPU


def photo(path: Path) -> Path:
    """A 3:2 photo-like picture: sky, sun, hills."""
    img = Image.new("RGB", (300, 200))
    draw = ImageDraw.Draw(img)
    for y in range(200):
        draw.line([(0, y), (300, y)], fill=(90 + y // 3, 140 + y // 4, 230 - y // 2))
    draw.ellipse([210, 30, 260, 80], fill=(250, 210, 60))
    draw.polygon([(0, 200), (0, 130), (90, 90), (180, 140), (300, 100), (300, 200)], fill=(60, 120, 50))
    img.save(path, quality=92)
    return path


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1000",
        "--no-first-run",
        "--disable-extensions",
        "--lang=en",
    ):
        options.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver, tmp_path: Path, name: str) -> None:
    """A screenshot, kept small (a 64-colour palette) and copied to $CLIPSTYLE_SCREENSHOTS if set."""
    raw = tmp_path / f"{name}.raw.png"
    driver.save_screenshot(str(raw))
    with Image.open(raw) as img:
        small = img.convert("RGB").quantize(64, method=Image.Quantize.MEDIANCUT)
    out = tmp_path / f"{name}.png"
    small.save(out, optimize=True)
    target = os.environ.get("CLIPSTYLE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(target) / out.name)


def clicking(browser, wait):
    """click(by, value): click the element once nothing covers it. On a slow machine the page may
    still be moving (a card arriving, a message fading) when the test clicks: a person would wait."""
    from selenium.common.exceptions import ElementClickInterceptedException

    def attempt(by, value) -> bool:
        try:
            browser.find_element(by, value).click()
        except ElementClickInterceptedException:
            return False
        return True

    return lambda by, value: wait.until(lambda d: attempt(by, value))


def test_a_person_makes_watches_stops_keeps_and_applies(tmp_path, browser):
    picture = photo(tmp_path / "hills.jpg")
    queue = JobQueue(tiny_models(), tmp_path / "served", preview_seconds=0.05)
    wait = WebDriverWait(browser, PATIENCE, poll_frequency=0.02)
    find = browser.find_element
    click = clicking(browser, wait)
    with running(queue) as base:
        browser.get(base)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fields input"))
        # Make: the photo, a prompt, the draft preset with a small size
        find(By.ID, "photo").send_keys(str(picture))
        wait.until(lambda d: "/files/uploads/" in (find(By.ID, "photo-view").get_attribute("src") or ""))
        wait.until(lambda d: d.execute_script("return document.getElementById('photo-view').naturalWidth") > 0)
        assert "hills.jpg (300×200)" in find(By.ID, "photo-name").text
        find(By.ID, "prompts").send_keys("ink wash painting")
        Select(find(By.ID, "preset")).select_by_value("draft")
        assert find(By.ID, "f-steps").get_attribute("value") == "100"  # from PRESETS, through /api/config
        click(By.CSS_SELECTOR, "#settings summary")
        for name, value in (("steps", "400"), ("size", str(SIZE)), ("crops", "4"), ("crop_size", "32")):
            field = find(By.ID, f"f-{name}")
            field.clear()
            field.send_keys(value)
        shoot(browser, tmp_path, "1-make")
        # Watch: the live image changes while the job runs; then Stop keeps the last one
        browser.execute_script("""
            window.seen = [];
            new MutationObserver(() => window.seen.push(document.getElementById('live').src))
              .observe(document.getElementById('live'), {attributes: true, attributeFilter: ['src']});""")
        click(By.ID, "start")
        wait.until(
            lambda d: (
                len(set(d.execute_script("return window.seen"))) >= 3
                and d.find_elements(By.CSS_SELECTOR, "#curve polyline")
            )
        )
        seen = browser.execute_script("return window.seen")
        assert all("/preview?v=" in src for src in seen)
        assert "about" in find(By.ID, "progress-text").text  # an estimate of the time left
        shoot(browser, tmp_path, "2-watch")
        click(By.ID, "stop")
        wait.until(lambda d: "stopped at step" in find(By.ID, "progress-text").text)
        # Keep: the gallery card; its PNG downloads and is an image of the photo's aspect
        link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cards .card a.download-png"))
        shoot(browser, tmp_path, "3-stopped")
        link.click()
        deadline = time.monotonic() + PATIENCE
        while not (pngs := [p for p in browser.downloads.glob("*.png")]):
            assert time.monotonic() < deadline, "the PNG did not download"
            time.sleep(0.05)
        (png,) = pngs
        assert png.name == "hills-ink-wash-painting.png"
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.size == fit_size(300, 200, SIZE)  # longest side SIZE, 3:2 up to rounding to 8
            assert abs(img.size[0] / img.size[1] - 1.5) < 8 / img.size[1]
            assert img.text["prompt"] == "ink wash painting"
        # Reuse: the settings go back into the form; a shorter run finishes and keeps its style
        find(By.ID, "prompts").clear()
        click(By.CSS_SELECTOR, "#cards .card button.use")
        # the page fetches the job's settings first: wait for the form to fill
        wait.until(lambda d: find(By.ID, "prompts").get_attribute("value"))
        assert find(By.ID, "prompts").get_attribute("value") == "ink wash painting"
        assert find(By.ID, "f-steps").get_attribute("value") == "400"
        assert find(By.ID, "f-size").get_attribute("value") == str(SIZE)
        steps = find(By.ID, "f-steps")
        steps.clear()
        steps.send_keys("12")
        click(By.ID, "start")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cards .card button.apply")) == 1)
        click(By.CSS_SELECTOR, "#cards .card button.apply")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cards .card")) == 3)
        wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#cards img')].every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        assert find(By.ID, "message").text == ""
        click(By.CSS_SELECTOR, "#cards .card:last-child details summary")  # the stopped run's metadata
        wait.until(lambda d: "stopped_at_step" in find(By.CSS_SELECTOR, "#cards .card:last-child pre").text)
        browser.execute_script("document.getElementById('gallery').scrollIntoView()")
        shoot(browser, tmp_path, "4-gallery")
    kinds = sorted((j.kind, j.status) for j in queue.jobs.values())
    assert kinds == [("apply", "done"), ("stylize", "done"), ("stylize", "stopped")]
    applied = next(j for j in queue.jobs.values() if j.kind == "apply")
    assert applied.size == [300, 200]  # a saved style renders the photo at its own size


def test_a_person_styles_only_the_sky_then_restyles_a_film(tmp_path, browser):
    """The region controls (a `--where` phrase, preserve colour) in the form, recorded on the card and
    given back by "Use these settings"; then a film uploaded, restyled with the saved style frame by
    frame, played and downloaded from the gallery."""
    pytest.importorskip("av")
    from videos import make_video

    picture = photo(tmp_path / "hills.jpg")
    film = make_video(tmp_path / "holiday.mp4", frames=24, size=(96, 64))
    queue = JobQueue(tiny_models(), tmp_path / "served", preview_seconds=0.05)
    wait = WebDriverWait(browser, PATIENCE, poll_frequency=0.02)
    find = browser.find_element
    click = clicking(browser, wait)
    with running(queue) as base:
        browser.get(base)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fields input"))
        find(By.ID, "photo").send_keys(str(picture))
        wait.until(lambda d: "hills.jpg (300×200)" in find(By.ID, "photo-name").text)
        find(By.ID, "prompts").send_keys("golden sunset")
        Select(find(By.ID, "preset")).select_by_value("draft")
        click(By.CSS_SELECTOR, "#settings summary")
        for name, value in (("steps", "10"), ("size", str(SIZE)), ("crops", "4"), ("crop_size", "32")):
            field = find(By.ID, f"f-{name}")
            field.clear()
            field.send_keys(value)
        browser.execute_script("document.getElementById('settings').open = false")
        click(By.CSS_SELECTOR, "#region summary")
        assert find(By.ID, "feather").get_attribute("value") == "4"  # run's default, through /api/config
        find(By.ID, "where").send_keys("the sky")
        click(By.ID, "preserve-color")
        shoot(browser, tmp_path, "5-region")
        click(By.ID, "start")
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cards .card button.apply"))
        facts = find(By.CSS_SELECTOR, "#cards .card p.muted").text
        assert "where “the sky”" in facts and "colours kept" in facts
        # the region goes back into the form with the rest of the settings
        find(By.ID, "where").clear()
        click(By.ID, "preserve-color")
        click(By.CSS_SELECTOR, "#cards .card button.use")
        wait.until(lambda d: find(By.ID, "where").get_attribute("value") == "the sky")
        assert find(By.ID, "preserve-color").is_selected()
        # a film: uploaded in the same box, restyled with the card's style, counted in frames
        find(By.ID, "photo").send_keys(str(film))
        wait.until(lambda d: "holiday.mp4 (film, 96×64, 24 frames" in find(By.ID, "photo-name").text)
        browser.execute_script("""
            const text = document.getElementById('progress-text');
            window.frames_seen = [];
            new MutationObserver(() => window.frames_seen.push(text.textContent))
              .observe(text, {childList: true, characterData: true, subtree: true});""")
        card.click()
        played = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cards .card video"))
        assert any(t.startswith("frame ") and "/ 24" in t for t in browser.execute_script("return window.frames_seen"))
        assert find(By.ID, "progress-text").text.startswith("frame 24 / 24")
        # the form still holds the sky and preserve colour: a film is restyled whole, and the page says so
        assert find(By.ID, "message").text == "a film is restyled whole: the region and colour controls work on photos"
        src = played.get_attribute("src")
        assert src.endswith(".mp4") and "/files/results/" in src
        # the page may load it (media-src), and the browser reads its size from the file
        # its first frame shown (HAVE_CURRENT_DATA): the browser decodes the film
        wait.until(lambda d: d.execute_script("return arguments[0].readyState", played) >= 2, "the film did not load")
        assert browser.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", played) == [96, 64]
        browser.execute_script("document.getElementById('gallery').scrollIntoView()")
        shoot(browser, tmp_path, "6-film")
        click(By.CSS_SELECTOR, "#cards .card a.download-film")
        deadline = time.monotonic() + PATIENCE
        while not (films := list(browser.downloads.glob("*.mp4"))):
            assert time.monotonic() < deadline, "the film did not download"
            time.sleep(0.05)
        (got,) = films
        assert got.name == "holiday-golden-sunset-applied.mp4"
        from videos import decoded_frames

        assert len(decoded_frames(got)) == 24
    done = sorted((j.kind, j.film, j.status) for j in queue.jobs.values())
    assert done == [("apply", True, "done"), ("stylize", False, "done")]
    (styled,) = [j for j in queue.jobs.values() if j.kind == "stylize"]
    assert styled.region["where"] == "the sky" and styled.region["preserve_color"] is True


def test_a_person_blends_a_prompt_with_a_painting_and_avoids_letters(tmp_path, browser):
    """A style image uploaded in the form with a weight, blended with a weighted prompt into one network,
    a phrase to avoid: the card names the blend and what it avoids; "Use these settings" gives it all back."""
    picture = photo(tmp_path / "hills.jpg")
    brush = tmp_path / "brush.png"
    img = Image.new("RGB", (60, 60), (20, 30, 90))
    draw = ImageDraw.Draw(img)
    for x in range(-60, 60, 10):
        draw.line([(x, 0), (x + 60, 60)], fill=(240, 200, 60), width=4)
    img.save(brush)
    queue = JobQueue(tiny_models(), tmp_path / "served", preview_seconds=0.05)
    wait = WebDriverWait(browser, PATIENCE, poll_frequency=0.02)
    find = browser.find_element
    click = clicking(browser, wait)
    with running(queue) as base:
        browser.get(base)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fields input"))
        find(By.ID, "photo").send_keys(str(picture))
        wait.until(lambda d: "hills.jpg (300×200)" in find(By.ID, "photo-name").text)
        find(By.ID, "style-images").send_keys(str(brush))
        weight = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#style-list li input.weight"))
        assert find(By.CSS_SELECTOR, "#style-list li .name").text == "brush.png"
        weight.clear()
        weight.send_keys("0.3")
        find(By.ID, "prompts").send_keys("ink wash painting:0.7")
        click(By.ID, "blend")
        click(By.CSS_SELECTOR, "#avoid-box summary")
        assert find(By.ID, "avoid-weight").get_attribute("value") == "0.5"  # run's default, through /api/config
        find(By.ID, "avoid").send_keys("letters")
        Select(find(By.ID, "preset")).select_by_value("draft")
        click(By.CSS_SELECTOR, "#settings summary")
        for name, value in (("steps", "8"), ("size", str(SIZE)), ("crops", "4"), ("crop_size", "32")):
            field = find(By.ID, f"f-{name}")
            field.clear()
            field.send_keys(value)
        browser.execute_script("document.getElementById('settings').open = false")
        shoot(browser, tmp_path, "7-targets")
        click(By.ID, "start")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cards .card button.use"))
        assert find(By.CSS_SELECTOR, "#cards .card .prompt").text == "ink wash painting:0.7 + [brush.png]:0.3"
        assert "avoiding “letters”" in find(By.CSS_SELECTOR, "#cards .card p.muted").text
        assert find(By.ID, "message").text == ""
        # everything back into the form
        browser.execute_script("""
            for (const id of ['prompts', 'avoid']) document.getElementById(id).value = '';
            document.getElementById('blend').checked = false;""")
        click(By.CSS_SELECTOR, "#style-list li button")
        click(By.CSS_SELECTOR, "#cards .card button.use")
        wait.until(lambda d: find(By.ID, "prompts").get_attribute("value") == "ink wash painting:0.7")
        assert find(By.ID, "blend").is_selected() and find(By.ID, "avoid").get_attribute("value") == "letters"
        assert find(By.CSS_SELECTOR, "#style-list li input.weight").get_attribute("value") == "0.3"
    (job,) = queue.jobs.values()
    assert job.status == "done" and job.target["blend"] is True
    assert [t["weight"] for t in job.target["targets"]] == [0.7, 0.3] and job.target["avoid"] == ["letters"]
