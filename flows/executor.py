"""Runs the study's stages: one typed method per stage, here or on Ray, noting what came from cache.

Where a stage runs is declared on the stage (flows/stages.py, ``@stage(..., gpu=True)``):
``executor: local`` runs everything in this process, one call after another; ``executor: ray``
sends the ``gpu`` stages (generation shards, scoring, calibration fits, model loads) to Prefect's
Ray task runner (prefect-ray), on the cluster at ``RAY_ADDRESS`` or on a Ray instance started for
this flow run on 127.0.0.1, so the flow's machine needs no model and no GPU. Each such task asks
for one GPU when the cluster has one; the shards of a generation are submitted all at once. Ray
workers read the S3 endpoint and credentials from their own environment (or the embedded stack's
``stack.json``), never from a task's arguments.

Generation is split into shards (``shard_size`` prompts each); every (decoding, shard) is one
cached task whose table lands in the artifact store as a parquet part, so a study killed at hour
five resumes at the first unfinished shard, and a part that is lost or altered is made again.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlparse

import polars as pl

from entcal.flows.orphans import free_leaked_slots, mark_slot
from entcal.flows.results import result_storage
from entcal.flows.stages import (corpus_alpha_task, dataset_of, generate_task, model_params_task, prepare_task,
                          recalibrate_task, score_task, work_of)
from entcal.storage import parts
from entcal.storage.errors import UserError
from entcal.storage.settings import Settings
from entcal.tasks.config import DatasetSpec, DecodingSpec, ModelSpec, StudyConfig
from entcal.tasks.contracts import Knobs, Recalibration
from entcal.tasks import models, vllm_engine
from entcal.tasks.generate import shards
from entcal.tasks.recalibrate import BeforeTables

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class PartError(UserError, RuntimeError):
    """A generation part cannot be read back even after regenerating it."""


class RayUnreachable(UserError, RuntimeError):
    """RAY_ADDRESS names no Ray cluster that answers."""


def ray_address() -> tuple[str | None, str | None, int | None]:
    """(RAY_ADDRESS or None, its host, its port): ``host:port`` (GCS) or ``ray://host:port`` (Ray Client)."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "auto":
        return address, None, None
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        return address, parsed.hostname, parsed.port
    except ValueError:
        return address, parsed.hostname, None


def check_ray(config: StudyConfig) -> None:
    """With ``executor: ray`` and RAY_ADDRESS set, the address must take a connection: a dead address
    would otherwise keep ray.init retrying for minutes."""
    address, host, port = ray_address()
    if config.executor != "ray" or address in (None, "auto"):
        return
    if not host or not port:
        raise RayUnreachable(f"RAY_ADDRESS {address!r}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        raise RayUnreachable(f"Ray at {address} is unreachable ({err.strerror or err}): check RAY_ADDRESS, "
                             "or unset it to start a local Ray") from None


GPU_LIMIT = "entcal-gpu"  # Prefect's global concurrency limit a study holds while it uses this machine's devices


@contextlib.contextmanager
def device_slot(config: StudyConfig, logger):
    """One study per GPU at a time: hold a slot of Prefect's global concurrency limit ``entcal-gpu`` for
    the study when its model-bound stages run on this machine's devices (``executor: local``, or Ray
    without RAY_ADDRESS: an instance started for this flow run); on leaving, free this process's models
    and vLLM engine, so the next study finds the device empty. On a shared cluster (RAY_ADDRESS) Ray's
    GPU resources keep tasks apart: no slot.

    The slot is leased for 60 s and renewed while the study runs; the flow run is labelled with its
    process and the lease (orphans.mark_slot). A study that finds no free slot first releases the
    leases of studies killed on this host (orphans.free_leaked_slots: Prefect's ephemeral server never
    expires leases; a server does within about a minute), then waits (Prefect retries, without end)
    and says so once. A missing limit is created with one slot (every study's model lands on the first
    GPU); an existing one (the Prefect UI's Concurrency page) is never changed."""
    if config.executor != "local" and ray_address()[0] is not None:
        yield
        return
    try:
        _ensure_gpu_limit(logger)
        mark_slot(None)  # this process, before the slot: a study killed while it holds the slot is told dead
        with _gpu_slot(logger) as lease:
            mark_slot(lease)
            yield
    finally:  # (the label after the release: a study killed between the two leaves a released lease named)
        mark_slot(None)
        vllm_engine.close()
        models.release()


