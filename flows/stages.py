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
from storage.errors import UserError
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
    items += [f"{k}={_canonical(v)}" for k, v in sorted(parameters.items()) if k not in NAME_ONLY]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _stage(fn):
    def wrap(inner):
        inner.__wrapped_stage__ = fn
        return inner
    return wrap


# ------------------------------------------------------------------ run names, retries
NAME_ONLY = {"shard"}  # parameters that only name a task run: not part of its cache key


def study_run_name() -> str:
    """Flow run name ``<study name>-<UTC %Y%m%d-%H%M%S>``, e.g. ``demo-20261202-030000``."""
    from datetime import datetime, timezone

    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    name = config.get("name") if isinstance(config, dict) else getattr(config, "name", None)
    return f"{name or 'study'}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _dataset_of(prompts) -> str:
    return prompts["dataset"][0] if isinstance(prompts, pl.DataFrame) and prompts.height else "none"


def _work(parameters: dict) -> str:
    """``model/dataset[/decoding]`` of a model-bound task's call, e.g. ``tiny/python-docs/t1``."""
    prompts = next((parameters[k] for k in ("prompts", "train") if k in parameters), None)
    decodings = parameters.get("decodings") or ([parameters["decoding"]] if parameters.get("decoding") else [])
    where = f"{parameters['model'].label}/{_dataset_of(prompts)}"
    return where + ("/" + "+".join(d.key for d in decodings) if decodings else "")


def _shard(parameters: dict, sep: str) -> str:
    shard = parameters.get("shard")
    return "" if shard is None else f"{sep}{shard}"


TASK_RUN_NAMES = {
    "prepare": lambda p: f"prepare {p['model'].label}/{p['dataset'].label}",
    "generate": lambda p: f"generate {_work(p)}{_shard(p, '/shard')}",
    "score": lambda p: f"score {_work(p)}",
    "recalibrate": lambda p: f"recalibrate {_work(p)}/{p['method']}",
    "corpus-alpha": lambda p: f"corpus-alpha {p['dataset'].label}",
    "publish-child": lambda p: f"publish {p['name']}",
    "publish-calibration": lambda p: f"publish calibration__{p['label']}",
    "report": lambda p: f"report {p['name']}",
}


def _run_name(task: str):
    """A task_run_name callback: the work the call does (model/dataset/decoding/shard), not a random suffix."""
    def name(parameters: dict) -> str:
        return TASK_RUN_NAMES[task](parameters)
    return name


def retry_unless_user_error(task, task_run, state) -> bool:
    """retry_condition_fn: a user's mistake (storage.errors.UserError) fails once; other errors may pass."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


# ------------------------------------------------------------------ tasks
def _progress(what: str):
    """Log progress and keep a Prefect progress artifact (shown on the run's page) up to date; ``what``
    names the work and the unit, e.g. ``generate tiny/python-docs/t1 shard 0: rows``."""
    logger = get_run_logger()
    start = time.monotonic()
    artifact_id = create_progress_artifact(0.0, key=artifact_key(what.split(":")[0]), description=what)

    def report_progress(done: int, total: int) -> None:
        logger.info("%s: %d/%d (%.0fs)", what, done, total, time.monotonic() - start)
        update_progress_artifact(artifact_id, 100.0 * done / max(1, total))
    return report_progress


@task(name="prepare", cache_key_fn=content_key, persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, task_run_name=_run_name("prepare"))
@_stage(datasets)
def prepare_task(model: ModelSpec, dataset: DatasetSpec, num_examples: int, prompt_tokens: int,
                 min_reference_tokens: int, max_reference_tokens: int, max_new_tokens: int) -> pl.DataFrame:
    return datasets.prepare_prompts(model, dataset, num_examples=num_examples, prompt_tokens=prompt_tokens,
                                    min_reference_tokens=min_reference_tokens,
                                    max_reference_tokens=max_reference_tokens, max_new_tokens=max_new_tokens)


@task(name="generate", cache_key_fn=content_key, persist_result=True, task_run_name=_run_name("generate"))
@_stage(generate)
def generate_task(model: ModelSpec, prompts: pl.DataFrame, decoding: DecodingSpec, max_new_tokens: int,
                  samples_per_prompt: int, seed: int, batch_size: int, shard: int | None = None) -> dict:
    """One shard of one decoding: the generations table goes to the artifact store as a parquet part;
    the (cached) result is the part's record. ``shard`` (its index) only names the run and its artifact."""
    dataset = _dataset_of(prompts)
    where = f"{model.label}/{dataset}/{decoding.key}" + ("" if shard is None else f" shard {shard}")
    table = generate.generate(model, prompts, decoding, max_new_tokens=max_new_tokens,
                              samples_per_prompt=samples_per_prompt, seed=seed, batch_size=batch_size,
                              progress=_progress(f"generate {where}: rows"))
    return parts.write(part_settings(), f"generations/{model.label}/{dataset}/{decoding.key}", table)


@task(name="score", cache_key_fn=content_key, persist_result=True, task_run_name=_run_name("score"))
@_stage(score)
def score_task(model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec], max_tokens: int,
               epsilon: float, batch_size: int) -> pl.DataFrame:
    where = _work({"model": model, "prompts": prompts, "decodings": decodings})
    return score.score(model, prompts, decodings, max_tokens=max_tokens, epsilon=epsilon, batch_size=batch_size,
                       progress=_progress(f"score {where}: examples"))


