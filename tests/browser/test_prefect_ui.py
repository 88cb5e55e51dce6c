"""The real Prefect UI, in a real browser, on the stack's Prefect server with the deployments served by
`entcal serve` (flows/serve.py): what a user sees on the deployments page, and what the on-demand
deployment's run form does with a good and a bad study.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import schedule_form
from tests.conftest import start_cli, tiny_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("nightly", "on-demand")


def _api(api: str, method: str, path: str, body: dict | None = None):
    r = httpx.request(method, api.rstrip("/") + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json() if r.content else None


def _runs_of(api: str, deployment_id: str) -> list[dict]:
    return _api(api, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


@pytest.fixture(scope="module")
def served(prefect_server, stack, tmp_path_factory):
    """`python -m entcal.flows.cli serve` against the stack's Prefect server, until both deployments exist.

    On exit: on-demand runs this module created are cancelled (so the served process stops their work),
    the server is stopped, and those runs are deleted, so later tests see the deployment as it was."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")
    proc = start_cli("serve", "--limit", "1", env={"PREFECT_API_URL": prefect_server}, stdout=log,
                     stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        found = {d["name"]: d for d in _api(prefect_server, "POST", "/deployments/filter", {})
                 if d["name"] in DEPLOYMENTS}
        if len(found) == len(DEPLOYMENTS):
            break
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"deployments never registered; {log_path.read_text()[-3000:]}"
        time.sleep(2)
    on_demand = found["on-demand"]["id"]
    before = {r["id"] for r in _runs_of(prefect_server, on_demand)}
    yield {"api": prefect_server, "ui": prefect_server.removesuffix("/api"), "ids": {n: d["id"] for n, d in found.items()},
           "log": log_path}
    ours = [r for r in _runs_of(prefect_server, on_demand) if r["id"] not in before]
    for r in ours:
        if r["state_type"] not in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            _api(prefect_server, "POST", f"/flow_runs/{r['id']}/set_state",
                 {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    deadline = time.monotonic() + 60  # the runner polls for cancellations and kills the run's process
    while any(_api(prefect_server, "GET", f"/flow_runs/{r['id']}")["state_type"] == "CANCELLING" for r in ours) \
            and time.monotonic() < deadline:
        time.sleep(2)
    proc.terminate()
    proc.wait(30)
    log.close()
    for r in ours:
        httpx.delete(f"{prefect_server}/flow_runs/{r['id']}", timeout=30)


def _open_on_demand(page, served):
    """The deployments list, then a click on the on-demand deployment."""
    page.goto(served["ui"] + "/deployments")
    page.get_by_role("link", name="on-demand", exact=True).first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/" + served["ids"]["on-demand"]))
    page.get_by_text("Deployment ID", exact=True).wait_for()  # the deployment's page, not the list's


def _custom_run_form(page):
    """Run -> Custom run: the parameter form built from StudyConfig's JSON schema."""
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url(re.compile(r"/run(\?|$)"))
    page.get_by_role("button", name="Submit", exact=True).wait_for()


def test_deployments_page_lists_both_with_the_nightly_schedule(page, shot, served):
    page.goto(served["ui"] + "/deployments")
    rows = {name: page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
            for name in DEPLOYMENTS}
    for name, row in rows.items():
        row.first.wait_for()
    shot("deployments")
    nightly, on_demand = rows["nightly"].first.inner_text(), rows["on-demand"].first.inner_text()
    # Prefect's description of the cron 0 3 * * * in the Schedules column; the on-demand study has none
    assert re.search(r"03:00 AM every day", nightly), nightly
    assert "every day" not in on_demand, on_demand
    # the schedule's own form (⋮ -> Edit) names its cron and timezone: UTC, though the browser is in New York
    dialog = schedule_form(page, "nightly", served["ids"]["nightly"], r"03:00 AM every day", shot)
    values = dialog.locator("input").evaluate_all("els => els.map(e => e.value)")
    assert "0 3 * * *" in values, values
    assert re.search(r"Timezone\s+UTC\b", dialog.inner_text()), dialog.inner_text()
    dialog.get_by_role("button", name="Close").last.click()  # nothing saved


def test_custom_run_from_the_form_creates_a_flow_run(page, shot, served, tiny_model_dir):
    api, on_demand = served["api"], served["ids"]["on-demand"]
    before = {r["id"] for r in _runs_of(api, on_demand)}
    _open_on_demand(page, served)
    shot("on-demand")
    _custom_run_form(page)
    shot("custom-run-form")
    # the whole study as JSON: the form's own "Use JSON input" mode (the per-field form has ~60 inputs)
    page.get_by_text("Parameters", exact=True).locator("xpath=..").get_by_role("button").first.click()
    page.get_by_text("Use JSON input", exact=True).click()
    config = tiny_config(tiny_model_dir, name="uilaunch")
    page.locator("textarea").last.fill(json.dumps({"config": config}, indent=2))
    shot("custom-run-json")
    page.get_by_role("button", name="Submit", exact=True).click()
    toast = page.locator("#prefect-design-toast-app")  # the visible toast (a hidden copy renders too)
    toast.get_by_text("scheduled to start now").first.wait_for()
    shot("submitted")
    new = [r for r in _runs_of(api, on_demand) if r["id"] not in before]
    assert len(new) == 1, new
    # its page: the served process picks the run up and the flow names it after the study
    page.goto(f"{served['ui']}/runs/flow-run/{new[0]['id']}")
    page.get_by_text(re.compile(r"^(Running|Completed)$")).first.wait_for(timeout=120_000)
    page.get_by_text(re.compile(r"uilaunch-\d{8}-\d{6}")).first.wait_for()
    shot("flow-run")
    assert new[0]["parameters"]["config"]["name"] == "uilaunch"
    assert new[0]["parameters"]["config"]["models"] == config["models"]


def test_out_of_range_temperature_is_refused_with_an_error(page, shot, served):
    api, on_demand = served["api"], served["ids"]["on-demand"]
    before = {r["id"] for r in _runs_of(api, on_demand)}
    _open_on_demand(page, served)
    _custom_run_form(page)
    # the per-field form: the first decoding's Temperature input, as a user would type it
    field = page.get_by_text("Temperature (Optional)", exact=True).first.locator("xpath=ancestor::*[.//input][1]")
    field.locator("input").first.fill("-1")
    shot("temperature-minus-1")
    page.get_by_role("button", name="Submit", exact=True).click()
    error = page.get_by_text(re.compile(r"temperature.*(minimum|greater than|> ?0)", re.I)).first
    error.wait_for()
    shot("refused")
    assert "temperature" in error.inner_text().lower()
    assert "/run" in page.url  # still on the form: nothing was launched
    time.sleep(2)  # a run created despite the error would show up by now
    assert {r["id"] for r in _runs_of(api, on_demand)} == before
