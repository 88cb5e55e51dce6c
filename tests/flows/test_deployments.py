"""Deployments: prefect.yaml agrees with `entcal serve`, and a run triggered through a real Prefect
server's API (with parameters from the 'form') completes and lands in MLflow."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from entcal.tasks.config import StudyConfig
from tests.conftest import start_cli

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_matches_served_deployments():
    from entcal.flows.serve import NIGHTLY_CRON, deployments
    from entcal.flows.serve import demo_config

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in doc["deployments"]}
    served = {d.name: d for d in deployments()}
    assert set(by_name) == set(served) == {"nightly", "on-demand"}
    for name, d in by_name.items():
        # a module path of the installed package (entcal.flows.study.study), as `entcal serve` registers it
        assert d["entrypoint"] == served[name].entrypoint == "entcal.flows.study.study"
        StudyConfig.model_validate(d["parameters"]["config"])  # the defaults are valid studies
        # the same defaults as `entcal serve` (demo_config); horizon left to its rule, not pinned
        assert d["parameters"]["config"] == served[name].parameters["config"] == demo_config(quick=name == "on-demand")
        assert "horizon" not in d["parameters"]["config"]
        # both refuse out-of-range parameters at creation (see test_out_of_range_run_is_refused_*)
        assert d["enforce_parameter_schema"] is True and served[name].enforce_parameter_schema is True
    assert by_name["nightly"]["schedules"] == [{"cron": NIGHTLY_CRON, "timezone": "UTC"}]
    assert "schedules" not in by_name["on-demand"] and served["on-demand"].schedules == []


def test_nightly_schedule_is_03_00_utc():
    """The schedule names its zone (UTC) and the server's own date generator puts it at 03:00 UTC."""
    import asyncio
    from datetime import datetime, timezone

    from prefect.server.schemas.schedules import CronSchedule

    from entcal.flows.serve import deployments

    (schedule,) = [s.schedule for s in {d.name: d for d in deployments()}["nightly"].schedules]
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "UTC")
    server_side = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    dates = asyncio.run(server_side.get_dates(n=2, start=datetime(2026, 3, 29, 12, tzinfo=timezone.utc)))
    assert [d.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") for d in dates] == ["2026-03-30 03:00",
                                                                                     "2026-03-31 03:00"]


def test_every_decoding_field_is_described_and_ranged_in_the_form():
    """The UI form is the JSON schema: each DecodingSpec field says what it is, and its range is there
    (so the API, not the worker, refuses an out-of-range value)."""
    from entcal.flows.serve import deployments

    for dep in deployments():
        props = dep._parameter_openapi_schema.model_dump()["definitions"]["DecodingSpec"]["properties"]
        assert set(props) == {"temperature", "top_k", "top_p", "min_p", "top_nsigma", "typical_p", "epsilon_cutoff",
                              "eta_cutoff"}
        for name, prop in props.items():
            assert prop.get("description"), name
            assert {"minimum", "exclusiveMinimum"} & set(prop), name  # a lower bound reaches the form
        assert props["temperature"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
        assert props["min_p"]["exclusiveMaximum"] == 1
        assert props["typical_p"]["maximum"] == 1 and props["eta_cutoff"]["exclusiveMaximum"] == 1
        assert props["epsilon_cutoff"]["exclusiveMaximum"] == 1


def test_ui_settings_name_the_real_api_url(prefect_server):
    """The stack's server runs on a random port: the UI must be told that port, not 4200."""
    import json
    import urllib.request

    with urllib.request.urlopen(prefect_server.removesuffix("/api") + "/ui-settings", timeout=10) as r:
        settings = json.load(r)
    assert settings["api_url"] == prefect_server and not prefect_server.endswith(":4200/api")


BAD_DECODING = {"name": "bad", "decodings": [{"temperature": -1}]}
# how the server's JSON-schema check names the field and says what is wrong with it
BAD_FIELD, BAD_REASON = "config.decodings[0].temperature", "-1 is less than or equal to the minimum of 0"


def _flow_runs_of(client, deployment_id) -> int:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return len(client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))))


