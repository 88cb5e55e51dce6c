"""The study's stages as Prefect tasks: plain functions from tasks/ wrapped with cache keys and retries.

Caching: generation and scoring are keyed on content (model spec, a hash of the prompts table,
the decoding, the knobs that change the result, and the source of the module that does the
work), never on model objects or run ids; results persist to the S3 bucket (flows/results.py),
so a re-run from any process or machine pointed at the same store reuses them. A generation
shard's table is a parquet part in the bucket (storage/parts.py); its cached result is the part's
record, so results stay small wherever the task ran (here or on a Ray worker).
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import sys
import time
import types
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows.results import part_settings
from storage import parts
from storage.tracking import Tracker
from tasks import datasets, generate, publish, recalibrate, report, score
from tasks.config import DatasetSpec, DecodingSpec, ModelSpec
from tasks.models import load_model, pad_id


# ------------------------------------------------------------------ cache keys
CACHE_VERSION = "2"  # bump when the shape of a cached result changes (2: generation returns a part record)


def frame_digest(df: pl.DataFrame) -> str:
    buf = io.BytesIO()
    df.write_ipc(buf, compression="uncompressed")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _canonical(value) -> str:
    if isinstance(value, pl.DataFrame):
        return "frame:" + frame_digest(value)
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    return json.dumps(value, sort_keys=True, default=str)


def _source_digest(module: types.ModuleType) -> str:
    import kernels.reference

    return hashlib.sha256((inspect.getsource(module) + inspect.getsource(kernels.reference)).encode()).hexdigest()


def content_key(context, parameters: dict) -> str:
    """Task name + the work's source + every parameter by content (frames by their bytes)."""
    fn = context.task.fn
    items = [CACHE_VERSION, context.task.name,
             _source_digest(getattr(fn, "__wrapped_stage__", sys.modules[fn.__module__]))]
    items += [f"{k}={_canonical(v)}" for k, v in sorted(parameters.items())]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _stage(fn):
    def wrap(inner):
        inner.__wrapped_stage__ = fn
        return inner
    return wrap


# ------------------------------------------------------------------ tasks
def _progress(what: str):
    """Log progress and keep a Prefect progress artifact (shown on the run's page) up to date."""
    logger = get_run_logger()
    start = time.monotonic()
    artifact_id = create_progress_artifact(0.0, description=what)

    def report_progress(done: int, total: int) -> None:
        logger.info("%s: %d/%d (%.0fs)", what, done, total, time.monotonic() - start)
        update_progress_artifact(artifact_id, 100.0 * done / max(1, total))
    return report_progress


@task(name="prepare", cache_key_fn=content_key, persist_result=True, retries=2, retry_delay_seconds=5)
@_stage(datasets)
def prepare_task(model: ModelSpec, dataset: DatasetSpec, num_examples: int, prompt_tokens: int,
                 min_reference_tokens: int, max_reference_tokens: int, max_new_tokens: int) -> pl.DataFrame:
    return datasets.prepare_prompts(model, dataset, num_examples=num_examples, prompt_tokens=prompt_tokens,
                                    min_reference_tokens=min_reference_tokens,
                                    max_reference_tokens=max_reference_tokens, max_new_tokens=max_new_tokens)


@task(name="generate", cache_key_fn=content_key, persist_result=True)
@_stage(generate)
def generate_task(model: ModelSpec, prompts: pl.DataFrame, decoding: DecodingSpec, max_new_tokens: int,
                  samples_per_prompt: int, seed: int, batch_size: int) -> dict:
    """One shard of one decoding: the generations table goes to the artifact store as a parquet part;
    the (cached) result is the part's record."""
    table = generate.generate(model, prompts, decoding, max_new_tokens=max_new_tokens,
                              samples_per_prompt=samples_per_prompt, seed=seed, batch_size=batch_size,
                              progress=_progress(f"generate {decoding.key} rows"))
    dataset = prompts["dataset"][0] if prompts.height else "none"
    return parts.write(part_settings(), f"generations/{model.label}/{dataset}/{decoding.key}", table)


