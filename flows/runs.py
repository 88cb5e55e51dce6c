"""The MLflow side of a study, and its links to the Prefect flow run.

A study is one MLflow parent run (params, config files, headline metrics, the report) with a child
run per (model, dataset, decoding) and one per calibration. Child runs start before their work,
so they span it, and end FAILED or KILLED with it. Both runs carry links to each other's UI. What
a killed study left RUNNING (MLflow runs, Prefect flow runs) is ended by the next study or by the
flow's state hooks.
"""
from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
from prefect import get_run_logger

from entcal.flows.cache import frame_digest
from entcal.flows.calibration import calibration_markdown, calibration_metrics
from entcal.flows.orphans import own_study
from entcal.flows.stages import artifact_key, publish_calibration_task, publish_child_task, report_task
from entcal.storage.settings import Settings
from entcal.storage.tracking import NOTE, Tracker, TrackingError
from entcal.tasks import metrics, publish, report
from entcal.tasks.config import DatasetSpec, DecodingSpec, ModelSpec, StudyConfig
from entcal.tasks.contracts import CalibrationResult, Summary

class StudyRecord:
    """The parent run of one study and what its children reported (``rows``: one per decoding)."""

    def __init__(self, config: StudyConfig, settings: Settings, out: str | None):
        if not settings.mlflow_uri:
            raise TrackingError("no MLflow server: set MLFLOW_TRACKING_URI or run `entcal stack up`")
        self.config, self.settings, self.logger = config, settings, get_run_logger()
        self.write_tables = bool(out)
        self.out_dir = Path(out) if out else settings.state_dir / "reports" / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker(settings.mlflow_uri, experiment=f"entcal/{config.name}", source="flows/study.py:study",
                               description=publish.experiment_description(config.name))
        previous = self.tracker.latest_run("tags.`entcal.stage` = 'study'")  # what this launch changed
        self.links = prefect_links()
        self.description = publish.study_description(config, previous=previous)
        self.run_id = self.tracker.start(parent_run_name(config), description=self.description,
                                         tags={"entcal.stage": "study", "entcal.config_digest": config.digest(),
                                               **publish.provenance(), **self.links})
        own_study(self.tracker, self.run_id, self.logger)  # and end what killed studies left RUNNING
        self.tracker.log_params(self.run_id, publish.flat_params(config))
        for file, doc in publish.config_files(config).items():
            self.tracker.log_json(self.run_id, doc, file)
        self.tracker.set_view_state()  # the runs table experiment_url opens: headline metric columns, newest first
        self.logger.info("MLflow study run: %s", self.tracker.run_url(self.run_id))
        self.logger.info("MLflow experiment: %s", self.tracker.experiment_url())
        link_mlflow_run(config.name, self.tracker.run_url(self.run_id))
        self.rows: list[dict] = []
        self.curves: list[dict] = []
        self.excerpts: list[dict] = []
        self.sections: list[str] = []
        self.figures: list[str] = []  # report figures beyond the report's own (Pareto fronts, scaling)
        self.example_sums: dict[tuple[str, str], dict] = {}  # (model, dataset) -> τ = 1 sums: the scaling CI
        self.calibrations: dict[str, CalibrationResult] = {}
        self.files: dict = {}

    @contextlib.contextmanager
    def finishing(self):
        """End the parent run FINISHED, or FAILED on an error, KILLED on SIGTERM / Ctrl-C / SystemExit."""
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except BaseException as err:
            status = "FAILED" if isinstance(err, Exception) else "KILLED"
            raise
        finally:
            self.tracker.finish(self.run_id, status)

    def _child(self, name: str, tags: dict, description: str) -> str:
        """A RUNNING child run with system metrics sampled until it finishes."""
        run_id = self.tracker.start(name, parent_id=self.run_id, tags={**tags, **self.links}, description=description)
        self.tracker.start_system_metrics(run_id)
        return run_id

    @contextlib.contextmanager
    def pair(self, model: ModelSpec, dataset: DatasetSpec, prompts: pl.DataFrame):
        """The child runs of one (model, dataset), started now; a failure inside ends the open ones."""
        pair = PairRecord(self, model, dataset, prompts)
        try:
            yield pair
        except BaseException as err:
            for run_id in pair.open.values():
                self.tracker.finish_quietly(run_id, "FAILED" if isinstance(err, Exception) else "KILLED")
            raise
        reference = pl.concat(list(pair.reference.values())) if pair.reference else None
        self.excerpts += report.pick_excerpts(prompts, pair.generations, reference, model=model.label,
                                              horizon=self.config.horizon)

    def report(self, sections: list[str]) -> None:
        """The parent's note, summary table and metrics, calibration.json, and the report."""
        cfg, tracker = self.config, self.tracker
        tracker.set_tags(self.run_id, {NOTE: f"{self.description}\n\n{publish.results_markdown(self.rows)}"})
        tracker.log_table_view(self.run_id, pl.DataFrame(self.rows).select(
            "decoding", "dataset", "model", *report.METRIC_COLUMNS, "run_id"), "tables/summary.json")
        files = list(self.figures)
        if self.calibrations:
            docs = {label: c.as_dict() for label, c in self.calibrations.items()}
            doc = next(iter(docs.values())) if len(docs) == 1 else {"pairs": docs}
            path = self.out_dir / "calibration.json"
            path.write_text(json.dumps(doc, indent=2, default=str))
            files.append(str(path))
            if len(docs) == 1:
                tracker.log_metrics(self.run_id, calibration_metrics(next(iter(self.calibrations.values()))))
        self.files = report_task(tracker, self.run_id, str(self.out_dir), cfg.name, pl.DataFrame(self.rows),
                                 self.curves, cfg.horizon, cfg.smoothing, "\n".join(self.sections + sections),
                                 excerpts=self.excerpts, files=files)

    def result(self, cached: list[str], ran: list[str], corpus_alpha: dict) -> dict:
        """What the study flow returns (the CLI prints it)."""
        return {"run_url": self.tracker.run_url(self.run_id), "experiment_url": self.tracker.experiment_url(),
                "run_id": self.run_id, "report": self.files.get("report"), "html": self.files.get("html"),
                "out_dir": str(self.out_dir), "rows": self.rows, "cached": cached, "ran": ran,
                "calibration": {k: c.as_dict() for k, c in self.calibrations.items()}, "corpus_alpha": corpus_alpha}


