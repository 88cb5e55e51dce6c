"""The real MLflow UI, in a real browser (fresh profile: no stored UI choices), on the stack's MLflow
server after a tiny study: the experiment opens on its runs, and EntCE is on the runs table."""
from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def studied(stack, prefect_harness, tiny_model_dir, tmp_path_factory):
    """A tiny study run by the flow; returns the MLflow experiment and its child runs' EntCE."""
    from flows.study import study
    from tasks.config import StudyConfig

    study(StudyConfig.model_validate(tiny_config(tiny_model_dir, name="uibrowse")),
          out=str(tmp_path_factory.mktemp("out")))
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("entcal/uibrowse")
    runs = client.search_runs([exp.experiment_id])
    entce = {r.info.run_name: r.data.metrics["entce"] for r in runs if "entce" in r.data.metrics}
    assert entce, [r.data.metrics for r in runs]
    return {"ui": stack.mlflow_uri.rstrip("/"), "id": exp.experiment_id, "entce": entce}


def _settle(page, timeout_s: float = 60):
    """Wait until the experiment page has routed to a tab (runs, traces, overview...); not for the
    network to idle: MLflow's pages poll."""
    page.wait_for_url(re.compile(r"#/experiments/\d+/\w+"), timeout=timeout_s * 1000)


def test_experiment_opens_on_its_runs_table(page, shot, studied):
    # where the Experiments list, and MLflow's own "View experiment at" link, take a user
    page.goto(f"{studied['ui']}/#/experiments/{studied['id']}")
    _settle(page)
    page.wait_for_timeout(2000)  # a late redirect (to the GenAI overview) would happen by now
    shot("experiment")
    assert re.search(rf"#/experiments/{studied['id']}/runs", page.url), page.url
    assert "workflowType=genai" not in page.url, page.url
    page.get_by_role("columnheader", name="Run Name").first.wait_for()


def test_entce_is_on_the_runs_table(page, shot, studied):
    page.goto(f"{studied['ui']}/#/experiments/{studied['id']}/runs")
    _settle(page)
    page.get_by_role("columnheader", name="Run Name").first.wait_for()
    if page.get_by_role("columnheader", name="entce", exact=True).count() == 0:
        # MLflow 3.17 shows no metric columns until picked: pick EntCE as a user would
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill("entce")
        page.get_by_text("entce", exact=True).first.click()  # the picker item (its label)
        page.keyboard.press("Escape")
    shot("entce-column")
    page.get_by_role("columnheader", name="entce", exact=True).first.wait_for()
    # the child runs (one per model × dataset × decoding) sit under the study's parent run
    expand = page.locator("[role=row] button").first
    if expand.count():
        expand.click()
    name, value = next(iter(studied["entce"].items()))
    row = page.get_by_role("row").filter(has_text=name).first
    row.wait_for()
    shot("entce-values")
    shown = re.findall(r"-?\d+\.\d+", row.inner_text())
    assert any(abs(float(v) - value) < 1e-3 for v in shown), (row.inner_text(), value)
