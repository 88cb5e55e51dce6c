"""The study's stages as Prefect tasks: the functions of tasks/ with a cache key, retries and a name.

``STAGES`` is the one registry of what each stage's result depends on (the modules its cache key
covers, with everything they import: flows/cache.py) and whether it needs the model's device
(``gpu``: under ``executor: ray`` it runs on a Ray worker, flows/executor.py). Results persist to the
S3 bucket (flows/results.py), so a re-run from any process or machine pointed at the same store reuses
them. A generation shard's table is a parquet part in the bucket (storage/parts.py); its cached
result is the part's record, small wherever the task ran. Every task takes a ``label`` that only
names its run (``generate tiny/python-docs/t1/shard0``): it is not part of the cache key.
"""
from __future__ import annotations

import time
import types
from dataclasses import dataclass

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from entcal.flows import cache
from entcal.flows.results import part_settings
from entcal.storage import parts
from entcal.storage.errors import UserError
from entcal.storage.parts import PartRecord
from entcal.flows.publish import artifact_key
from entcal.tasks import datasets, generate, models, recalibrate, score, theory, vllm_engine
from entcal.tasks.config import DatasetSpec, DecodingSpec, ModelSpec
from entcal.tasks.contracts import GenerationKnobs, PromptKnobs, RecalibrationKnobs, Reweighting, ScoringKnobs
from entcal.tasks.models import load_model


@dataclass(frozen=True)
class Stage:
    modules: tuple[str, ...]  # what the result depends on (with everything they import)
    gpu: bool  # needs the model's device: a Ray worker under ``executor: ray``

    @classmethod
    def of(cls, *modules: types.ModuleType, gpu: bool = False) -> "Stage":
        return cls(tuple(m.__name__ for m in modules), gpu)


STAGES: dict[str, Stage] = {
    "prepare": Stage.of(datasets, models),
    "generate": Stage.of(generate, vllm_engine, gpu=True),
    "score": Stage.of(score, gpu=True),
    "fit": Stage.of(recalibrate, gpu=True),
    "calibrated": Stage.of(recalibrate, gpu=True),
    "model-params": Stage.of(models, gpu=True),
    "corpus-alpha": Stage.of(datasets, theory),
}


def content_key(context, parameters: dict) -> str:
    """Prefect's cache_key_fn: the stage's code and its parameters by content (flows/cache.py)."""
    return cache.content_key(context.task, parameters, STAGES[context.task.name].modules)


def retry_unless_user_error(task, task_run, state) -> bool:
    """retry_condition_fn: a user's mistake (storage.errors.UserError) fails once; other errors may pass."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


def _progress(what: str):
    """Log progress and keep a Prefect progress artifact (shown on the run's page) up to date; ``what``
    names the work and the unit, e.g. ``generate tiny/python-docs/t1/shard0: rows``."""
    logger = get_run_logger()
    start = time.monotonic()
    artifact_id = create_progress_artifact(0.0, key=artifact_key(what.split(":")[0]), description=what)

    def report_progress(done: int, total: int) -> None:
        logger.info("%s: %d/%d (%.0fs)", what, done, total, time.monotonic() - start)
        update_progress_artifact(artifact_id, 100.0 * done / max(1, total))
    return report_progress


CACHED = dict(cache_key_fn=content_key, persist_result=True, retry_condition_fn=retry_unless_user_error)


# ------------------------------------------------------------------ the stages
@task(name="prepare", **CACHED, retries=2, retry_delay_seconds=5, task_run_name="prepare {label}")
def prepare_task(model: ModelSpec, dataset: DatasetSpec, knobs: PromptKnobs, label: str) -> pl.DataFrame:
    return datasets.prepare_prompts(*models.tokenizer_and_context(model), dataset, knobs)


@task(name="generate", **CACHED, task_run_name="generate {label}")
def generate_task(model: ModelSpec, prompts: pl.DataFrame, decoding: DecodingSpec, knobs: GenerationKnobs,
                  label: str) -> PartRecord:
    """One shard of one decoding, sampled by the model's engine: the generations table goes to the artifact
    store as a parquet part; the (cached) result is the part's record, whose notes say which engine sampled,
    how many models this worker had loaded, and (engine: vllm) how well vLLM's log-probs agree with the
    re-score."""
    progress = _progress(f"generate {label}: rows")
    lm = load_model(model)
    if model.engine == "vllm":
        table, agreement = vllm_engine.generate(lm, model, prompts, decoding, knobs, progress=progress)
        notes = {"engine": "vllm", "agreement": agreement}
        get_run_logger().info("generate %s: vLLM vs re-score log-prob |Δ| mean %.2e, max %.2e nats over %d tokens "
                              "(%d outside entcal's support); vLLM's support differs at %.2f%% of steps (larger %d, "
                              "smaller %d), implied |ΔH| mean %.2e nats", label, agreement["logprob_abs_diff_mean"],
                              agreement["logprob_abs_diff_max"], agreement["tokens"], agreement["support_mismatches"],
                              100 * agreement["support_differs_share"], agreement["support_larger_in_vllm"],
                              agreement["support_smaller_in_vllm"], agreement["implied_abs_dH_mean"])
    else:
        table = generate.generate(lm, prompts, decoding, knobs, progress=progress)
        notes = {"engine": "entcal"}
    notes["model_loads"] = models.load_count() + vllm_engine.starts()
    dataset = prompts["dataset"][0] if prompts.height else "none"
    return parts.write(part_settings(), f"generations/{model.label}/{dataset}/{decoding.key}", table, notes)


@task(name="score", **CACHED, task_run_name="score {label}")
def score_task(model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec], knobs: ScoringKnobs,
               label: str) -> pl.DataFrame:
    return score.score(load_model(model), prompts, decodings, knobs, progress=_progress(f"score {label}: examples"))


@task(name="fit", **CACHED, task_run_name="fit {label}")
def fit_task(method: str, model: ModelSpec, train: pl.DataFrame, before: recalibrate.BeforeTables,
             knobs: RecalibrationKnobs, label: str) -> Reweighting:
    """Fit one calibration method (tasks.recalibrate.METHODS) on the fit split ``train``."""
    return recalibrate.fit(method, load_model(model), train, before, knobs)


@task(name="calibrated", **CACHED, task_run_name="calibrated {label}")
def calibrated_task(model: ModelSpec, prompts: pl.DataFrame, reweighting: Reweighting, knobs: RecalibrationKnobs,
                    label: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(generations, reference) of ``prompts`` under a calibrated decoding at its knob."""
    return recalibrate.tables_at(load_model(model), prompts, reweighting, knobs)


@task(name="model-params", **CACHED, task_run_name="model-params {label}")
def model_params_task(model: ModelSpec, label: str) -> int:
    """The model's parameter count (loads the weights: it runs where the model can be loaded)."""
    return load_model(model).params


@task(name="corpus-alpha", **CACHED, task_run_name="corpus-alpha {label}")
def corpus_alpha_task(dataset: DatasetSpec, label: str) -> dict | None:
    """α of the corpus's word rank-frequency law (docs/SCIENCE.md §3; tasks.theory.corpus_alpha_stats's
    dict), or None when the corpus is too small for a slope (a diagnostic never fails a study)."""
    try:
        out = theory.corpus_alpha_stats(d.text for d in datasets.documents(dataset))
    except ValueError as err:
        get_run_logger().warning("corpus α of %s: %s", dataset.label, err)
        return None
    if out["warning"]:
        get_run_logger().warning("corpus α of %s: %s", dataset.label, out["warning"])
    return out