class PairRecord:
    """The child runs of one (model, dataset): one per decoding, and one for its calibration."""

    def __init__(self, study: StudyRecord, model: ModelSpec, dataset: DatasetSpec, prompts: pl.DataFrame):
        self.study, self.model, self.dataset, self.prompts = study, model, dataset, prompts
        cfg = study.config
        self.prompts_uri = publish.upload_prompts(study.settings, prompts, frame_digest(prompts)[:16])
        self.generations: dict[str, pl.DataFrame] = {}
        self.reference: dict[str, pl.DataFrame] = {}
        self.open = {d.key: study._child(
            publish.display_name(model, dataset, d),
            {"entcal.stage": "child", "entcal.child": publish.child_name(model, dataset, d)},
            publish.child_description(cfg, model, dataset, d)) for d in cfg.decodings}

    @property
    def label(self) -> str:
        return f"{self.model.label}__{self.dataset.label}"

    def publish(self, decoding: DecodingSpec, generations: pl.DataFrame, reference: pl.DataFrame,
                summary: Summary, agreement: dict | None = None) -> None:
        """Fill and finish the decoding's child run (and write its tables under --out); ``agreement``:
        engine: vllm's log-probs against the re-score (Executor.agreement)."""
        study, cfg, model, dataset, d = self.study, self.study.config, self.model, self.dataset, decoding
        self.generations[d.key], self.reference[d.key] = generations, reference
        horizon = cfg.horizon
        if d.temperature == 1.0 and not d.truncated:
            study.example_sums[model.label, dataset.label] = metrics.example_sums(generations, reference,
                                                                                  horizon=horizon)
        curves = metrics.step_curves(generations, reference, horizon=horizon)
        doc = publish.summary_json(summary, cfg, model, dataset, d, model.params, agreement)
        name = publish.child_name(model, dataset, d)
        tables = {"prompts": self.prompts, "generations": generations, "reference": reference}
        params = {"model": model.label, "dataset": dataset.label, "decoding": d.key, "engine": model.engine,
                  **d.model_dump(),
                  "horizon": horizon, "num_examples": cfg.num_examples, "max_new_tokens": cfg.max_new_tokens,
                  "prompt_tokens": cfg.prompt_tokens, "seed": cfg.seed, "samples_per_prompt": cfg.samples_per_prompt}
        run_id = publish_child_task(study.tracker, study.run_id, name, params, doc, curves, tables,
                                    run_id=self.open[d.key], prompts_uri=self.prompts_uri,
                                    description=publish.child_description(cfg, model, dataset, d),
                                    examples=publish.example_table(generations, reference, horizon=horizon))
        self.open.pop(d.key)
        if study.write_tables:
            publish.write_child_dir(study.out_dir, name, tables, doc)
        study.rows.append({"model": model.label, "dataset": dataset.label, "decoding": d.key,
                           "temperature": d.temperature, "truncated": d.truncated, "run_id": run_id,
                           "run_url": study.tracker.run_url(run_id),
                           **{k: getattr(summary, k) for k in report.METRIC_COLUMNS}})
        study.curves.append({"model": model.label, "dataset": dataset.label, "decoding": d.key, "curves": curves})
        study.tracker.log_metrics(study.run_id, publish.headline_metrics(study.rows[-1:],
                                                                         several_models=len(cfg.models) > 1))

    def start_calibration(self) -> None:
        """The calibration child run, RUNNING from now until publish_calibration (or a failure)."""
        cfg, model, dataset = self.study.config, self.model, self.dataset
        self.open["calibration"] = self.study._child(
            f"calibration · {dataset.label} · {model.label}",
            {"entcal.stage": "calibration", "entcal.child": f"calibration__{self.label}"},
            f"τ*, truncations, lookahead and future-entropy calibration of {model.label} on "
            f"{dataset.label} (study {cfg.name}, config `{cfg.digest()}`)")

    def publish_calibration(self, result: CalibrationResult) -> None:
        study = self.study
        study.calibrations[self.label] = result
        study.sections.append(calibration_markdown(result))
        study.figures.append(result.pareto_figure)
        publish_calibration_task(study.tracker, self.open["calibration"], self.label, result.as_dict(),
                                 calibration_metrics(result))
        self.open.pop("calibration")  # only now: a failed publish leaves it to the pair's handler


