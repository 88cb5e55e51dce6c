"""The study's stages as Prefect tasks: plain functions from tasks/ with a cache key, retries and a name.

Each model-bound stage is marked ``@stage(modules, gpu=...)``: the modules its result depends on
(its cache key covers them and what they import; flows/cache.py) and whether it needs the model's
device (``gpu=True``: under ``executor: ray`` it runs on a Ray worker; flows/executor.py). Results
persist to the S3 bucket (flows/results.py), so a re-run from any process or machine pointed at
the same store reuses them. A generation shard's table is a parquet part in the bucket
(storage/parts.py) and its cached result is the part's record, small wherever the task ran.
"""
from __future__ import annotations

import dataclasses
import time
import types
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from entcal.flows.cache import content_key, frame_digest
from entcal.flows.results import part_settings
from entcal.storage import parts
from entcal.storage.errors import UserError
from entcal.storage.tracking import Tracker
from entcal.tasks import datasets, generate, models, publish, recalibrate, report, scaling, score, vllm_engine
from entcal.tasks.config import DatasetSpec, DecodingSpec, ModelSpec
from entcal.storage.parts import PartRecord
from entcal.tasks.contracts import GenerationKnobs, PromptKnobs, Recalibration, RecalibrationKnobs, ScoringKnobs
from entcal.tasks.models import load_model, pad_id


@dataclasses.dataclass(frozen=True)
class Stage:
    modules: tuple[str, ...]  # what the result depends on (with everything they import)
    gpu: bool  # needs the model's device: a Ray worker under ``executor: ray``



def stage(*modules: types.ModuleType, gpu: bool = False):
    def mark(fn):
        fn.__stage__ = Stage(tuple(m.__name__ for m in modules), gpu)
        return fn
    return mark


# ------------------------------------------------------------------ run names, retries, progress
def study_run_name() -> str:
    """Flow run name ``<study name>-<UTC %Y%m%d-%H%M%S>``, e.g. ``demo-20261202-030000``."""
    from datetime import datetime, timezone

    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    name = config.get("name") if isinstance(config, dict) else getattr(config, "name", None)
    return f"{name or 'study'}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def dataset_of(prompts) -> str:
    return prompts["dataset"][0] if isinstance(prompts, pl.DataFrame) and prompts.height else "none"


def work_of(parameters: dict) -> str:
    """``model/dataset[/decoding][/shardN]`` of a model-bound call, e.g. ``tiny/python-docs/t1/shard0``."""
    prompts = next((parameters[k] for k in ("prompts", "train") if k in parameters), None)
    decodings = parameters.get("decodings") or ([parameters["decoding"]] if parameters.get("decoding") else [])
    where = f"{parameters['model'].label}/{dataset_of(prompts)}"
    where += "/" + "+".join(d.key for d in decodings) if decodings else ""
    return where + ("" if parameters.get("shard") is None else f"/shard{parameters['shard']}")


def run_name(template: str):
    """A task_run_name callback naming the work, e.g. ``"generate {work}"`` -> ``generate tiny/docs/t1``."""
    def name(parameters: dict) -> str:
        fields = {k: getattr(v, "label", v) for k, v in parameters.items()}
        if "model" in parameters:
            fields["work"] = work_of(parameters)
        return template.format(**fields)
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


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "entcal-" + ("".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "study")


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


CACHED = dict(cache_key_fn=content_key, persist_result=True)
RETRIED = dict(retries=3, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error)


# ------------------------------------------------------------------ model-bound, cached stages
@task(name="prepare", **CACHED, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      task_run_name=run_name("prepare {model}/{dataset}"))
@stage(datasets)
def prepare_task(model: ModelSpec, dataset: DatasetSpec, knobs: PromptKnobs) -> pl.DataFrame:
    return datasets.prepare_prompts(model, dataset, **dataclasses.asdict(knobs))


@task(name="generate", **CACHED, task_run_name=run_name("generate {work}"))
@stage(generate, vllm_engine, gpu=True)
def generate_task(model: ModelSpec, prompts: pl.DataFrame, decoding: DecodingSpec, knobs: GenerationKnobs,
                  shard: int | None = None) -> PartRecord:
    """One shard of one decoding, sampled by the model's engine: the generations table goes to the artifact
    store as a parquet part; the (cached) result is the part's record, whose notes say which engine sampled,
    how many models this worker had loaded, and (engine: vllm) how well vLLM's log-probs agree with the
    re-score. ``shard`` (its index) only names the run and its artifact."""
    where = work_of({"model": model, "prompts": prompts, "decoding": decoding, "shard": shard})
    progress = _progress(f"generate {where}: rows")
    if model.engine == "vllm":
        table, agreement = vllm_engine.generate_table(model, prompts, decoding, **dataclasses.asdict(knobs),
                                                      progress=progress)
        notes = {"engine": "vllm", "agreement": agreement}
        get_run_logger().info("generate %s: vLLM vs re-score log-prob |Δ| mean %.2e, max %.2e nats over %d tokens "
                              "(%d outside entcal's support)", where, agreement["logprob_abs_diff_mean"],
                              agreement["logprob_abs_diff_max"], agreement["tokens"], agreement["support_mismatches"])
    else:
        table = generate.generate(model, prompts, decoding, **dataclasses.asdict(knobs), progress=progress)
        notes = {"engine": "entcal"}
    notes["model_loads"] = models.load_count() + vllm_engine.starts()
    return parts.write(part_settings(), f"generations/{model.label}/{dataset_of(prompts)}/{decoding.key}", table,
                       notes)


