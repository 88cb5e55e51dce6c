"""Killed and interrupted studies leave nothing RUNNING and no server up for good.

Real processes throughout: `entcal run` in a subprocess is killed with SIGKILL (no clean-up can run)
or SIGTERM (an orderly exit), or fails with an exception; its MLflow runs, its Prefect flow run and the
services ``storage.stack.ensure`` started are checked afterwards. Nothing is mocked."""
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import psutil

from entcal.storage.stack import Stack, ensure
from tests.conftest import run_cli, start_cli, start_python, tiny_config
from tests.reliability.test_faults import STUDY, TAG, Cli, _bucket, _write, fault

pytestmark = pytest.mark.services  # entcal or a server in a subprocess: not in make test-fast

HOLD = """import sys, time
from pathlib import Path
from entcal.storage.stack import ensure
with ensure(("s3",), Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


def _holder(root: Path) -> subprocess.Popen:
    """A process that uses the state dir's S3 through ``ensure`` and then hangs (to be killed)."""
    proc = start_python("-c", HOLD, str(root), env={"ENTCAL_STATE_DIR": str(root)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding", proc.communicate(timeout=30)
    return proc


def _alive(pid: int | None) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def _processes_of(root: Path) -> list[str]:
    """Live processes whose command line names the state dir (rclone's data dir, MLflow's database)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(root) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
            found.append(f"{p.pid} {cmd[:160]}")
    return found


def test_ensure_adopts_the_s3_server_a_killed_process_started_and_stops_it(tmp_path):
    root = tmp_path / "st"
    holder = _holder(root)
    st = Stack(root).state()
    pid = st["pids"]["s3"]
    assert st["ephemeral"] == {"s3": True} and [o["pid"] for o in st["owners"]["s3"]] == [holder.pid]
    holder.kill()
    holder.wait(30)
    time.sleep(0.5)
    assert _alive(pid), "rclone died with its owner: nothing to adopt"  # its own session: kill -9 spares it
    with ensure(("s3",), root) as settings:
        st = Stack(root).state()
        assert st["pids"]["s3"] == pid, "started a second S3 server instead of adopting the running one"
        assert [o["pid"] for o in st["owners"]["s3"]] == [os.getpid()]
        assert settings.s3_endpoint == st["s3"]
    assert not _alive(pid), "the adopted S3 server outlived the process that adopted it"
    assert not _processes_of(root)


def test_ensure_never_stops_a_server_another_live_process_or_stack_up_keeps(tmp_path):
    root = tmp_path / "st"
    holder = _holder(root)
    try:
        pid = Stack(root).state()["pids"]["s3"]
        with ensure(("s3",), root):
            owners = [o["pid"] for o in Stack(root).state()["owners"]["s3"]]
            assert owners == [holder.pid, os.getpid()]
        assert _alive(pid), "stopped an S3 server a live process still uses"
        assert Stack(root).up(("s3",)) == []  # `entcal stack up`: keep it
        assert "s3" not in Stack(root).state().get("ephemeral", {})
        holder.kill()
        holder.wait(30)
        with ensure(("s3",), root):
            pass
        assert _alive(pid), "ensure stopped a server `entcal stack up` keeps"
    finally:
        holder.kill()
        Stack(root).down()
    assert not _alive(pid)


# ------------------------------------------------------------------ the CLI, killed or failing
def _parent(mlflow_uri: str, experiment: str, owner_pid: int):
    """The MLflow study run the entcal process `owner_pid` started."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], f"tags.`entcal.owner_pid` = '{owner_pid}'")
    [parent] = [r for r in runs if r.data.tags.get("entcal.stage") == "study"]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _flow_run_state(api_url: str, owner_pid: int) -> str:
    """The state type of the entcal-study flow run labelled with owner `owner_pid` (Prefect server at api_url)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["entcal-study"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=200)
        runs = [r for r in runs if r.labels.get("entcal.owner_pid") == str(owner_pid)]
    assert len(runs) == 1, f"{len(runs)} flow runs labelled with pid {owner_pid}"
    return runs[0].state.type.value


def test_sigterm_ends_the_study_killed_and_its_flow_run_crashed(stack, prefect_server, tiny_model_dir, tmp_path):
    """SIGTERM is an orderly exit: exit 143, MLflow parent KILLED, flow run Crashed, in seconds."""
    cfg = _write(tmp_path, tiny_config(tiny_model_dir, **{**STUDY, "name": "sigterm"}))
    cli = Cli("run", "--config", cfg, env={"ENTCAL_BUCKET": _bucket("sigterm"), **fault("term", after=f"prepare {TAG}")},
              stdout=tmp_path / "cli.out")
    try:
        cli.wait_for(f"prepare {TAG}: ran")
        t0 = time.monotonic()
        rc = cli.finish(timeout=120)
    finally:
        cli.kill()
    assert rc == 128 + signal.SIGTERM, cli.stderr[-4000:]
    assert time.monotonic() - t0 < 60
    assert "entcal: terminated" in cli.stderr
    parent, children = _parent(stack.mlflow_uri, "entcal/sigterm", cli.proc.pid)
    assert parent.info.status == "KILLED", cli.stderr[-3000:]
    assert all(c.info.status != "RUNNING" for c in children)
    assert _flow_run_state(prefect_server, cli.proc.pid) == "CRASHED"


def test_an_exception_mid_study_ends_the_runs_failed(stack, prefect_server, tiny_model_dir, tmp_path):
    """A file where the first child's --out directory goes: the study raises after publishing it."""
    cfg = _write(tmp_path, tiny_config(tiny_model_dir, name="failing"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny__python-docs__t1.partial").write_text("in the way")
    proc = start_cli("run", "--config", cfg, "--out", str(out), env={"ENTCAL_BUCKET": _bucket("failing")},
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode not in (0, None), err[-3000:]
    parent, _ = _parent(stack.mlflow_uri, "entcal/failing", proc.pid)
    assert parent.info.status == "FAILED", err[-3000:]
    assert _flow_run_state(prefect_server, proc.pid) == "FAILED"


def _ephemeral_prefect_servers(home: Path) -> list[psutil.Process]:
    """Prefect's ephemeral API servers (uvicorn subprocesses) whose PREFECT_HOME is `home`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or []) \
                    and p.environ().get("PREFECT_HOME") == str(home):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_kill9_mid_run_then_rerun_ends_the_orphans_and_leaves_no_server(tiny_model_dir, tmp_path):
    """`entcal run` with its own state dir (so ensure() starts S3 and MLflow, and Prefect runs its
    ephemeral server on a database under the state dir) is killed with SIGKILL mid-run; the rerun
    marks the killed run's MLflow runs KILLED and its flow run Crashed, adopts the servers the killed run
    started and stops them when it ends."""
    root = tmp_path / "state"
    env = {"ENTCAL_STATE_DIR": str(root), "PREFECT_HOME": str(root / "prefect"), "ENTCAL_BUCKET": "entcal",
           "ENTCAL_MLFLOW_START_TIMEOUT_S": "600", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    # (MLflow takes ~10 s to start on 2 idle cores, Prefect 10 s; far more on a busy machine)
    cfg = _write(tmp_path, tiny_config(tiny_model_dir, **{**STUDY, "name": "kill9"}))
    # SIGKILL to the entcal process only, after its first stage: its servers live in their own sessions
    cli = Cli("run", "--config", cfg, env={**env, **fault("kill", after=f"prepare {TAG}")}, stdout=tmp_path / "killed.out")
    try:
        assert cli.proc.wait(900) == -signal.SIGKILL, cli.stderr[-4000:]
        killed = cli.proc.pid
        st = Stack(root).state()
        servers = dict(st["pids"])
        assert set(servers) == {"s3", "mlflow"} and all(_alive(p) for p in servers.values())
        assert {n: [o["pid"] for o in st["owners"][n]] for n in servers} == {"s3": [killed], "mlflow": [killed]}

        [orphan] = _ephemeral_prefect_servers(root / "prefect")  # Prefect's own server, left by the kill
        rerun = run_cli("run", "--config", cfg, env=env, check=True)
        assert "adopting s3" in rerun.stderr and "adopting mlflow" in rerun.stderr, rerun.stderr[-4000:]
        leftover = [n for n, p in servers.items() if _alive(p)]
        assert not leftover, f"still running after the rerun: {leftover}"
        assert not _processes_of(root)
        assert not orphan.is_running() and not _ephemeral_prefect_servers(root / "prefect")

        # the killed run's records, read from what is left on disk (its servers are down now)
        rows = sqlite3.connect(root / "mlflow.db").execute(
            "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'entcal.owner_pid'").fetchall()
        assert {status for pid, status in rows if pid == str(killed)} == {"KILLED"}, rows
        [rerun_pid] = {pid for pid, _ in rows if pid != str(killed)}
        assert {status for pid, status in rows if pid == rerun_pid} == {"FINISHED"}, rows
        flow_runs = [(json.loads(labels or "{}").get("entcal.owner_pid"), state) for labels, state in
                     sqlite3.connect(root / "prefect" / "prefect.db").execute("SELECT labels, state_type FROM flow_run")]
        assert sorted(flow_runs) == sorted([(str(killed), "CRASHED"), (rerun_pid, "COMPLETED")]), flow_runs
    finally:
        for p in _ephemeral_prefect_servers(root / "prefect"):
            p.kill()
        Stack(root).down()

