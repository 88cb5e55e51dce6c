"""Schedules fire: `entcal serve --config X.yaml --cron ...` on a real Prefect server (the stack's) serves
study X on that schedule; Prefect's own scheduler service (not us) creates its run when it comes due, and
the served study runs it to completion.

With SQLAlchemy 2.1 (Prefect 3.8.8) the scheduler fails on every loop with "Can't evaluate bulk DML
statement" and no run is ever created: this test then times out waiting for one.

Timing: the cron is due every 10 s (CRON: croniter's sixth field is the second, which Prefect accepts; the
minute's "* * * * *" made the test wait 0 to 60 s for the next minute); the scheduler's "recent
deployments" loop (every 5 s) schedules a deployment updated in the last few seconds; the runner polls for
due runs every 2 s here (PREFECT_RUNNER_POLL_FREQUENCY). The test stops serving once the first run ends.
"""
import re
import subprocess
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, start_cli, tiny_config

pytestmark = pytest.mark.services
CRON = "* * * * * */10"  # every 10 s


def test_your_study_on_a_cron_fires_and_completes(prefect_server, stack, tiny_model_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter,
                                                DeploymentFilterId, FlowRunFilter, FlowRunFilterId)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    study = tmp_path / "mine.yaml"
    study.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name="scheduled")))
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    started = time.time()
    proc = start_cli("serve", "--config", str(study), "--cron", CRON, "--timezone", "Europe/Paris",
                     env={"PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                     stdout=log, stderr=subprocess.STDOUT)
    tail = lambda: log_path.read_text()[-4000:]  # noqa: E731
    run = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 400
            while run is None or not run.state.is_final():
                assert proc.poll() is None, tail()
                assert time.monotonic() < deadline, (run and run.state, tail())
                time.sleep(3)
                try:
                    dep = client.read_deployment_by_name("entcal-study/scheduled")  # named after the study
                except Exception:
                    continue
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                ours = [r for r in runs if r.created.timestamp() >= started - 1 and r.state.is_final()]
                run = ours[0] if ours else None
            # the schedule as given, zone included; the on-demand form's defaults are this study
            (schedule,) = dep.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (CRON, "Europe/Paris")
            on_demand = client.read_deployment_by_name("entcal-study/on-demand")
            assert on_demand.parameters["config"]["name"] == "scheduled"
            # the scheduler made it (not a manual run), for the schedule's time, with the study's config
            assert run.auto_scheduled, run
            assert run.parameters["config"]["name"] == "scheduled"
            assert run.expected_start_time.timestamp() >= started
            assert run.state.is_completed(), (run.state, tail())
            # names: "<study>-<UTC time>" for the flow run; the work each task did for its task runs
            assert re.fullmatch(r"scheduled-\d{8}-\d{6}", run.name), run.name
            tasks = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))}
            assert {"prepare tiny/python-docs", "generate tiny/python-docs/t1", "score tiny/python-docs/t1",
                    "corpus-alpha python-docs"} <= tasks, tasks
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            progress = {a.key: a.description for a in arts if a.type == "progress"}
            # generation/scoring may be served from cache (earlier tests): then no progress artifact is made
            for key, description in progress.items():
                assert key.startswith(("entcal-generate-tiny-python-docs-t1", "entcal-score-tiny-python-docs-t1")), key
                assert description.endswith((": rows", ": examples")) and "tiny/python-docs/t1" in description
    finally:
        proc.terminate()
        proc.wait(30)
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            # a schedule due every 10 s, and an on-demand form with this study's defaults: later tests (the
            # Prefect UI's) serve the demo's on this server, and must not find these beside them
            for name in ("entcal-study/scheduled", "entcal-study/on-demand"):
                client.delete_deployment(client.read_deployment_by_name(name).id)
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("entcal/scheduled")
    assert any(r.info.run_name == run.name for r in client.search_runs([exp.experiment_id]))  # both UIs agree


def test_a_bad_schedule_is_one_line_before_any_service(tmp_path, tiny_model_dir):
    from tests.conftest import assert_one_line_error

    study = tmp_path / "mine.yaml"
    study.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name="mine")))
    for args, needle in (
            (("--cron", "61 3 * * *"), "study mine: --cron '61 3 * * *' --timezone UTC: "),
            (("--cron", "0 3 * * *", "--timezone", "Mars/Olympus"), "--timezone Mars/Olympus"),
            ((), "1 --config and 0 --cron: give each study file its schedule")):
        proc = run_cli("serve", "--config", str(study), *args, env={"ENTCAL_STATE_DIR": str(tmp_path / "never")})
        assert_one_line_error(proc, needle)
        assert not (tmp_path / "never" / "stack.json").exists()  # no service started