@task(name="score", **CACHED, task_run_name=run_name("score {work}"))
@stage(score, gpu=True)
def score_task(model: ModelSpec, prompts: pl.DataFrame, decodings: list[DecodingSpec],
               knobs: ScoringKnobs) -> pl.DataFrame:
    where = work_of({"model": model, "prompts": prompts, "decodings": decodings})
    return score.score(model, prompts, decodings, **dataclasses.asdict(knobs),
                       progress=_progress(f"score {where}: examples"))


RECALIBRATIONS = {"lookahead": recalibrate.lookahead_calibration,
                  "future_entropy": recalibrate.future_entropy_calibration}


@task(name="recalibrate", **CACHED, task_run_name=run_name("recalibrate {work}/{method}"))
@stage(recalibrate, gpu=True)
def recalibrate_task(method: str, model: ModelSpec, train: pl.DataFrame, evaluate: pl.DataFrame,
                     before: recalibrate.BeforeTables, knobs: RecalibrationKnobs) -> Recalibration:
    """Fit one calibration method (lookahead | future_entropy) on ``train``; before/after on ``evaluate``,
    "before" being the cached stages' τ = 1 tables."""
    lm = load_model(model)
    return RECALIBRATIONS[method](lm.model, train, evaluate, before=before, **dataclasses.asdict(knobs),
                                  eos_ids=lm.eos_ids, pad_id=pad_id(lm.tokenizer))


@task(name="model-params", **CACHED, task_run_name=run_name("model-params {model}"))
@stage(models, gpu=True)
def model_params_task(model: ModelSpec) -> int:
    """The model's parameter count (loads the weights: it runs where the model can be loaded)."""
    return load_model(model).params


@task(name="corpus-alpha", **CACHED, task_run_name=run_name("corpus-alpha {dataset}"))
@stage(datasets, scaling)
def corpus_alpha_task(dataset: DatasetSpec, top: int = scaling.CORPUS_TOP,
                      max_words: int = scaling.CORPUS_MAX_WORDS) -> dict | None:
    """α of the corpus's word rank-frequency law (docs/SCIENCE.md §3): the top ``top`` lower-cased words
    (tasks.scaling.WORD_PATTERN; a change to it changes the module, hence the key) of the first
    ``max_words`` words of all its documents. Returns tasks.scaling.corpus_alpha_stats's dict, or None
    when the corpus is too small for a slope (a diagnostic never fails a study)."""
    try:
        out = scaling.corpus_alpha_stats((d.text for d in datasets.documents(dataset)), top=top, max_words=max_words)
    except ValueError as err:
        get_run_logger().warning("corpus α of %s: %s", dataset.label, err)
        return None
    if out["warning"]:
        get_run_logger().warning("corpus α of %s: %s", dataset.label, out["warning"])
    return out


# ------------------------------------------------------------------ MLflow and the report (never cached)
@task(name="publish-child", cache_policy=NO_CACHE, **RETRIED, task_run_name=run_name("publish {name}"))
def publish_child_task(tracker: Tracker, parent_id: str, name: str, params: dict, summary: dict,
                       curves: pl.DataFrame, tables: dict, run_id: str | None = None, prompts_uri: str | None = None,
                       examples: pl.DataFrame | None = None, description: str | None = None) -> str:
    """Fill the child run ``run_id`` (started before its generation) and finish it; see publish.log_child."""
    return publish.log_child(tracker, parent_id, name, params=params, summary=summary, curves=curves,
                             tables=tables, prompts_digest=frame_digest(tables["prompts"])[:16], run_id=run_id,
                             prompts_uri=prompts_uri, examples=examples, description=description)


@task(name="publish-calibration", cache_policy=NO_CACHE, **RETRIED,
      task_run_name=run_name("publish calibration__{label}"))
def publish_calibration_task(tracker: Tracker, run_id: str, label: str, result: dict, metrics: dict) -> str:
    """Fill the calibration run ``run_id`` (started before its fits) with stable metric names (tau_star,
    ...) and calibration.json, and finish it."""
    tracker.log_metrics(run_id, metrics)
    tracker.log_json(run_id, result, "calibration.json")
    tracker.finish(run_id)
    return run_id


@task(name="report", cache_policy=NO_CACHE, **RETRIED, task_run_name=run_name("report {name}"))
def report_task(tracker: Tracker, parent_id: str, out_dir: str, name: str, summary: pl.DataFrame,
                curves: list[dict], horizon: int, smoothing: float, extra: str = "",
                excerpts: list[dict] | None = None, files: list[str] = ()) -> dict:
    """Figures, report.md and report.html into ``out_dir``, and they and ``files`` (the calibration and
    scaling figures ``extra`` shows, calibration.json) into the MLflow run's report/ folder. The
    Prefect artifact is report.md with its figures turned into links to MLflow's artifact view (the
    Prefect UI cannot show local images), headed by a link to report.html there."""
    run_url = tracker.run_url(parent_id)
    written = report.write_report(Path(out_dir), name, summary, curves, horizon=horizon, smoothing=smoothing,
                                  run_url=run_url, extra=extra, excerpts=excerpts)
    for path in [*written.values(), *map(Path, files)]:
        tracker.log_file(parent_id, path, "report")

    def view(file: str) -> str:  # MLflow's UI route for one artifact; it shows .html in an iframe
        return tracker.run_url(parent_id, f"/artifacts/report/{file}")
    download = f"{tracker.uri}/get-artifact?path=report/report.html&run_uuid={parent_id}"
    head = (f"**[The full report in MLflow]({view('report.html')})** (figures, and generations shaded by "
            f"entropy) · [download report.html]({download})\n\n")
    create_markdown_artifact(markdown=head + report.artifact_markdown(written["report"].read_text(), view),
                             key=artifact_key(name),
                             description=f"entcal study {name}: EntCE per decoding; MLflow {run_url}")
    return {k: str(v) for k, v in written.items()}
