"""Browser fixtures: a real Chromium driven by Playwright, a fresh context (no stored UI state) per
test, and screenshots of every step.

Chromium is the system one (Debian's `apt-get install chromium`, or $ENTCAL_CHROMIUM): Playwright's
own browser download does not work offline. Without Playwright or a browser the tests skip and say why.
Screenshots go to $ENTCAL_SCREENSHOTS (default <repo>/test-output/screenshots/), one PNG per step,
named <test>-<nn>-<step>.png; each path is printed.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000  # a busy 2-core machine: the Prefect UI's first load alone can take 10+ s


def chromium_path() -> str | None:
    """$ENTCAL_CHROMIUM, else the first Chromium-family browser on PATH, else None."""
    if os.environ.get("ENTCAL_CHROMIUM"):
        return os.environ["ENTCAL_CHROMIUM"] if Path(os.environ["ENTCAL_CHROMIUM"]).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """One Chromium per test module. Not per session: while Playwright's sync API is started it
    marks an asyncio loop as running in the main thread, and every later test that calls Prefect's
    sync API there would get coroutines back instead of results."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need Playwright: pip install -e '.[test]'")
    exe = chromium_path()
    if not exe:
        pytest.skip("browser tests need Chromium: apt-get install chromium (or set ENTCAL_CHROMIUM to a browser)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page in a fresh browser context: no localStorage or cookies, as a first-time user; the
    browser's clock is in New York, so a time shown in UTC is the server's doing, not the browser's."""
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000}, timezone_id="America/New_York")
    ctx.set_default_timeout(TIMEOUT_MS)
    ctx.set_default_navigation_timeout(TIMEOUT_MS)
    pg = ctx.new_page()
    yield pg
    ctx.close()


@pytest.fixture
def shot(page, request):
    """shot(step) saves a screenshot of the page and returns its path (also printed)."""
    out = Path(os.environ.get("ENTCAL_SCREENSHOTS") or ROOT / "test-output" / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    count = [0]

    def take(step: str) -> Path:
        count[0] += 1
        path = out / f"{test}-{count[0]:02d}-{step}.png"
        page.screenshot(path=str(path))
        print(f"screenshot: {path}")
        return path

    return take


def schedule_form(page, deployment: str, deployment_id: str, every: str, shot):
    """From the Deployments page: open ``deployment``'s page, find its schedule (the text ``every``, e.g.
    "03:00 AM every day"), open the schedule's own form (⋮ -> Edit) and return that dialog."""
    page.get_by_role("link", name=deployment, exact=True).first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/" + deployment_id))
    page.get_by_text("Deployment ID", exact=True).wait_for()  # the deployment's page, not the list's
    schedule = page.get_by_text(re.compile(every)).first
    schedule.wait_for()
    shot(f"{deployment}-deployment")
    schedule.locator("xpath=ancestor::*[.//button][1]").get_by_role("button").last.click()
    page.get_by_text("Edit", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Timezone", exact=True).wait_for()
    shot(f"{deployment}-schedule")
    return dialog
