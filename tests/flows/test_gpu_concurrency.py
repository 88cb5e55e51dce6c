"""One study per GPU at a time: two studies started at once on one machine take turns on its devices (a
slot of Prefect's global concurrency limit entcal-gpu per study, flows/executor.py:device_slot), and both
complete."""
import contextlib
import subprocess
import threading
import time
import uuid
from itertools import product

import yaml

from entcal.flows.executor import GPU_LIMIT as LIMIT
from tests.conftest import start_cli, start_python, tiny_config
# per study (with its own seed): nothing either study runs is in the other's cache, the scoring included
DECODINGS = ([{"temperature": 1.0}, {"temperature": 0.85}, {"temperature": 1.0, "top_p": 0.92}],
             [{"temperature": 1.0}, {"temperature": 0.75}, {"temperature": 1.0, "top_p": 0.85}])


@contextlib.contextmanager
def _client(api_url: str):
    """A Prefect client of the stack's server (and its settings for device_slot), whatever the session set up."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _wait_until_free(client, timeout_s: float = 240) -> None:
    """Until no slot of the limit is held: a study killed by an earlier test (the Prefect UI tests cancel
    theirs) holds its slot until the lease expires (60 s, and the server's sweep)."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.read_global_concurrency_limit_by_name(LIMIT).active_slots == 0:
                return
        except ObjectNotFound:
            return
        assert time.monotonic() < deadline, f"a slot of {LIMIT} stayed held for {timeout_s:.0f} s"
        time.sleep(2)


def _task_runs(client, study: str) -> tuple:
    """(the study's flow run, its task runs), found by the flow run's name ``<study>-<UTC time>``."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{study}-")))
    return run, client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200)


# A study's flow run (named like one, labelled like one) that holds the GPU slot until its stdin closes
HOLDER = r"""
import logging, sys
from prefect import flow
from entcal.flows.executor import device_slot
from entcal.tasks.config import StudyConfig


@flow(name="entcal-study")
def hold():
    with device_slot(StudyConfig.model_validate({}), logging.getLogger("holder")):
        print("held", flush=True)
        sys.stdin.read()


hold()
"""


def _hold_gpu(api_url: str) -> subprocess.Popen:
    """A process whose study-like flow run holds the GPU slot until its stdin is closed (or it is killed)."""
    holder = start_python("-c", HOLDER, env={"PREFECT_API_URL": api_url, "RAY_ADDRESS": ""}, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _Output(holder)
    try:
        _wait_for(lambda: out.count("held\n") or holder.poll() is not None, "the holder taking the GPU slot", 120)
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


WAITING = "waiting for this machine's GPU"


def test_two_studies_at_once_take_turns_on_the_machine_s_gpu(tiny_model_dir, prefect_server, tmp_path):
    """Two `entcal run` processes (think: the nightly run and an on-demand one) against one Prefect
    server, with different seeds and decodings (nothing cached), both waiting for the GPU while a third
    holds it (so both are running at once, however slowly each starts), then let go together. Both
    complete; no two model-bound task runs of the two studies overlap in time: one study's model-bound
    work all comes after the other's; each said once that it waited; the limit's one slot is given back."""
    from entcal.flows.results import result_storage
    from entcal.storage.settings import from_env

    with _client(prefect_server) as client:  # a server that has seen a study (two first studies race to
        result_storage(from_env())  # register the result block's type: ObjectAlreadyExists)
        _wait_until_free(client)
    holder = _hold_gpu(prefect_server)
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
        holder.stdin.close()  # let go: the two studies race for the slot
        holder.wait(timeout=60)
    for p, o in zip(procs, outs):
        assert p.wait(timeout=300) == 0, o.text()[-4000:]
        o._reader.join(timeout=10)

    with _client(prefect_server) as client:
        limit = client.read_global_concurrency_limit_by_name(LIMIT)
        runs = [_task_runs(client, s) for s in studies]
    assert limit.limit == 1 and limit.active and limit.active_slots == 0  # one slot, given back
    assert all(flow_run.state.is_completed() for flow_run, _ in runs), [r.state for r, _ in runs]
    assert [o.count(WAITING) for o in outs] == [1, 1], [o.text()[-2000:] for o in outs]  # said once, each

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


SLOT_SCRIPT = r"""
import logging, os, subprocess, sys, threading

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

from entcal.flows.executor import GPU_LIMIT, device_slot
from entcal.tasks.config import StudyConfig

lines = []
log = logging.getLogger("test.gpu")
log.setLevel(logging.INFO)
log.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: lines.append(r.getMessage())})())
local, ray = StudyConfig.model_validate({}), StudyConfig.model_validate({"executor": "ray"})
client = get_client(sync_client=True).__enter__()