def _ensure_gpu_limit(logger) -> None:
    """Create the limit with one slot if it does not exist (409 if another study created it meanwhile:
    create, never update)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
                logger.info("created Prefect concurrency limit %s (1 slot): one study at a time on this machine's "
                            "GPU", GPU_LIMIT)
            except ObjectAlreadyExists:
                pass


GPU_LEASE_S = 60  # the slot's lease, renewed while the study runs: what a killed study holds on a server


@contextlib.contextmanager
def _gpu_slot(logger):
    """Wait for a slot of the limit; yields its lease id, renewed until the slot is given back on leaving.
    What Prefect's ``concurrency()`` does, from its own building blocks (prefect is pinned in
    constraints.txt): ``concurrency()`` keeps the lease id to itself, and the flow run's label must name
    it (orphans.free_leaked_slots)."""
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease, release_concurrency_slots_with_lease

    def take(**wait):
        return acquire_concurrency_slots_with_lease([GPU_LIMIT], 1, lease_duration=GPU_LEASE_S, strict=True,
                                                    **wait).lease_id

    quiet = logging.getLogger("prefect._internal.concurrency")  # it logs the timed-out try as an ERROR
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        lease = take(timeout_seconds=3)
    except TimeoutError:  # every slot held: by a killed study (free it), or wait for the running one
        if free_leaked_slots(GPU_LIMIT, logger) == 0:
            logger.info("waiting for this machine's GPU: another study holds Prefect concurrency limit %s",
                        GPU_LIMIT)
        lease = take()
    finally:
        quiet.setLevel(level)
    logger.info("holding this machine's GPU (Prefect concurrency limit %s)", GPU_LIMIT)
    try:
        with maintain_concurrency_lease(lease, GPU_LEASE_S, raise_on_lease_renewal_failure=False):
            yield lease
    finally:
        release_concurrency_slots_with_lease(lease)


def merge_agreement(shards: list[dict]) -> dict:
    """One agreement (tasks.vllm_engine.agreement) from its shards': token-weighted mean, overall max."""
    finite = [a["tokens"] - a["support_mismatches"] for a in shards]
    return {"tokens": sum(a["tokens"] for a in shards),
            "logprob_abs_diff_mean": sum(a["logprob_abs_diff_mean"] * n for a, n in zip(shards, finite)) / max(1, sum(finite)),
            "logprob_abs_diff_max": max(a["logprob_abs_diff_max"] for a in shards),
            "support_mismatches": sum(a["support_mismatches"] for a in shards)}


