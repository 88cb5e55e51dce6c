"""Runs the study's stages: one typed method per stage, here or on Ray, noting what came from cache.

Where a stage runs is in its registry entry (flows/stages.py STAGES, ``gpu``): ``executor: local`` runs
everything in this process, one call after another; ``executor: ray`` sends the ``gpu`` stages
(generation shards, scoring, calibration fits, parameter counts) to Prefect's Ray task runner
(prefect-ray), on the cluster at ``RAY_ADDRESS`` or on a Ray instance started for this flow run on
127.0.0.1, so the flow's machine needs no model and no GPU. Ray workers read the S3 endpoint and
credentials from their own environment (or the embedded stack's ``stack.json``), never from a task's
arguments.

While an Executor is open it holds this machine's devices (storage/locks.py: one study per GPU at a
time; none on a shared Ray cluster, whose GPU resources keep tasks apart); when it closes it frees this
process's models and vLLM engine, so the next study finds the device empty.

Generation is split into shards (``shard_size`` prompts each); every (decoding, shard) is one cached
task whose table lands in the artifact store as a parquet part, so a study killed at hour five resumes
at the first unfinished shard, and a part that is lost or altered is made again.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import polars as pl

from entcal.flows.preflight import ray_address
from entcal.flows.results import result_storage
from entcal.flows.stages import (STAGES, calibrated_task, corpus_alpha_task, fit_task, generate_task,
                                 model_params_task, prepare_task, score_task)
from entcal.storage import locks, parts
from entcal.storage.errors import UserError
from entcal.storage.settings import Settings
from entcal.tasks import metrics, models, vllm_engine, vllm_support
from entcal.tasks.config import DatasetSpec, DecodingSpec, ModelSpec, StudyConfig
from entcal.tasks.contracts import Knobs, PairResult, Reweighting
from entcal.tasks.recalibrate import BeforeTables

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class PartError(UserError, RuntimeError):
    """A generation part cannot be read back even after regenerating it."""


def merge_agreement(shards: list[dict]) -> dict:
    """One agreement (tasks.vllm_engine.agreement) from its shards': token-weighted mean, overall max, and
    the support check's fields step-weighted (tasks.vllm_support.merge)."""
    finite = [a["tokens"] - a["support_mismatches"] for a in shards]
    return {"tokens": sum(a["tokens"] for a in shards),
            "logprob_abs_diff_mean": sum(a["logprob_abs_diff_mean"] * n for a, n in zip(shards, finite)) / max(1, sum(finite)),
            "logprob_abs_diff_max": max(a["logprob_abs_diff_max"] for a in shards),
            "support_mismatches": sum(a["support_mismatches"] for a in shards), **vllm_support.merge(shards)}