def limit():
    return client.read_global_concurrency_limit_by_name(GPU_LIMIT)


def set_limit(n):
    try:
        client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=n))
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=n))


# 1. a user's limit of 3 slots stands; each study (a Ray instance of its own too) holds one
set_limit(3)
with device_slot(local, log):
    assert limit().active_slots == 1
    with device_slot(ray, log):
        assert limit().active_slots == 2
assert (limit().active_slots, limit().limit) == (0, 3)
set_limit(1)

# 2. a running study holds the GPU: another waits and says so, a study on a shared Ray cluster takes no
#    slot, and the waiting one goes on when the first is done
go, holding, done = threading.Event(), threading.Event(), threading.Event()


@flow(name="entcal-study")
def holder():
    with device_slot(local, log):
        holding.set()
        go.wait(120)


def waiter():
    with device_slot(local, log):
        done.set()


threading.Thread(target=holder).start()
assert holding.wait(60)
threading.Thread(target=waiter).start()
assert not done.wait(5), "a second study took the GPU while the first held it"
os.environ["RAY_ADDRESS"] = "127.0.0.1:6379"
with device_slot(ray, log):
    assert limit().active_slots == 1
del os.environ["RAY_ADDRESS"]
go.set()
assert done.wait(60), "the waiting study never got the GPU"
print("WAITED", sum("waiting for this machine's GPU" in l for l in lines), flush=True)

# 3. a study killed with SIGKILL while it held the slot: the next study frees the slot and goes on
#    (Prefect's ephemeral server never expires the lease; a real server only after about a minute)
killed = subprocess.Popen([sys.executable, "-c", os.environ["HOLDER"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
assert killed.stdout.readline().strip() == "held"
killed.kill()
killed.wait()
assert limit().active_slots == 1
with device_slot(local, log):
    assert limit().active_slots == 1

# 4. a slot a live process holds with no label naming it (a study between taking the slot and labelling
#    its run): never freed, the next study waits for it
from prefect.concurrency.sync import concurrency

got = threading.Event()


def third():
    with device_slot(local, log):
        got.set()


with concurrency(GPU_LIMIT, occupy=1, strict=True):
    threading.Thread(target=third).start()
    assert not got.wait(10), "a study freed the slot of a live process"
assert got.wait(60), "the waiting study never got the GPU"
print("FREED", sum("freed 1 slot(s)" in l for l in lines), flush=True)
print("OK", flush=True)
"""


def test_a_user_s_limit_stands_a_second_study_waits_and_a_killed_study_s_slot_is_freed(prefect_server, tmp_path):
    """device_slot never changes an existing limit (a user may have set it on the UI's Concurrency page),
    makes a second study wait while a running one holds the GPU (and says so), holds nothing for a study
    on a shared Ray cluster, frees a slot that a study killed with SIGKILL left held, and never one that
    a live process holds. In a process of
    its own with PREFECT_API_URL set, as a study runs (the session's Prefect harness is not in the way)."""
    script = tmp_path / "slots.py"
    script.write_text(SLOT_SCRIPT)
    with _client(prefect_server) as client:
        _wait_until_free(client)
    proc = start_python(str(script), env={"PREFECT_API_URL": prefect_server, "RAY_ADDRESS": "", "HOLDER": HOLDER},
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "OK" in out, (out + err)[-4000:]
    assert "WAITED 1" in out and "FREED 1" in out, out[-2000:]
