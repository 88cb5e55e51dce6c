"""One study per GPU at a time: two studies started at once on one machine take turns on the model-bound
stages (Prefect's concurrency limit of the tag entcal-gpu, flows/executor.py:gpu_tags), and both complete."""
import contextlib
import logging
import subprocess
import uuid
from itertools import product

import torch
import yaml

from flows.stages import GPU_TAG
from tests.conftest import start_cli, tiny_config

LIMIT = f"tag:{GPU_TAG}"
SLOTS = max(1, torch.cuda.device_count())  # what a study on this machine creates the limit with
# per study (with its own seed): nothing either study runs is in the other's cache, the scoring included
DECODINGS = ([{"temperature": 1.0}, {"temperature": 0.8}, {"temperature": 1.0, "top_p": 0.9}],
             [{"temperature": 1.0}, {"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.8}])


@contextlib.contextmanager
def _client(api_url: str):
    """A Prefect client of the stack's server (and its settings for gpu_tags), whatever the session set up."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _task_runs(client, study: str) -> tuple:
    """(the study's flow run, its task runs), found by the flow run's name ``<study>-<UTC time>``."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{study}-")))
    return run, client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200)


def test_two_studies_at_once_take_turns_on_the_model_bound_stages(tiny_model_dir, prefect_server, tmp_path):
    """Two `entcal run` processes (think: the nightly run and an on-demand one) against one Prefect
    server, with different seeds and decodings (nothing cached), started together. No two model-bound
    task runs of the two flow runs overlap in time, yet the two studies' model-bound work interleaves
    (one waited for the other's slot and went on), both complete, and the limit has one slot per GPU
    here (at least one)."""
    from flows.results import result_storage
    from storage.settings import from_env

    with _client(prefect_server):  # a server that has seen a study (two first studies race to register
        result_storage(from_env())  # the result block's type: ObjectAlreadyExists)
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
        by_tag = client.read_concurrency_limit_by_tag(GPU_TAG)  # the UI's "task run concurrency" view of it
    assert limit.limit == by_tag.concurrency_limit == SLOTS and limit.active
    assert limit.active_slots == 0  # every slot given back
    assert all(flow_run.state.is_completed() for flow_run, _ in runs), [r.state for r, _ in runs]

    gpu = []  # per study: its model-bound task runs, each (name, created, start, end)
    for flow_run, task_runs in runs:
        model_bound = [t for t in task_runs if t.name.startswith(("generate", "score"))]
        assert len(model_bound) == 3 + 1, [t.name for t in task_runs]  # 3 generations + scoring
        assert all(GPU_TAG in t.tags and t.state.is_completed() and t.state.name != "Cached" for t in model_bound), \
            [(t.name, t.tags, t.state.name) for t in model_bound]
        assert not [t.name for t in task_runs if GPU_TAG in t.tags and t not in model_bound]  # prepare etc.: no tag
        gpu.append([(t.name, t.created, t.start_time, t.end_time) for t in model_bound])
    a, b = gpu
    for x, y in product(a, b):  # never two studies on the device at once
        assert x[3] <= y[2] or y[3] <= x[2], f"{x} and {y} overlap"
    # ...yet the two studies ran side by side: each one's model-bound work began before the other's ended,
    # and a task run created (ready to go) before one of the other study's ended started only after it ended:
    # it waited for the slot (without the limit a task run starts within a fraction of a second)
    assert min(s for _, _, s, _ in a) < max(e for *_, e in b) and min(s for _, _, s, _ in b) < max(e for *_, e in a)
    waited = [(y[0], x[0]) for x, y in product(a + b, a + b) if (x in a) != (y in a) and y[1] < x[3] <= y[2]]
    assert waited, (a, b)


def test_a_limit_set_by_the_user_is_kept_and_a_shared_ray_cluster_gets_no_tag(prefect_server, monkeypatch, caplog):
    """gpu_tags never changes an existing limit (a user may have set it on the UI's Concurrency page),
    says when a model-bound stage has to wait for a slot, and tags nothing on a shared Ray cluster."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    from flows.executor import gpu_tags
    from tasks.config import StudyConfig

    logger = logging.getLogger("test.gpu")
    local, ray = StudyConfig.model_validate({}), StudyConfig.model_validate({"executor": "ray"})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with _client(prefect_server) as client:  # gpu_tags talks to the same server
        try:  # a user's limit of 2 slots (a study of this session may have created it with 1)
            client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(limit=2))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LIMIT, limit=2))
        try:
            assert gpu_tags(local, logger, "generate") == gpu_tags(ray, logger, "generate") == {GPU_TAG}
            assert client.read_global_concurrency_limit_by_name(LIMIT).limit == 2
            with caplog.at_level(logging.INFO, logger="test.gpu"):
                with concurrency(LIMIT, occupy=2, strict=True):  # another study holds both slots
                    gpu_tags(local, logger, "score")
                gpu_tags(local, logger, "generate")  # free again: no line
        finally:  # as a study on this machine would have created it
            client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(limit=SLOTS))
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
        assert gpu_tags(ray, logger, "generate") == set()  # Ray's GPU resources keep a shared cluster's tasks apart
        assert gpu_tags(local, logger, "generate") == {GPU_TAG}  # executor: local runs here whatever RAY_ADDRESS says
    assert [r.getMessage() for r in caplog.records if r.name == "test.gpu"] == [
        (f"score waits for a slot of Prefect concurrency limit {LIMIT} (2/2 held by other runs; if none runs, "
         f"free leaked ones: prefect gcl update {LIMIT} --active-slots 0)")]
