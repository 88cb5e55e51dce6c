"""Scale-out: generation shards as Ray tasks through prefect-ray, on a real two-node Ray cluster on
127.0.0.1 (CPU only), against the test stack's real S3, MLflow and Prefect servers. The tables must
equal those of the same study run in one process, row for row."""
import os
import re
import uuid
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.conftest import run_cli, tiny_config

STUDY = dict(name="raytest", decodings=[{"temperature": 1.0}, {"temperature": 0.8}], num_examples=4,
             prompt_tokens=8, max_new_tokens=16, min_reference_tokens=16, horizon=16, batch_size=2, shard_size=1)
SHARDS = [f"generate tiny/python-docs/{d}/shard{i}" for d in ("t1", "t0.8") for i in range(4)]


@pytest.fixture(scope="module")
def ray_cluster(stack):
    """A head and one worker node, one CPU each, every address on the loopback."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's switch for "one machine: stay on 127.0.0.1"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    assert cluster.address.startswith("127.0.0.1:")
    yield cluster.address
    cluster.shutdown()
    os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def _run(tmp_path: Path, name: str, env: dict, **over) -> tuple:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(Path(over.pop("model_dir")), **{**STUDY, **over})))
    out = tmp_path / name
    proc = run_cli("run", "--config", str(cfg), "--out", str(out),
                   env={"ENTCAL_BUCKET": f"{name}-{uuid.uuid4().hex[:8]}", **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out


def _tables(out: Path) -> dict[str, pl.DataFrame]:
    return {str(p.relative_to(out)): pl.read_parquet(p) for p in sorted(out.rglob("*/*.parquet"))}


def _parts(proc) -> list[tuple[str, int]]:
    """(worker, models that worker had loaded) of every generation part, from the flow's log lines."""
    found = re.findall(r"written by worker (\S+) \(models loaded there: (\d+)\)", proc.stderr)
    return [(worker, int(loads)) for worker, loads in found]


def _workers(proc) -> set[str]:
    return {worker for worker, _ in _parts(proc)}


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, prefect_server, tmp_path_factory) -> tuple:
    """The study run in one process: (the CLI's result, its --out directory); each Ray run must equal it."""
    return _run(tmp_path_factory.mktemp("local"), "local", {}, model_dir=tiny_model_dir)


def test_shards_on_a_two_node_ray_cluster_equal_a_local_run(ray_cluster, local_run, tiny_model_dir, tmp_path):
    local, a = local_run
    ray_proc, b = _run(tmp_path, "ray", {"RAY_ADDRESS": ray_cluster}, model_dir=tiny_model_dir, executor="ray")
    assert f"model-bound stages run on Ray at {ray_cluster}" in ray_proc.stderr
    assert "Ray cluster: 2 nodes, 2 CPUs, 0 GPUs" in ray_proc.stderr, ray_proc.stderr[-3000:]
    for label in SHARDS + ["score tiny/python-docs/t1+t0.8"]:
        assert f"{label}: ran" in ray_proc.stderr, ray_proc.stderr[-3000:]
    # the four shards ran in Ray worker processes, on both nodes at once: never in the flow's own process
    assert len(_workers(local)) == 1 and len(_workers(ray_proc)) >= 2, (_workers(local), _workers(ray_proc))
    assert not _workers(local) & _workers(ray_proc)
    ta, tb = _tables(a), _tables(b)
    assert sorted(ta) == sorted(tb) and len(ta) == 2 * 3
    for name, df in ta.items():
        assert tb[name].equals(df), f"{name} differs between the Ray run and the local run"


def test_without_ray_address_a_local_ray_instance_runs_the_shards(tiny_model_dir, prefect_server, tmp_path):
    proc, out = _run(tmp_path, "ownray", {"RAY_ADDRESS": ""}, model_dir=tiny_model_dir, executor="ray",
                     decodings=[{"temperature": 1.0}])
    assert "model-bound stages run on Ray at a local instance on 127.0.0.1" in proc.stderr, proc.stderr[-3000:]
    assert pl.read_parquet(out / "tiny__python-docs__t1" / "generations.parquet").height == 4


@pytest.fixture(scope="module")
def gpu_ray_cluster(stack):
    """One node that declares one GPU (CPU only here: Ray schedules by the declared resource) and two CPUs."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    yield cluster.address
    cluster.shutdown()
    os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def test_shards_on_a_declared_gpu_reuse_one_warm_worker_that_loads_the_model_once(gpu_ray_cluster, local_run,
                                                                                    tiny_model_dir, tmp_path):
    """Ray runs a task that asks for a GPU in a fresh process per call unless max_calls=0: every shard would
    load the weights again. Four shards, one GPU: one worker process, one model load, the local run's tables
    (its t1: a decoding's tables do not depend on the study's other decodings)."""
    local, a = local_run
    proc, b = _run(tmp_path, "gpuray", {"RAY_ADDRESS": gpu_ray_cluster}, executor="ray", model_dir=tiny_model_dir,
                   decodings=[{"temperature": 1.0}])
    assert "Ray cluster: 1 nodes, 2 CPUs, 1 GPUs" in proc.stderr, proc.stderr[-3000:]
    found = _parts(proc)
    assert len(found) == 4, proc.stderr[-3000:]
    assert len({worker for worker, _ in found}) == 1, found  # one warm worker ran every shard
    assert {loads for _, loads in found} == {1}, found  # and loaded the model once
    assert not _workers(local) & _workers(proc)
    ta, tb = _tables(a), _tables(b)
    assert sorted(tb) == [name for name in sorted(ta) if name.startswith("tiny__python-docs__t1/")]
    for name, df in tb.items():
        assert df.equals(ta[name]), f"{name} differs between the Ray run and the local run"
