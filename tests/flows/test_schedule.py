"""Schedules fire: on a real Prefect server (the stack's), the nightly deployment served by
flows/serve.py, with its schedule moved to a few seconds from now, gets a run from Prefect's own
scheduler service (not from us), and the served study runs it to completion.

With SQLAlchemy 2.1 (Prefect 3.8.8) the scheduler fails on every loop with "Can't evaluate bulk DML
statement" and no run is ever created: this test then times out waiting for one.

Timing: the scheduler's "recent deployments" loop (every 5 s) schedules a deployment updated in the
last few seconds; the runner polls for due runs every 10 s (PREFECT_RUNNER_POLL_FREQUENCY).
"""
import json
import re
import subprocess
import time

from mlflow.tracking import MlflowClient

from tests.conftest import start_python, tiny_config

DUE_IN_S = 20  # the schedule's one run: this long after the served process computes it

# The real deployments (flows/serve.py), with the nightly's schedule one run due in DUE_IN_S seconds.
SERVE = """
import json, sys
from datetime import datetime, timedelta, timezone
from prefect.schedules import RRule
from entcal.flows.serve import serve_all
due = datetime.now(timezone.utc) + timedelta(seconds=float(sys.argv[2]))
print("due at", due.isoformat(), flush=True)
serve_all(limit=1, nightly=RRule(f"DTSTART:{due:%Y%m%dT%H%M%S}\\nRRULE:FREQ=DAILY;COUNT=1", timezone="UTC"),
          nightly_config=json.loads(sys.argv[1]))
"""


def test_schedule_fires_and_the_served_study_completes(prefect_server, stack, tiny_model_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter,
                                                DeploymentFilterId, FlowRunFilter, FlowRunFilterId)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = tiny_config(tiny_model_dir, name="scheduled")
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    env = {"PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    started = time.time()
    proc = start_python("-c", SERVE, json.dumps(config), str(DUE_IN_S), env=env, stdout=log, stderr=subprocess.STDOUT)
    tail = lambda: log_path.read_text()[-4000:]  # noqa: E731
    run = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 300
            while run is None or not run.state.is_final():
                assert proc.poll() is None, tail()
                assert time.monotonic() < deadline, (run and run.state, tail())
                time.sleep(3)
                try:
                    dep = client.read_deployment_by_name("entcal-study/nightly")
                except Exception:
                    continue
                if not any("COUNT=1" in (getattr(s.schedule, "rrule", None) or "") for s in dep.schedules):
                    continue  # still the previous registration
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                ours = [r for r in runs if r.created.timestamp() >= started - 1]
                run = ours[0] if ours else None
            # the scheduler made it (not a manual run), for the schedule's time, with the nightly's study
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
            # the nightly deployment served here carries a schedule due in seconds: later tests (the
            # Prefect UI's) serve the real one on this server, and must not find this one beside it
            client.delete_deployment(client.read_deployment_by_name("entcal-study/nightly").id)
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("entcal/scheduled")
    assert any(r.info.run_name == run.name for r in client.search_runs([exp.experiment_id]))  # both UIs agree