class Executor:
    """The study's stages with its result storage and knobs; ``cached`` / ``ran`` list the work done."""

    # Slots, no __dict__: Prefect stores a subflow's parameters as JSON, and an object it cannot
    # encode is stored as "<Executor>" instead of a walk through its settings and clients.
    __slots__ = ("config", "settings", "logger", "knobs", "storage", "cached", "ran", "agreement", "_exit", "_ray")

    def __init__(self, config: StudyConfig, settings: Settings, logger):
        self.config, self.settings, self.logger = config, settings, logger
        self.knobs = Knobs.of(config)
        self.storage = result_storage(settings)  # S3 when configured: cached work is shared across machines
        self.cached: list[str] = []
        self.ran: list[str] = []
        # engine: vllm: {(model, dataset, decoding key): vLLM's log-probs vs the re-score, over all shards}
        self.agreement: dict[tuple[str, str, str], dict] = {}
        self._exit = contextlib.ExitStack()
        self._ray = None

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()  # disconnect from Ray (and stop a Ray instance this flow run started)

    # -------------------------------------------------------------- the stages
    def prepare(self, model: ModelSpec, dataset: DatasetSpec) -> pl.DataFrame:
        return self._one(prepare_task, f"prepare {model.label}/{dataset.label}", model=model, dataset=dataset,
                         knobs=self.knobs.prompts)

    def generate(self, model: ModelSpec, prompts: pl.DataFrame,
                 decodings: list[DecodingSpec]) -> dict[str, pl.DataFrame]:
        """{decoding key: generations table}, each the concatenation of its shards' parts, in prompt order."""
        pieces = shards(prompts, self.config.shard_size)
        calls = [dict(model=model, prompts=piece, decoding=d, knobs=self.knobs.generation,
                      shard=i if len(pieces) > 1 else None) for d in decodings for i, piece in enumerate(pieces)]
        done = [self._part(kw, state) for kw, state in zip(calls, self._states(generate_task, calls))]
        n = len(pieces)
        for j, d in enumerate(decodings):
            found = [r.notes["agreement"] for _, r in done[j * n:(j + 1) * n] if "agreement" in r.notes]
            if found:
                self.agreement[model.label, dataset_of(prompts), d.key] = merge_agreement(found)
        return {d.key: pl.concat([df for df, _ in done[j * n:(j + 1) * n]]) for j, d in enumerate(decodings)}

    def score(self, model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec]) -> pl.DataFrame:
        """The reference table: the human text scored under every decoding (one forward serves all)."""
        return self._one(score_task, None, model=model, prompts=prompts, decodings=decodings,
                         knobs=self.knobs.scoring)

    def recalibrate(self, method: str, model: ModelSpec, train: pl.DataFrame, evaluate: pl.DataFrame,
                    before: BeforeTables) -> Recalibration:
        return self._one(recalibrate_task, f"recalibrate {work_of({'model': model, 'prompts': train})}/{method}",
                         method=method, model=model, train=train, evaluate=evaluate, before=before,
                         knobs=self.knobs.recalibration)

    def model_params(self, model: ModelSpec) -> int:
        """The parameter count: the spec's ``params`` if given, else counted where the model loads."""
        return model.params or self._one(model_params_task, f"model-params {model.label}", model=model)

    def corpus_alpha(self, dataset: DatasetSpec) -> dict | None:
        return self._one(corpus_alpha_task, f"corpus-alpha {dataset.label}", dataset=dataset)

    # -------------------------------------------------------------- running them
    def _task(self, task):
        return task.with_options(result_storage=self.storage) if self.storage else task

    def _note(self, label: str, state) -> None:
        hit = state.name == "Cached"
        (self.cached if hit else self.ran).append(label)
        self.logger.info("%s: %s", label, "served from cache" if hit else "ran")

    def _one(self, task, label: str | None, **kw):
        """One call of ``task``; returns its result. ``label`` defaults to ``<task> <model/dataset/decoding>``."""
        (state,) = self._states(task, [kw])
        self._note(label or f"{task.name} {work_of(kw)}", state)
        return state.result()

    def _states(self, task, calls: list[dict]):
        """The final states of several calls of one task, in call order (a generator): one after another
        here, or, for a ``gpu`` stage under ``executor: ray``, submitted all at once to Ray."""
        task_ = self._task(task)
        if self.config.executor == "local" or not task.fn.__stage__.gpu:
            yield from (task_(return_state=True, **kw) for kw in calls)
            return
        runner, gpus = self._ray_runner()
        with self._remote_options(gpus, calls[0].get("model")):
            futures = [runner.submit(task_, kw) for kw in calls]
        for f in futures:
            f.wait()
            yield f.state

    def _part(self, kw: dict, state) -> tuple[pl.DataFrame, parts.PartRecord]:
        """The shard's table from its part, and the part's record; a cached record whose part is lost or
        altered is generated again."""
        label = f"generate {work_of(kw)}"
        record = state.result()
        df = parts.read(self.settings, record)
        if df is None and state.name == "Cached":
            self.logger.warning("%s: part %s is missing or fails its checksum; generating it again", label, record.uri)
            (state,) = self._states(generate_task.with_options(refresh_cache=True), [kw])
            record = state.result()
            df = parts.read(self.settings, record)
        if df is None:
            raise PartError(f"{label}: the part written to {record.uri} cannot be read back (check the S3 store)")
        self._note(label, state)
        self.logger.info("%s: %d rows in %s, written by worker %s (models loaded there: %s)", label, df.height,
                         record.uri, record.worker, record.notes.get("model_loads", "?"))
        return df, record

    def _ray_runner(self):
        if self._ray is None:
            from prefect_ray import RayTaskRunner

            address, host, _ = ray_address()
            init: dict = {}
            if address is None or host in LOOPBACK:
                # Ray rewrites 127.0.0.1 to the machine's address unless told this is a one-machine cluster
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                init["_node_ip_address"] = "127.0.0.1"
            if address is None:
                init["include_dashboard"] = False
            self.logger.info("model-bound stages run on Ray at %s", address or "a local instance on 127.0.0.1")
            runner = self._exit.enter_context(RayTaskRunner(address=address, init_kwargs=init))
            import ray

            gpus = ray.cluster_resources().get("GPU", 0)
            self.logger.info("Ray cluster: %d nodes, %g CPUs, %g GPUs", len(ray.nodes()),
                             ray.cluster_resources().get("CPU", 0), gpus)
            self._ray = (runner, gpus)
        return self._ray

    @staticmethod
    def _remote_options(gpus: float, model: ModelSpec | None):
        """Ray options of a model-bound task: warm workers (``max_calls=0``: Ray's default for a task that
        asks for a GPU is a fresh process per call, which would load the weights and build the CUDA graphs
        again for every shard), and, on a cluster with GPUs, the GPUs one copy of the model spans."""
        from prefect_ray.context import remote_options

        if gpus < 1:
            return remote_options(max_calls=0)
        return remote_options(num_gpus=model.tensor_parallel_size if model else 1, max_calls=0)