def test_out_of_range_run_is_refused_by_the_api(prefect_server):
    """The served on-demand deployment (flows/serve.py), registered on a real server: creating a run
    with temperature −1 is refused, with the field named, and no run exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from entcal.flows.serve import deployments

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        on_demand = {d.name: d for d in deployments()}["on-demand"]
        dep_id = on_demand.apply()
        with get_client(sync_client=True) as client:
            before = _flow_runs_of(client, dep_id)
            with pytest.raises(PrefectHTTPStatusError) as err:
                client.create_flow_run_from_deployment(dep_id, parameters={"config": BAD_DECODING})
            assert err.value.response.status_code == 409
            detail = err.value.response.json()["detail"]
            assert f"{BAD_FIELD!r}" in detail and BAD_REASON in detail, detail
            assert _flow_runs_of(client, dep_id) == before
            # the same deployment accepts an in-range value: the refusal is about the value
            ok = client.create_flow_run_from_deployment(
                dep_id, parameters={"config": {**BAD_DECODING, "decodings": [{"temperature": 0.5}]}})
            client.delete_flow_run(ok.id)


def test_out_of_range_run_is_refused_by_the_cli_for_prefect_yaml(prefect_server, tmp_path):
    """prefect.yaml's on-demand deployment, deployed with `prefect deploy` to a real server: `prefect
    deployment run --param config=…` with temperature −1 exits non-zero naming the field; no run exists."""
    import json

    env = {**os.environ, "PREFECT_API_URL": prefect_server}

    def prefect(*args, timeout=300):
        return subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=timeout)

    pool = prefect("work-pool", "create", "gpu", "--type", "process", "--overwrite")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = prefect("--no-prompt", "deploy", "--name", "on-demand")
    assert deployed.returncode == 0, (deployed.stdout + deployed.stderr)[-3000:]
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("entcal-study/on-demand")
        assert dep.enforce_parameter_schema and dep.work_pool_name == "gpu"
        before = _flow_runs_of(client, dep.id)
        run = prefect("deployment", "run", "entcal-study/on-demand", "--param", f"config={json.dumps(BAD_DECODING)}")
        out = " ".join((run.stdout + run.stderr).split())  # the console wraps long lines
        assert run.returncode != 0, out
        assert f"{BAD_FIELD!r}" in out and BAD_REASON in out, out[-3000:]
        assert _flow_runs_of(client, dep.id) == before


def test_flow_parameters_render_as_a_typed_form():
    from prefect.utilities.callables import parameter_schema

    from entcal.flows.study import study

    schema = parameter_schema(study.fn).model_dump()
    assert schema["properties"]["config"]["$ref"] == "#/definitions/StudyConfig" and schema["required"] == ["config"]
    assert schema["definitions"]["DecodingSpec"]["properties"]["temperature"]["type"] == "number"
    assert schema["definitions"]["StudyConfig"]["additionalProperties"] is False


def test_deployment_run_via_api_lands_in_mlflow(prefect_server, stack, tiny_spec, tmp_path, prefect_harness):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log = open(tmp_path / "serve.log", "w")
    proc = start_cli("serve", "--limit", "1", env={"PREFECT_API_URL": prefect_server}, stdout=log,
                     stderr=subprocess.STDOUT)
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
    assert any("entce" in r.data.metrics for r in runs) and any(r.info.run_name == run.name for r in runs)
    assert re.fullmatch(r"deploytest-\d{8}-\d{6}", run.name), run.name  # <study>-<UTC time>
    # another process with another Prefect database reuses the served run's cached work through S3
    from entcal.flows.study import study

    again = study(StudyConfig.model_validate(config))
    assert again["ran"] == [] and len(again["cached"]) == 4


def test_deploy_registers_your_studies_with_their_schedules_on_a_work_pool(prefect_server, tmp_path, tiny_model_dir):
    """`entcal deploy --pool P --config X --cron ...`: the studies and the on-demand form, for the workers of
    a work pool, with no YAML edited; the code they run is the installed package's (a module path)."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.conftest import assert_one_line_error, run_cli, tiny_config

    pool = f"pool-{uuid.uuid4().hex[:6]}"
    files = []
    for name in ("night-owl", "early-bird"):
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name=name)))
    args = ("deploy", "--pool", pool, "--config", str(files[0]), "--cron", "0 3 * * *", "--config", str(files[1]),
            "--cron", "30 5 * * 1-5", "--timezone", "Europe/Paris")
    env = {"PREFECT_API_URL": prefect_server}
    assert_one_line_error(run_cli(*args, env=env), f"work pool {pool!r} does not exist on this Prefect server")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        proc = run_cli(*args, env=env)
        assert proc.returncode == 0 and "deployed night-owl, early-bird and on-demand (3 deployments)" in proc.stdout, \
            proc.stderr[-3000:]
        deps = {n: client.read_deployment_by_name(f"entcal-study/{n}") for n in ("night-owl", "early-bird", "on-demand")}
        for name, dep in deps.items():
            assert dep.work_pool_name == pool and dep.entrypoint == "entcal.flows.study.study"
            assert dep.enforce_parameter_schema
        assert [(s.schedule.cron, s.schedule.timezone) for s in deps["early-bird"].schedules] == [
            ("30 5 * * 1-5", "Europe/Paris")]
        assert deps["night-owl"].parameters["config"]["name"] == "night-owl"
        assert deps["on-demand"].parameters["config"]["name"] == "night-owl" and not deps["on-demand"].schedules
        for dep in deps.values():
            client.delete_deployment(dep.id)