# ------------------------------------------------------------------ links between the two UIs
def prefect_links() -> dict[str, str]:
    """Tags linking an MLflow run to this Prefect flow run: ``prefect.flow_run_id``, ``prefect.flow_run_name``
    and ``prefect.flow_run_url`` (the Prefect UI, ``PREFECT_UI_URL`` or the API URL without ``/api``,
    then ``/runs/flow-run/<id>``; any user:password in the URL is dropped). Empty outside a flow run."""
    from urllib.parse import urlsplit, urlunsplit

    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    flow_run_id = flow_run.get_id()
    if not flow_run_id:
        return {}
    tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": str(flow_run.name or "")}
    api = PREFECT_API_URL.value()
    ui = PREFECT_UI_URL.value() or (api.rstrip("/").removesuffix("/api") if api else None)
    if ui:
        parts = urlsplit(ui.rstrip("/"))
        ui = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        tags["prefect.flow_run_url"] = f"{ui}/runs/flow-run/{flow_run_id}"
    return tags


def parent_run_name(config: StudyConfig) -> str:
    """``<study>-<UTC %Y%m%d-%H%M%S>``: the flow run's own name when it has that form, so both UIs agree."""
    from prefect.runtime import flow_run

    name = flow_run.name if flow_run.get_id() else None
    if name and name.startswith(f"{config.name}-"):
        return name
    return f"{config.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def link_mlflow_run(name: str, url: str) -> None:
    """A Prefect link artifact ``mlflow-<study>`` on this flow run pointing at the MLflow study run."""
    from prefect.artifacts import create_link_artifact

    try:
        create_link_artifact(link=url, link_text=f"MLflow study run of {name}",
                             key="mlflow-" + artifact_key(name).removeprefix("entcal-"),
                             description=f"The MLflow run of entcal study {name}: metrics, tables, figures")
    except Exception as err:  # a link never fails a study
        get_run_logger().warning("no Prefect link artifact to %s: %s", url, err)
