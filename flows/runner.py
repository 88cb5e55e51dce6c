"""Run a study's cached stages, in this process or on Ray, and note which were served from cache.

Generation is split into shards (``shard_size`` prompts each); every (decoding, shard) is one
cached ``generate`` task whose table lands in the artifact store as a parquet part
(storage/parts.py), so a study killed at hour five resumes at the first unfinished shard.

``executor: local`` runs the shards one after another here. ``executor: ray`` submits them all at
once to Prefect's Ray task runner (prefect-ray): on the cluster at ``RAY_ADDRESS`` if set, else on
a Ray instance started for this flow run on 127.0.0.1; scoring and the calibration fits (the other
model-bound work) run there too, so the flow's machine needs no GPU. Each such task asks for one
GPU when the cluster has GPUs. Ray workers read the S3 endpoint and credentials from their own
environment (or the embedded stack's ``stack.json``), never from the task's arguments.
"""
from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

import polars as pl

from flows.results import result_storage
from flows.stages import (corpus_alpha_task, generate_task, prepare_task, recalibrate_task, score_task)
from storage import parts
from storage.errors import UserError
from storage.settings import Settings
from tasks.config import DecodingSpec, ModelSpec, StudyConfig
from tasks.generate import shards

TASKS = {"prepare": prepare_task, "generate": generate_task, "score": score_task, "recalibrate": recalibrate_task,
         "corpus-alpha": corpus_alpha_task}
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


class Stages:
    """The study's Prefect tasks with its result storage; ``cached`` / ``ran`` list stage labels."""

    def __init__(self, config: StudyConfig, settings: Settings, logger):
        storage = result_storage(settings)  # S3 when configured: cached work is shared across machines
        self.tasks = {k: t.with_options(result_storage=storage) if storage else t for k, t in TASKS.items()}
        self.config, self.settings, self.logger = config, settings, logger
        self.cached: list[str] = []
        self.ran: list[str] = []
        self._exit = contextlib.ExitStack()
        self._ray = None

    def close(self) -> None:
        """Disconnect from Ray (and stop a Ray instance this flow run started)."""
        self._exit.close()

    def _note(self, label: str, state) -> None:
        hit = state.name == "Cached"
        (self.cached if hit else self.ran).append(label)
        self.logger.info("%s: %s", label, "served from cache" if hit else "ran")

    def run(self, name: str, label: str, *, gpu_work: bool = False, **kw):
        """One task, here (or, for ``gpu_work`` under ``executor: ray``, as a Ray task); returns its result."""
        state = next(self._states(name, [kw])) if gpu_work else self.tasks[name](return_state=True, **kw)
        self._note(label, state)
        return state.result()

    def _states(self, name: str, calls: list[dict]):
        """The final states of several calls of one task, as each finishes (in call order): run one
        after another here, or submitted all at once to Ray."""
        task = self.tasks[name]
        if self.config.executor == "local":
            yield from (task(return_state=True, **kw) for kw in calls)
            return
        runner, options = self._ray_runner()
        with options():
            futures = [runner.submit(task, kw) for kw in calls]
        for f in futures:
            f.wait()
            yield f.state

    def _ray_runner(self):
        if self._ray is None:
            from prefect_ray import RayTaskRunner
            from prefect_ray.context import remote_options

            address, host, _ = ray_address()
            init: dict = {}
            if address is None or host in LOOPBACK:
                # Ray rewrites 127.0.0.1 to the machine's address unless told this is a one-machine cluster
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                init["_node_ip_address"] = "127.0.0.1"
            if address is None:
                init["include_dashboard"] = False
            self.logger.info("generation shards run on Ray at %s", address or "a local instance on 127.0.0.1")
            runner = self._exit.enter_context(RayTaskRunner(address=address, init_kwargs=init))
            import ray

            gpus = ray.cluster_resources().get("GPU", 0)
            self.logger.info("Ray cluster: %d nodes, %g CPUs, %g GPUs", len(ray.nodes()),
                             ray.cluster_resources().get("CPU", 0), gpus)
            self._ray = (runner, (lambda: remote_options(num_gpus=1)) if gpus >= 1 else contextlib.nullcontext)
        return self._ray

    def generations(self, model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec], tag: str, *,
                    max_new_tokens: int, samples_per_prompt: int, seed: int, batch_size: int) -> dict[str, pl.DataFrame]:
        """{decoding key: generations table}, each the concatenation of its shards' parts, in prompt order."""
        pieces = shards(prompts, self.config.shard_size)
        calls = [(f"generate {tag}/{d.key}" + (f"/shard{i}" if len(pieces) > 1 else ""),
                  dict(model=model, prompts=piece, decoding=d, max_new_tokens=max_new_tokens,
                       samples_per_prompt=samples_per_prompt, seed=seed, batch_size=batch_size,
                       shard=i if len(pieces) > 1 else None))
                 for d in decodings for i, piece in enumerate(pieces)]
        states = self._states("generate", [kw for _, kw in calls])
        tables = [self._part(label, kw, state) for (label, kw), state in zip(calls, states)]
        n = len(pieces)
        return {d.key: pl.concat(tables[j * n:(j + 1) * n]) for j, d in enumerate(decodings)}

    def _part(self, label: str, kw: dict, state) -> pl.DataFrame:
        """The shard's table from its part; a cached record whose part is lost or altered is generated again."""
        record = state.result()
        df = parts.read(self.settings, record)
        if df is None and state.name == "Cached":
            self.logger.warning("%s: part %s is missing or fails its checksum; generating it again",
                                label, record["uri"])
            state = self.tasks["generate"].with_options(refresh_cache=True)(return_state=True, **kw)
            record = state.result()
            df = parts.read(self.settings, record)
        if df is None:
            raise PartError(f"{label}: the part written to {record['uri']} cannot be read back (check the S3 store)")
        self._note(label, state)
        self.logger.info("%s: %d rows in %s, written by worker %s", label, df.height, record["uri"], record["worker"])
        return df