@task(name="score", cache_key_fn=content_key, persist_result=True)
@_stage(score)
def score_task(model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec], max_tokens: int,
               epsilon: float, batch_size: int) -> pl.DataFrame:
    return score.score(model, prompts, decodings, max_tokens=max_tokens, epsilon=epsilon, batch_size=batch_size,
                       progress=_progress("score examples"))


@task(name="publish-child", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10)
def publish_child_task(tracker: Tracker, parent_id: str, name: str, params: dict, summary: dict,
                       curves: pl.DataFrame, tables: dict) -> str:
    return publish.log_child(tracker, parent_id, name, params=params, summary=summary, curves=curves,
                             tables=tables, prompts_digest=frame_digest(tables["prompts"])[:16])


@task(name="report", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10)
def report_task(tracker: Tracker, parent_id: str, out_dir: str, name: str, summary: pl.DataFrame,
                curves: list[dict], horizon: int, smoothing: float, extra: str = "") -> dict:
    files = report.write_report(Path(out_dir), name, summary, curves, horizon=horizon, smoothing=smoothing,
                                run_url=tracker.run_url(parent_id), extra=extra)
    for path in [*files.values(), *Path(out_dir).glob("pareto__*.png"), *Path(out_dir).glob("scaling__*.png"),
                 *Path(out_dir).glob("calibration.json")]:
        tracker.log_file(parent_id, path, "report")
    create_markdown_artifact(markdown=files["report"].read_text(), key=artifact_key(name),
                             description=f"entcal study {name}: EntCE per decoding; MLflow {tracker.run_url(parent_id)}")
    return {k: str(v) for k, v in files.items()}


@task(name="publish-calibration", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10)
def publish_calibration_task(tracker: Tracker, parent_id: str, label: str, result: dict, metrics: dict) -> str:
    """A child run `calibration__<model>__<dataset>`: stable metric names (tau_star, ...) + calibration.json."""
    run_id = tracker.start(f"calibration__{label}", parent_id=parent_id, tags={"entcal.stage": "calibration"})
    tracker.log_metrics(run_id, metrics)
    tracker.log_json(run_id, result, "calibration.json")
    tracker.finish(run_id)
    return run_id


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "entcal-" + ("".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "study")



RECALIBRATIONS = {"lookahead": recalibrate.lookahead_calibration,
                  "future_entropy": recalibrate.future_entropy_calibration}


@task(name="recalibrate", cache_key_fn=content_key, persist_result=True)
@_stage(recalibrate)
def recalibrate_task(method: str, model: ModelSpec, train: pl.DataFrame, evaluate: pl.DataFrame, candidates: int,
                     max_new_tokens: int, horizon: int, seed: int, batch_size: int, bootstrap: int) -> dict:
    """Fit one calibration method (lookahead | future_entropy) on ``train``; before/after on ``evaluate``."""
    lm = load_model(model)
    out = RECALIBRATIONS[method](
        lm.model, train, evaluate, top_k=candidates, max_new_tokens=max_new_tokens, horizon=horizon, seed=seed,
        batch_size=batch_size, eos_ids=lm.eos_ids, pad_id=pad_id(lm.tokenizer), bootstrap=bootstrap)
    return {k: v for k, v in out.items() if not k.startswith("summary_")}


@task(name="corpus-alpha", cache_key_fn=content_key, persist_result=True)
@_stage(datasets)
def corpus_alpha_task(dataset: DatasetSpec, documents: int = 200) -> float | None:
    """α of the corpus's word rank-frequency law (SCIENCE.md §3), over its first documents; None when
    the corpus is too small for a slope (a diagnostic never fails a study)."""
    from itertools import islice

    from tasks.scaling import corpus_alpha

    text = " ".join(d.text for d in islice(datasets.documents(dataset), documents))
    try:
        return corpus_alpha(text.split())
    except ValueError as err:
        get_run_logger().warning("corpus α of %s: %s", dataset.label, err)
        return None
