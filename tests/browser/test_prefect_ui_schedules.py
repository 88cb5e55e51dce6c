"""Your own study on a schedule, in the real Prefect UI: `entcal serve --config X.yaml --cron ... --timezone
...` shows X's deployment, named after the study, with its schedule in its zone, and the on-demand form
whose defaults are X."""
from __future__ import annotations

import re
import subprocess
import time

import httpx
import pytest
import yaml

from tests.browser.conftest import schedule_form
from tests.conftest import start_cli, tiny_config

STUDY = "own-study"


def _api(api: str, method: str, path: str, body: dict | None = None):
    r = httpx.request(method, api.rstrip("/") + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json() if r.content else None


@pytest.fixture(scope="module")
def served_own(prefect_server, stack, tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("own")
    config = d / "own.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name=STUDY)))
    log_path = d / "serve.log"
    log = open(log_path, "w")
    proc = start_cli("serve", "--config", str(config), "--cron", "30 4 * * *", "--timezone", "Europe/Paris",
                     env={"PREFECT_API_URL": prefect_server}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        found = {x["name"]: x for x in _api(prefect_server, "POST", "/deployments/filter", {})}
        if STUDY in found and "on-demand" in found and found["on-demand"]["parameters"]["config"]["name"] == STUDY:
            break
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"deployments never registered; {log_path.read_text()[-3000:]}"
        time.sleep(2)
    yield {"api": prefect_server, "ui": prefect_server.removesuffix("/api"), "ids": {n: found[n]["id"] for n in
                                                                                      (STUDY, "on-demand")}}
    proc.terminate()
    proc.wait(30)
    log.close()
    for name in (STUDY, "on-demand"):  # later tests serve the demo's deployments on this server
        httpx.delete(f"{prefect_server}/deployments/{found[name]['id']}", timeout=30)


def test_your_scheduled_study_is_listed_with_its_schedule_in_its_zone(page, shot, served_own):
    page.goto(served_own["ui"] + "/deployments")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=STUDY, exact=True)).first
    row.wait_for()
    shot("deployments")
    assert re.search(r"04:30 AM every day", row.inner_text()), row.inner_text()
    dialog = schedule_form(page, STUDY, served_own["ids"][STUDY], r"04:30 AM every day", shot)
    assert "30 4 * * *" in dialog.locator("input").evaluate_all("els => els.map(e => e.value)")
    assert re.search(r"Timezone\s+Europe / Paris\b", dialog.inner_text()), dialog.inner_text()  # (the UI spaces it)
    dialog.get_by_role("button", name="Close").last.click()  # nothing saved
