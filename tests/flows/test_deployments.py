"""Deployments: prefect.yaml agrees with `entcal serve`, and a run triggered through a real Prefect
server's API (with parameters from the 'form') completes and lands in MLflow."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.config import StudyConfig

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_matches_served_deployments():
    from flows.serve import NIGHTLY_CRON, deployments

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert set(by_name) == {d.name for d in deployments()} == {"nightly", "on-demand"}
    for d in by_name.values():
        module, fn = d["entrypoint"].split(":")
        assert (ROOT / module).is_file() and fn == "study"
        StudyConfig.model_validate(d["parameters"]["config"])  # the defaults are valid studies
    assert by_name["nightly"]["schedules"][0]["cron"] == NIGHTLY_CRON


def test_flow_parameters_render_as_a_typed_form():
    from prefect.utilities.callables import parameter_schema

    from flows.study import study

    schema = parameter_schema(study.fn).model_dump()
    assert "config" in schema["properties"] and "StudyConfig" in schema["definitions"]
    assert schema["definitions"]["DecodingSpec"]["properties"]["temperature"]["type"] == "number"
    assert schema["definitions"]["StudyConfig"]["additionalProperties"] is False


def test_deployment_run_via_api_lands_in_mlflow(prefect_server, stack, tiny_spec, tmp_path, prefect_harness):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--limit", "1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    config = {"name": "deploytest", "models": [tiny_spec.model_dump()], "datasets": [{"name": "python-docs"}],
              "decodings": [{"temperature": 1.0}], "num_examples": 2, "prompt_tokens": 8, "max_new_tokens": 8,
              "min_reference_tokens": 8, "horizon": 8, "bootstrap": 20}
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            from prefect.client.orchestration import get_client

            deadline = time.monotonic() + 180
            with get_client(sync_client=True) as client:
                while True:
                    try:
                        client.read_deployment_by_name("entcal-study/on-demand")
                        break
                    except Exception:
                        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                        assert time.monotonic() < deadline, "deployments never registered"
                        time.sleep(2)
            run = run_deployment("entcal-study/on-demand", parameters={"config": config}, timeout=600)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        proc.terminate()
        proc.wait(30)
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("entcal/deploytest")
    runs = client.search_runs([exp.experiment_id])
    assert any("entce" in r.data.metrics for r in runs) and any(r.info.run_name == "deploytest" for r in runs)
    # another process with another Prefect database reuses the served run's cached work through S3
    from flows.study import study

    again = study(StudyConfig.model_validate(config))
    assert again["ran"] == [] and len(again["cached"]) == 4
