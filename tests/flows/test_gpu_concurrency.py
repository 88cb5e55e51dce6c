"""One study per GPU at a time: two studies started at once on one machine take turns on its devices (an
operating-system file lock per device, storage/locks.py, held by flows/executor.py:Executor), and both
complete; a killed holder's lock is free at once, with nothing to sweep."""
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from itertools import product

import pytest
import yaml

from tests.conftest import start_cli, start_python, tiny_config

pytestmark = pytest.mark.services  # entcal or a server in a subprocess: not in make test-fast

# per study (with its own seed): nothing either study runs is in the other's cache, the scoring included
DECODINGS = ([{"temperature": 1.0}, {"temperature": 0.85}, {"temperature": 1.0, "top_p": 0.92}],
             [{"temperature": 1.0}, {"temperature": 0.75}, {"temperature": 1.0, "top_p": 0.85}])


def _task_runs(api_url: str, study: str) -> tuple:
    """(the study's flow run, its task runs), found by the flow run's name ``<study>-<UTC time>``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{study}-")))
        return run, client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200)


# A process that holds this machine's CPU "GPU" lock, as a study's executor does, until its stdin closes
HOLDER = r"""
import logging, sys
from entcal.storage import locks

with locks.hold(["cpu"], sys.argv[1] if len(sys.argv) > 1 else "holder", logging.getLogger("holder")):
    print("held", flush=True)
    sys.stdin.read()
"""


def _hold_gpu(*args: str, env: dict | None = None) -> subprocess.Popen:
    """A process that holds the device lock until its stdin is closed (or it is killed)."""
    holder = start_python("-c", HOLDER, *args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    out = _Output(holder)
    try:
        _wait_for(lambda: out.count("held\n") or holder.poll() is not None, "the holder taking the lock", 120)
    finally:
        if not out.count("held\n"):
            holder.kill()
    assert out.count("held\n"), out.text()[-3000:]
    return holder


class _Output:
    """A process's stdout and stderr together, read as it writes them (nothing blocks on a full pipe)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._reader.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def count(self, needle: str) -> int:
        return sum(needle in line for line in list(self.lines))


def _wait_for(cond, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)


WAITING = "waiting for cpu on this machine: "


def test_two_studies_at_once_take_turns_on_the_machine_s_gpu(tiny_model_dir, prefect_server, tmp_path):
    """Two `entcal run` processes (think: the nightly run and an on-demand one) against one Prefect
    server, with different seeds and decodings (nothing cached), both waiting for the GPU while a third
    holds it (so both are running at once, however slowly each starts), then let go together. Both
    complete; no two model-bound task runs of the two studies overlap in time: one study's model-bound
    work all comes after the other's; each said once that it waited, naming who held the device."""
    from entcal.flows.results import result_storage
    from entcal.storage import locks
    from entcal.storage.settings import from_env

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):  # a server that has seen a study (two first
        result_storage(from_env())  # studies race to register the result block's type: ObjectAlreadyExists)
    holder = _hold_gpu("the-holder")
    tag = uuid.uuid4().hex[:6]
    studies = [f"gpu-a-{tag}", f"gpu-b-{tag}"]
    procs, outs = [], []
    try:
        for seed, name in enumerate(studies):
            cfg = tmp_path / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name=name, seed=7001 + seed,  # no other test's
                                                    decodings=DECODINGS[seed])))
            procs.append(start_cli("run", "--config", str(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True))
            outs.append(_Output(procs[-1]))
        _wait_for(lambda: all(o.count(WAITING) or p.poll() is not None for p, o in zip(procs, outs)),
                  "both studies waiting for the GPU")
        assert all(p.poll() is None for p in procs), [o.text()[-3000:] for o in outs]
    finally:
        holder.stdin.close()  # let go: the two studies race for the lock
        holder.wait(timeout=60)
    for p, o in zip(procs, outs):
        assert p.wait(timeout=300) == 0, o.text()[-4000:]
        o._reader.join(timeout=10)

    runs = [_task_runs(prefect_server, s) for s in studies]
    assert all(flow_run.state.is_completed() for flow_run, _ in runs), [r.state for r, _ in runs]
    assert [o.count(WAITING) for o in outs] == [1, 1], [o.text()[-2000:] for o in outs]  # said once, each
    assert all(o.count(f"{WAITING}study the-holder (pid {holder.pid})") == 1 for o in outs)
    assert locks.holder("cpu") is None  # the lock file says nobody holds it

    gpu = []  # per study: its model-bound task runs, each (name, start, end)
    for flow_run, task_runs in runs:
        model_bound = [t for t in task_runs if t.name.startswith(("generate", "score"))]
        assert len(model_bound) == 3 + 1, [t.name for t in task_runs]  # 3 generations + scoring
        assert all(t.state.is_completed() and t.state.name != "Cached" for t in model_bound), \
            [(t.name, t.state.name) for t in model_bound]
        gpu.append([(t.name, t.start_time, t.end_time) for t in model_bound])
    a, b = gpu
    for x, y in product(a, b):  # never two studies on the device at once
        assert x[2] <= y[1] or y[2] <= x[1], f"{x} and {y} overlap"
    first, second = (a, b) if min(s for _, s, _ in a) < min(s for _, s, _ in b) else (b, a)
    assert max(e for *_, e in first) <= min(s for _, s, _ in second)  # the second study waited for the whole first


def test_a_killed_holder_s_lock_is_free_at_once_and_other_state_dirs_see_it(tmp_path):
    """The kernel gives a lock back when its holder dies, SIGKILL included: the next study takes it at once,
    with nothing to sweep. A study with another state directory (another user's, say) still waits for it."""
    from entcal.storage import locks

    holder = _hold_gpu("killed", env={"ENTCAL_STATE_DIR": str(tmp_path / "someone-else")})
    messages: list[str] = []
    log = logging.getLogger("test.locks")
    log.addHandler(handler := type("H", (logging.Handler,), {"emit": lambda self, r: messages.append(r.getMessage())})())
    log.setLevel(logging.INFO)
    took = threading.Event()

    def study():
        with locks.hold(["cpu"], "waiter", log):
            took.set()
    try:
        threading.Thread(target=study, daemon=True).start()
        assert not took.wait(3), "a second study took the device while another process held it"
        assert any(m.startswith(f"waiting for cpu on this machine: study killed (pid {holder.pid})")
                   for m in messages), messages
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        assert took.wait(10), "the lock of a killed holder was not free at once"
    finally:
        log.removeHandler(handler)
        if holder.poll() is None:
            holder.kill()


def test_a_study_on_a_shared_ray_cluster_takes_no_device_lock(monkeypatch, tmp_path):
    """With RAY_ADDRESS set and executor: ray, Ray's GPU resources keep tasks apart: the executor locks
    nothing (a study here would otherwise serialise a whole cluster's shards)."""
    from entcal.flows.executor import Executor
    from entcal.storage import locks
    from entcal.storage.settings import Settings
    from entcal.tasks.config import StudyConfig

    holder = _hold_gpu("busy")
    try:
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
        with Executor(StudyConfig.model_validate({"executor": "ray"}), Settings(tmp_path), logging.getLogger()):
            assert locks.holder("cpu")["study"] == "busy"
    finally:
        holder.stdin.close()
        holder.wait(30)
