"""One study: models × datasets × decodings -> an MLflow parent run and a child run per triple.

prepare ──> generate (per decoding) ──> score (one forward serves all decodings) ──> summarise
        ──> publish (MLflow child runs, --out tables) ──> report (figures, report.md)

Caching: generation and scoring are keyed on content (model spec, a hash of the prompts
table, the decoding, the knobs that change the result, and the source of the module that does
the work), never on model objects or run ids, and their results are persisted, so a re-run of
the same study — from any process pointed at the same result storage — reuses them.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import sys
import time
import types
from datetime import datetime
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows.results import result_storage
from storage.settings import from_env
from storage.tracking import Tracker, TrackingError
from tasks import calibrate, datasets, generate, publish, report, score
from tasks.config import DatasetSpec, DecodingSpec, ModelSpec, StudyConfig
from tasks.models import max_positions, source_of

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ cache keys
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
    parts = [context.task.name, _source_digest(getattr(fn, "__wrapped_stage__", sys.modules[fn.__module__]))]
    parts += [f"{k}={_canonical(v)}" for k, v in sorted(parameters.items())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


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
                  samples_per_prompt: int, seed: int, batch_size: int) -> pl.DataFrame:
    return generate.generate(model, prompts, decoding, max_new_tokens=max_new_tokens,
                             samples_per_prompt=samples_per_prompt, seed=seed, batch_size=batch_size,
                             progress=_progress(f"generate {decoding.key} rows"))


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
                curves: list[dict], horizon: int, smoothing: float) -> dict:
    files = report.write_report(Path(out_dir), name, summary, curves, horizon=horizon, smoothing=smoothing,
                                run_url=tracker.run_url(parent_id))
    for path in files.values():
        tracker.log_file(parent_id, path, "report")
    create_markdown_artifact(markdown=files["report"].read_text(), key=artifact_key(name),
                             description=f"entcal study {name}: EntCE per decoding; MLflow {tracker.run_url(parent_id)}")
    return {k: str(v) for k, v in files.items()}


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "entcal-" + ("".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "study")


# ------------------------------------------------------------------ the flow
def preflight(config: StudyConfig) -> None:
    """Cheap checks of every input before any service or model starts: user mistakes fail in a second."""
    for model in config.models:
        source_of(model)
        max_positions(model)  # reads the model's config (no weights): a broken model dir fails here
    for dataset in config.datasets:
        datasets.check_source(dataset)


@flow(name="entcal-study", log_prints=True)
def study(config: StudyConfig, out: str | None = None) -> dict:
    """Run one study; returns the summary rows, the MLflow run URL, the report path and which
    stages were served from cache."""
    logger = get_run_logger()
    preflight(config)
    settings = from_env()  # credentials come from the environment, never from flow parameters
    if not settings.mlflow_uri:
        raise TrackingError("no MLflow server: set MLFLOW_TRACKING_URI or run `entcal stack up`")
    storage = result_storage(settings)  # S3 when configured: cached work is shared across machines
    prep, gen, sc = (t.with_options(result_storage=storage) if storage else t
                     for t in (prepare_task, generate_task, score_task))
    out_dir = Path(out) if out else settings.state_dir / "reports" / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    tracker = Tracker(settings.mlflow_uri, experiment=f"entcal/{config.name}")
    parent_id = tracker.start(config.name, tags={"entcal.stage": "study", **publish.provenance()})
    tracker.log_params(parent_id, publish.flat_params(config))
    logger.info("MLflow study run: %s", tracker.run_url(parent_id))
    cached: dict[str, list[str]] = {"cached": [], "ran": []}

    def run(task_obj, label: str, **kw):
        state = task_obj(return_state=True, **kw)
        cached["cached" if state.name == "Cached" else "ran"].append(label)
        logger.info("%s: %s", label, "served from cache" if state.name == "Cached" else "ran")
        return state.result()

    rows, all_curves = [], []
    status = "FAILED"
    try:
        max_ref = max(config.horizon, config.max_new_tokens)
        for model in config.models:
            for dataset in config.datasets:
                tag = f"{model.label}/{dataset.label}"
                prompts = run(prep, f"prepare {tag}", model=model, dataset=dataset,
                              num_examples=config.num_examples, prompt_tokens=config.prompt_tokens,
                              min_reference_tokens=config.min_reference_tokens, max_reference_tokens=max_ref,
                              max_new_tokens=config.max_new_tokens)
                gens = {d.key: run(gen, f"generate {tag}/{d.key}", model=model, prompts=prompts, decoding=d,
                                   max_new_tokens=config.max_new_tokens, samples_per_prompt=config.samples_per_prompt,
                                   seed=config.seed, batch_size=config.batch_size) for d in config.decodings}
                ref = run(sc, f"score {tag}", model=model, prompts=prompts, decodings=config.decodings,
                          max_tokens=config.horizon, epsilon=config.epsilon, batch_size=config.batch_size)
                for d in config.decodings:
                    g, r = gens[d.key], ref.filter(pl.col("decoding") == d.key)
                    summ = calibrate.entce_summary(g, r, horizon=config.horizon, bootstrap=config.bootstrap,
                                                   ci_level=config.ci_level, seed=config.seed)
                    curves = calibrate.step_curves(g, r, horizon=config.horizon)
                    doc = publish.summary_json(summ, config, model, dataset, d, model.params)
                    name = publish.child_name(model, dataset, d)
                    tables = {"prompts": prompts, "generations": g, "reference": r}
                    params = {"model": model.label, "dataset": dataset.label, "decoding": d.key,
                              **d.model_dump(), "horizon": config.horizon, "num_examples": config.num_examples,
                              "max_new_tokens": config.max_new_tokens, "prompt_tokens": config.prompt_tokens,
                              "seed": config.seed, "samples_per_prompt": config.samples_per_prompt}
                    run_id = publish_child_task(tracker, parent_id, name, params, doc, curves, tables)
                    if out:
                        publish.write_child_dir(out_dir, name, tables, doc)
                    rows.append({"model": model.label, "dataset": dataset.label, "decoding": d.key,
                                 "temperature": d.temperature, "truncated": d.truncated, "run_id": run_id,
                                 "run_url": tracker.run_url(run_id),
                                 **{k: summ[k] for k in report.METRIC_COLUMNS}})
                    all_curves.append({"model": model.label, "dataset": dataset.label, "decoding": d.key,
                                       "curves": curves})
        summary = pl.DataFrame(rows)
        files = report_task(tracker, parent_id, str(out_dir), config.name, summary, all_curves,
                            config.horizon, config.smoothing)
        status = "FINISHED"
    finally:
        tracker.finish(parent_id, status)
    logger.info("stages served from cache: %s", ", ".join(cached["cached"]) or "none")
    return {"run_url": tracker.run_url(parent_id), "run_id": parent_id, "report": files["report"],
            "out_dir": str(out_dir), "rows": rows, "cached": cached["cached"], "ran": cached["ran"]}
