"""The real MLflow UI, in a real browser (fresh profile: no stored UI choices), on the stack's MLflow
server after a tiny study: the experiment URL the study prints opens on the runs table (not the GenAI
overview) with the headline metric columns already there, and every child run's EntCE and the identity
of the weights and data it read are on it, no expander opened."""
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

    result = study(StudyConfig.model_validate(tiny_config(tiny_model_dir, name="uibrowse", decodings=[
        {"temperature": 1.0}, {"temperature": 0.7}])), out=str(tmp_path_factory.mktemp("out")))
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result['run_id']}'")
    entce = {r.info.run_name: r.data.metrics["entce"] for r in children if "entce" in r.data.metrics}
    identity = {r.data.tags["entcal.model_identity"] for r in children}
    assert len(entce) == 2 and len(identity) == 1, [r.data.metrics for r in children]
    return {**result, "parent_name": parent.info.run_name, "entce": entce, "identity": identity.pop()}


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
    # no column picked by hand: the study's shared view state selected them, EntCE and its CI first
    for metric in ("entce", "entce_ci_low", "entce_ci_high"):
        header = page.get_by_role("columnheader", name=metric, exact=True).first
        header.wait_for()
        assert header.bounding_box()["width"] >= 120, (metric, header.bounding_box())  # values readable
    assert page.get_by_text("share key", exact=False).count() == 0  # no "shared view state" error


def test_every_child_runs_entce_and_identity_are_on_the_runs_table(page, shot, studied):
    """The link opens on the child runs (their parent would fold them under an expander, which MLflow
    does not share), each row with its EntCE and, in a column, the weights' identity."""
    page.goto(studied["experiment_url"])
    _runs_table(page)
    page.get_by_role("columnheader", name="entce", exact=True).first.wait_for()
    page.get_by_role("columnheader", name="entcal.model_identity", exact=False).first.wait_for()
    shot("entce-values")
    for name, value in studied["entce"].items():
        text = _row_text(page, name)
        shown = re.findall(r"-?\d+\.\d+", text)
        assert any(abs(float(v) - value) < 1e-3 for v in shown), (text, value)
        assert studied["identity"][:24] in text, (text, studied["identity"])  # (the cell may cut the tail)


def test_run_url_opens_the_run_page(page, shot, studied):
    assert studied["run_url"].endswith("?workflowType=machine_learning"), studied["run_url"]
    page.goto(studied["run_url"])
    page.get_by_text(studied["parent_name"]).first.wait_for()
    shot("run")
    assert f"/runs/{studied['run_id']}" in page.url and "workflowType=machine_learning" in page.url, page.url
