"""One study per GPU at a time: two studies started at once on one machine take turns on its devices (a
slot of Prefect's global concurrency limit entcal-gpu per study, flows/executor.py:device_slot), and both
complete."""
import contextlib
import logging
import subprocess
import uuid
from itertools import product

import yaml

from flows.executor import GPU_LIMIT as LIMIT
from tests.conftest import start_cli, tiny_config
# per study (with its own seed): nothing either study runs is in the other's cache, the scoring included
DECODINGS = ([{"temperature": 1.0}, {"temperature": 0.8}, {"temperature": 1.0, "top_p": 0.9}],
             [{"temperature": 1.0}, {"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.8}])


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
    import time

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


def test_two_studies_at_once_take_turns_on_the_machine_s_gpu(tiny_model_dir, prefect_server, tmp_path):
    """Two `entcal run` processes (think: the nightly run and an on-demand one) against one Prefect
    server, with different seeds and decodings (nothing cached), started together. Both complete; no two
    model-bound task runs of the two flow runs overlap in time: one study's model-bound work all comes
    after the other's, and the second says it waited; the limit has its one slot, given back."""
    from flows.results import result_storage
    from storage.settings import from_env

    with _client(prefect_server) as client:  # a server that has seen a study (two first studies race to
        result_storage(from_env())  # register the result block's type: ObjectAlreadyExists)
        _wait_until_free(client)
    tag = uuid.uuid4().hex[:6]
    studies = [f"gpu-a-{tag}", f"gpu-b-{tag}"]
    procs = []
    for seed, name in enumerate(studies):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name=name, seed=seed, decodings=DECODINGS[seed])))
        procs.append(start_cli("run", "--config", str(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]

    with _client(prefect_server) as client:
        limit = client.read_global_concurrency_limit_by_name(LIMIT)
        runs = [_task_runs(client, s) for s in studies]
    assert limit.limit == 1 and limit.active and limit.active_slots == 0  # one slot, given back
    assert all(flow_run.state.is_completed() for flow_run, _ in runs), [r.state for r, _ in runs]

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
    # both flow runs started together (within the time one study takes), and the one that waited said so
    starts = sorted(r.start_time for r, _ in runs)
    assert (starts[1] - starts[0]).total_seconds() < (max(e for *_, e in first) - starts[0]).total_seconds()
    assert sum("waiting for this machine's GPU" in err for _, err in outs) == 1, [e[-2000:] for _, e in outs]


def test_a_limit_set_by_the_user_is_kept_a_waiting_study_says_so_and_a_shared_ray_cluster_takes_no_slot(
        prefect_server, monkeypatch, caplog):
    """device_slot never changes an existing limit (a user may have set it on the UI's Concurrency page),
    waits while the slots are held and says so, and holds nothing for a study on a shared Ray cluster."""
    import threading

    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    from flows.executor import device_slot
    from tasks.config import StudyConfig

    logger = logging.getLogger("test.gpu")
    local, ray = StudyConfig.model_validate({}), StudyConfig.model_validate({"executor": "ray"})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with _client(prefect_server) as client:  # device_slot talks to the same server
        _wait_until_free(client)

        def held() -> int:
            return client.read_global_concurrency_limit_by_name(LIMIT).active_slots

        try:  # a user's limit of 3 slots (a study of this session may have created it with 1)
            client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(limit=3))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LIMIT, limit=3))
        try:
            with device_slot(local, logger):
                assert held() == 1
                with device_slot(ray, logger):  # a Ray instance of its own runs on this machine's devices too
                    assert held() == 2
            assert held() == 0 and client.read_global_concurrency_limit_by_name(LIMIT).limit == 3
        finally:  # as a study on this machine creates it
            client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(limit=1))

        done = threading.Event()

        def second_study():
            with _client(prefect_server), device_slot(local, logger):
                done.set()

        with caplog.at_level(logging.INFO, logger="test.gpu"):
            with concurrency(LIMIT, occupy=1, strict=True):  # another study holds the GPU
                waiting = threading.Thread(target=second_study)
                waiting.start()
                assert not done.wait(5)  # it waits...
                monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
                with device_slot(ray, logger):  # (a study on a shared cluster does not)
                    assert held() == 1
                monkeypatch.delenv("RAY_ADDRESS")
            assert done.wait(60)  # ...and goes on once the slot is free
            waiting.join(30)
    lines = [r.getMessage() for r in caplog.records if r.name == "test.gpu" and "waiting" in r.getMessage()]
    assert lines == [f"waiting for this machine's GPU: another study holds Prefect concurrency limit {LIMIT} "
                     f"(1/1 slots; if none runs, free leaked ones: prefect gcl update {LIMIT} --active-slots 0)"]