class Executor:
    """The study's stages with its result storage and knobs; ``cached`` / ``ran`` list the work done,
    ``agreement`` engine: vllm's log-probs against the re-score per (model, dataset, decoding key)."""

    def __init__(self, config: StudyConfig, settings: Settings, logger):
        self.config, self.settings, self.logger = config, settings, logger
        self.knobs = Knobs.of(config)
        self.storage = result_storage(settings)  # S3 when configured: cached work is shared across machines
        self.cached: list[str] = []
        self.ran: list[str] = []
        self.agreement: dict[tuple[str, str, str], dict] = {}
        self._exit = contextlib.ExitStack()
        self._ray = None

    def __enter__(self) -> "Executor":
        if self.config.executor == "local" or ray_address()[0] is None:  # this machine's devices
            devices = sorted({d for m in self.config.models for d in models.devices(m)})
            self._exit.enter_context(locks.hold(devices, self.config.name, self.logger))
        self._exit.callback(models.release)  # (runs before the locks are given back)
        self._exit.callback(vllm_engine.close)
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()  # free models and engines, leave Ray, give the devices back

    # -------------------------------------------------------------- the stages
    def prepare(self, model: ModelSpec, dataset: DatasetSpec) -> pl.DataFrame:
        label = f"{model.label}/{dataset.label}"
        return self._one(prepare_task, label, dict(model=model, dataset=dataset, knobs=self.knobs.prompts))

    def generate(self, model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec], *,
                 samples: int | None = None) -> dict[str, pl.DataFrame]:
        """{decoding key: generations table}, each the concatenation of its shards' parts, in prompt order;
        ``samples`` per prompt (default: the study's samples_per_prompt)."""
        pieces = shards(prompts, self.config.shard_size)
        knobs = self.knobs.generation if samples is None else replace(self.knobs.generation, samples_per_prompt=samples)
        where = f"{model.label}/{_dataset(prompts)}" + ("" if samples is None else f"/x{samples}")
        calls = [dict(model=model, prompts=piece, decoding=d, knobs=knobs,
                      label=f"{where}/{d.key}" + (f"/shard{i}" if len(pieces) > 1 else ""))
                 for d in decodings for i, piece in enumerate(pieces)]
        done = [self._part(call, state) for call, state in zip(calls, self._run(generate_task, calls))]
        out, n = {}, len(pieces)
        for j, d in enumerate(decodings):
            mine = done[j * n:(j + 1) * n]
            found = [r.notes["agreement"] for _, r in mine if "agreement" in r.notes]
            if found:
                self.agreement[model.label, _dataset(prompts), d.key] = merge_agreement(found)
            out[d.key] = pl.concat([df for df, _ in mine])
        return out

    def score(self, model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec]) -> pl.DataFrame:
        """The reference table: the human text scored under every decoding (one forward serves all)."""
        label = f"{model.label}/{_dataset(prompts)}/" + "+".join(d.key for d in decodings)
        return self._one(score_task, label, dict(model=model, prompts=prompts, decodings=decodings,
                                                 knobs=self.knobs.scoring))

    def fit(self, method: str, model: ModelSpec, train: pl.DataFrame, before: BeforeTables) -> Reweighting:
        """One calibration method fitted on the fit split (tasks.recalibrate.fit)."""
        return self._one(fit_task, f"{model.label}/{_dataset(train)}/{method}", dict(
            method=method, model=model, train=train, before=before, knobs=self.knobs.recalibration))

    def calibrated(self, model: ModelSpec, prompts: pl.DataFrame,
                   reweighting: Reweighting) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(generations, reference) of ``prompts`` under a calibrated decoding (tasks.recalibrate.tables_at)."""
        label = f"{model.label}/{_dataset(prompts)}/{reweighting.method}@{reweighting.knob:g}"
        return self._one(calibrated_task, label, dict(model=model, prompts=prompts, reweighting=reweighting,
                                                       knobs=self.knobs.recalibration))

    def measure(self, model: ModelSpec, dataset: DatasetSpec, decoding: DecodingSpec, prompts: pl.DataFrame,
                generations: pl.DataFrame, reference: pl.DataFrame) -> PairResult:
        """What one (model, dataset, decoding) measured, from its generations and the reference table's rows of
        its decoding (tasks.metrics.pair_result; engine: vllm's agreement with the re-score included)."""
        return metrics.pair_result(model.label, dataset.label, decoding, prompts, generations,
                                   reference.filter(pl.col("decoding") == decoding.key), self.knobs.summary,
                                   self.agreement.get((model.label, dataset.label, decoding.key)))

    def model_params(self, model: ModelSpec) -> int:
        """The parameter count: the spec's ``params`` if given, else counted where the model loads."""
        return model.params or self._one(model_params_task, model.label, dict(model=model))

    def corpus_alpha(self, dataset: DatasetSpec) -> dict | None:
        return self._one(corpus_alpha_task, dataset.label, dict(dataset=dataset))

    # -------------------------------------------------------------- running them
    def _one(self, task, label: str, call: dict):
        """One call of ``task`` named ``<task> <label>``; returns its result."""
        (state,) = self._run(task, [{**call, "label": label}])
        self._note(f"{task.name} {label}", state)
        return state.result()

    def _note(self, what: str, state) -> None:
        hit = state.name == "Cached"
        (self.cached if hit else self.ran).append(what)
        self.logger.info("%s: %s", what, "served from cache" if hit else "ran")

    def _run(self, task, calls: list[dict]):
        """The final states of several calls of one task, in call order, as each is done (a generator): one
        after another here, or, for a ``gpu`` stage under ``executor: ray``, submitted all at once to Ray."""
        if self.storage:
            task = task.with_options(result_storage=self.storage)
        if self.config.executor == "local" or not STAGES[task.name].gpu:
            yield from (task(return_state=True, **call) for call in calls)
            return
        runner, gpus = self._ray_runner()
        with self._remote_options(gpus, calls[0].get("model")):
            futures = [runner.submit(task, call) for call in calls]
        for f in futures:
            f.wait()
            yield f.state

    def _part(self, call: dict, state) -> tuple[pl.DataFrame, parts.PartRecord]:
        """The shard's table from its part, and the part's record; a cached record whose part is lost or
        altered is generated again."""
        what = f"generate {call['label']}"
        record = state.result()
        df = parts.read(self.settings, record)
        if df is None and state.name == "Cached":
            self.logger.warning("%s: part %s is missing or fails its checksum; generating it again", what, record.uri)
            (state,) = self._run(generate_task.with_options(refresh_cache=True), [call])
            record = state.result()
            df = parts.read(self.settings, record)
        if df is None:
            raise PartError(f"{what}: the part written to {record.uri} cannot be read back (check the S3 store)")
        self._note(what, state)
        self.logger.info("%s: %d rows in %s, written by worker %s (models loaded there: %s)", what, df.height,
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


def shards(prompts: pl.DataFrame, shard_size: int) -> list[pl.DataFrame]:
    """Consecutive slices of the prompts table; rows sample the same tokens whichever shard holds them."""
    if shard_size <= 0 or prompts.height <= shard_size:
        return [prompts]
    return [prompts.slice(i, shard_size) for i in range(0, prompts.height, shard_size)]


def _dataset(prompts: pl.DataFrame) -> str:
    """The dataset label of a prompts table (its rows all carry it)."""
    return prompts["dataset"][0] if prompts.height else "none"