@task(name="publish-child", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, task_run_name=_run_name("publish-child"))
def publish_child_task(tracker: Tracker, parent_id: str, name: str, params: dict, summary: dict,
                       curves: pl.DataFrame, tables: dict, run_id: str | None = None, prompts_uri: str | None = None,
                       examples: pl.DataFrame | None = None, description: str | None = None) -> str:
    """Fill the child run ``run_id`` (started before its generation) and finish it; see publish.log_child."""
    return publish.log_child(tracker, parent_id, name, params=params, summary=summary, curves=curves,
                             tables=tables, prompts_digest=frame_digest(tables["prompts"])[:16], run_id=run_id,
                             prompts_uri=prompts_uri, examples=examples, description=description)


@task(name="report", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, task_run_name=_run_name("report"))
def report_task(tracker: Tracker, parent_id: str, out_dir: str, name: str, summary: pl.DataFrame,
                curves: list[dict], horizon: int, smoothing: float, extra: str = "",
                excerpts: list[dict] | None = None) -> dict:
    """Figures, report.md and report.html into ``out_dir`` and the MLflow run's report/ folder; the
    Prefect artifact is report.md with its figures turned into links to MLflow's artifact view (the
    Prefect UI cannot show local images), headed by a link to report.html there."""
    run_url = tracker.run_url(parent_id)
    files = report.write_report(Path(out_dir), name, summary, curves, horizon=horizon, smoothing=smoothing,
                                run_url=run_url, extra=extra, excerpts=excerpts)
    for path in [*files.values(), *Path(out_dir).glob("pareto__*.png"), *Path(out_dir).glob("scaling__*.png"),
                 *Path(out_dir).glob("calibration.json")]:
        tracker.log_file(parent_id, path, "report")

    def view(file: str) -> str:  # MLflow's UI route for one artifact; it shows .html in an iframe
        return tracker.run_url(parent_id, f"/artifacts/report/{file}")
    download = f"{tracker.uri}/get-artifact?path=report/report.html&run_uuid={parent_id}"
    head = (f"**[The full report in MLflow]({view('report.html')})** (figures, and generations shaded by "
            f"entropy) · [download report.html]({download})\n\n")
    create_markdown_artifact(markdown=head + report.artifact_markdown(files["report"].read_text(), view),
                             key=artifact_key(name),
                             description=f"entcal study {name}: EntCE per decoding; MLflow {run_url}")
    return {k: str(v) for k, v in files.items()}


@task(name="publish-calibration", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, task_run_name=_run_name("publish-calibration"))
def publish_calibration_task(tracker: Tracker, parent_id: str, label: str, result: dict, metrics: dict,
                             run_id: str | None = None) -> str:
    """Fill the calibration run ``run_id`` (started before its fits; else a run `calibration__<label>` is
    started here) with stable metric names (tau_star, ...) + calibration.json, and finish it."""
    if run_id is None:
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


@task(name="recalibrate", cache_key_fn=content_key, persist_result=True, task_run_name=_run_name("recalibrate"))
@_stage(recalibrate)
def recalibrate_task(method: str, model: ModelSpec, train: pl.DataFrame, evaluate: pl.DataFrame, candidates: int,
                     max_new_tokens: int, horizon: int, seed: int, batch_size: int, bootstrap: int) -> dict:
    """Fit one calibration method (lookahead | future_entropy) on ``train``; before/after on ``evaluate``."""
    lm = load_model(model)
    out = RECALIBRATIONS[method](
        lm.model, train, evaluate, top_k=candidates, max_new_tokens=max_new_tokens, horizon=horizon, seed=seed,
        batch_size=batch_size, eos_ids=lm.eos_ids, pad_id=pad_id(lm.tokenizer), bootstrap=bootstrap)
    return {k: v for k, v in out.items() if not k.startswith("summary_")}


@task(name="corpus-alpha", cache_key_fn=content_key, persist_result=True, task_run_name=_run_name("corpus-alpha"))
@_stage(datasets)
def corpus_alpha_task(dataset: DatasetSpec, top: int = 5000, max_words: int = 2_000_000,
                      unit: str = r"[^\W_]+(?:'[^\W_]+)*") -> dict | None:
    """α of the corpus's word rank-frequency law (SCIENCE.md §3): the top ``top`` lower-cased words
    (tasks.scaling.WORD_PATTERN, the ``unit``: a cache-key input, so changing the unit re-counts) of
    the first ``max_words`` words of all its documents. Returns tasks.scaling.corpus_alpha_stats's dict
    (alpha, top, unit, words, documents, distinct, count_at_top, warning), or None when the corpus is
    too small for a slope (a diagnostic never fails a study)."""
    from tasks import scaling

    if unit != scaling.WORD_PATTERN:
        raise ValueError(f"corpus-alpha: unit {unit!r} is not tasks.scaling.WORD_PATTERN {scaling.WORD_PATTERN!r}")
    try:
        out = scaling.corpus_alpha_stats((d.text for d in datasets.documents(dataset)), top=top, max_words=max_words)
    except ValueError as err:
        get_run_logger().warning("corpus α of %s: %s", dataset.label, err)
        return None
    if out["warning"]:
        get_run_logger().warning("corpus α of %s: %s", dataset.label, out["warning"])
    return out
