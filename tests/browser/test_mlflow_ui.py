"""The real MLflow UI, in a real browser (fresh profile: no stored UI choices), on the stack's MLflow
server after a tiny study: the experiment URL the study prints opens on the runs table (not the GenAI
overview) with the headline metric columns already there, and a child run's EntCE is on it."""
from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def studied(stack, prefect_harness, tiny_model_dir, tmp_path_factory):
    """A tiny study run by the flow; returns its result, its parent run's name and its child runs' EntCE."""
    from entcal.flows.study import study
    from entcal.tasks.config import StudyConfig

    result = study(StudyConfig.model_validate(tiny_config(tiny_model_dir, name="uibrowse")),
                   out=str(tmp_path_factory.mktemp("out")))
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result['run_id']}'")
    entce = {r.info.run_name: r.data.metrics["entce"] for r in children if "entce" in r.data.metrics}
    assert entce, [r.data.metrics for r in children]
    return {**result, "parent_name": parent.info.run_name, "entce": entce}


def _runs_table(page):
    """Wait for the runs table (its Run Name header); MLflow's pages poll, so not for the network to idle."""
    page.get_by_role("columnheader", name="Run Name").first.wait_for()


def _row_text(page, run_name: str) -> str:
    """All cells of the runs-table row named ``run_name``: ag-grid splits a row between its pinned and
    scrolled parts, one [role=row] element each, joined by their row-index."""
    name_part = page.locator("[role=row][row-index]").filter(has_text=run_name).first
    name_part.wait_for()
    index = name_part.get_attribute("row-index")
    return " | ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts())


def test_experiment_url_opens_the_runs_table_with_the_entce_columns(page, shot, studied):
    url = studied["experiment_url"]
    assert "workflowType=machine_learning" in url and "viewStateShareKey=" in url, url
    page.goto(url)
    _runs_table(page)
    page.wait_for_timeout(2000)  # a late redirect (to the GenAI overview) would happen by now
    shot("experiment")
    assert re.search(r"#/experiments/\d+/runs\?", page.url) and "workflowType=machine_learning" in page.url, page.url
    # no column picked by hand: the study's shared view state selected them
    for metric in ("entce", "entce_ci_low", "entce_ci_high", "entropy_mean", "logloss_mean"):
        header = page.get_by_role("columnheader", name=metric, exact=True).first
        header.wait_for()
        assert header.bounding_box()["width"] >= 140, (metric, header.bounding_box())  # values not cut
    assert page.get_by_text("share key", exact=False).count() == 0  # no "shared view state" error


def test_a_child_runs_entce_is_on_the_runs_table(page, shot, studied):
    page.goto(studied["experiment_url"])
    _runs_table(page)
    page.get_by_role("columnheader", name="entce", exact=True).first.wait_for()
    name, value = next(iter(studied["entce"].items()))
    if page.locator("[role=row][row-index]").filter(has_text=name).count() == 0:
        # child runs sit under the study's parent run: open its expander (MLflow shares no runsExpanded)
        parent = page.locator("[role=row][row-index]").filter(has_text=studied["parent_name"]).first
        parent.locator("button").first.click()
    text = _row_text(page, name)
    shot("entce-values")
    shown = re.findall(r"-?\d+\.\d+", text)
    assert any(abs(float(v) - value) < 1e-3 for v in shown), (text, value)


def test_run_url_opens_the_run_page(page, shot, studied):
    assert studied["run_url"].endswith("?workflowType=machine_learning"), studied["run_url"]
    page.goto(studied["run_url"])
    page.get_by_text(studied["parent_name"]).first.wait_for()
    shot("run")
    assert f"/runs/{studied['run_id']}" in page.url and "workflowType=machine_learning" in page.url, page.url
