"""The one publisher: a study's records become MLflow runs (artifacts in S3), Prefect artifacts, ``--out``
folders and the report.

    with Publisher(config, settings, out, links=..., run_name=...).study() as study:  # the parent run
        with study.pair(model, dataset, prompts) as pair:                          # a child per decoding
            pair.publish(pair_result)                                              # fills one child
            with pair.calibration() as calibration:                                # the calibration child
                calibration.publish(calibration_result)
        result = study.report(study_result)                                        # note, tables, report

It decides where things go and when runs open and close; what they say is presentation, in tasks/:
names, descriptions, params and metric names tasks/describe.py, the report's text and HTML
tasks/report.py (with the excerpts of generations it shows, picked here from what was published),
figures tasks/figures.py.

Runs open and close as context managers (storage.tracking.Tracker.run): a child run spans its
generation and scoring, and ends FINISHED with its block, FAILED on an error, KILLED on SIGTERM or
Ctrl-C. ``--out`` folders are written atomically: a child's
tables go to ``<name>.partial/`` and are renamed into place only when complete, so a crashed run never
leaves a folder that looks finished.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import polars as pl

from entcal.storage import s3
from entcal.storage.settings import Settings
from entcal.storage.tracking import NOTE, Tracker, TrackingError
from entcal.tasks import datasets, describe, figures, models, report
from entcal.tasks.config import DatasetSpec, ModelSpec, StudyConfig
from entcal.tasks.contracts import CalibrationResult, PairResult, StudyResult, frame_digest


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "entcal-" + ("".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "study")


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


class Publisher:
    """Where one study's results go: its MLflow experiment ``entcal/<study>``, its report folder (``out``,
    else ``<state dir>/reports/<study>-<time>``; with ``out`` every child's tables too). ``links``: tags
    linking each run to the Prefect flow run; ``run_name``: the parent run's name."""

    def __init__(self, config: StudyConfig, settings: Settings, out: str | None, *, links: dict[str, str],
                 run_name: str):
        if not settings.mlflow_uri:
            raise TrackingError("no MLflow server: set MLFLOW_TRACKING_URI or run `entcal stack up`")
        self.config, self.settings, self.links, self.run_name = config, settings, links, run_name
        self.write_tables = bool(out)
        self.out_dir = Path(out) if out else settings.state_dir / "reports" / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
        self.tracker = Tracker(settings.mlflow_uri, experiment=f"entcal/{config.name}", source="flows/study.py:study")

    @contextlib.contextmanager
    def study(self):
        """The parent run for the block: params, the config as files, the experiment's view, links both ways."""
        cfg, tracker = self.config, self.tracker
        params, files = describe.flat_params(cfg), describe.config_files(cfg)
        tags = {"entcal.stage": "study", "entcal.config_digest": cfg.digest(), **describe.provenance(), **self.links}
        previous = tracker.latest_run("tags.`entcal.stage` = 'study'")  # what this launch changed
        note = describe.study_description(cfg, previous=previous)
        tracker.describe_experiment(describe.experiment_description(cfg.name))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with tracker.run(self.run_name, tags=tags, description=note) as run_id:
            tracker.log_params(run_id, params)
            for file, doc in files.items():
                tracker.log_json(run_id, doc, file)
            tracker.set_view_state()  # the runs table experiment_url opens: headline metric columns, newest first
            _link_artifact(cfg.name, tracker.run_url(run_id))
            yield StudyRun(self, run_id, note)


class StudyRun:
    """The open parent run of a study."""

    def __init__(self, publisher: Publisher, run_id: str, note: str):
        self.p, self.run_id, self.note = publisher, run_id, note
        self.children: dict[tuple[str, str, str], str] = {}  # (model, dataset, decoding key) -> child run id
        self.excerpts: list[dict] = []  # generations the report shows, picked from each pair as it ends

    @property
    def url(self) -> str:
        return self.p.tracker.run_url(self.run_id)

    def _child(self, name: str, tags: dict, description: str):
        return self.p.tracker.run(name, parent_id=self.run_id, tags={**tags, **self.p.links},
                                  description=description, system_metrics=True)

    @contextlib.contextmanager
    def pair(self, model: ModelSpec, dataset: DatasetSpec, prompts: pl.DataFrame):
        """The child runs of one (model, dataset), one per decoding, RUNNING for the block."""
        cfg, pair = self.p.config, PairRuns(self, model, dataset)
        runs = {d.key: (describe.display_name(model, dataset, d), describe.child_name(model, dataset, d),
                        describe.child_description(cfg, model, dataset, d)) for d in cfg.decodings}
        ids = describe.identity_tags(model, dataset)
        parquet = io.BytesIO()
        prompts.write_parquet(parquet)
        pair.source = s3.put_content(self.p.settings, "prompts", parquet.getvalue(), ".parquet")  # lineage source
        with contextlib.ExitStack() as stack:
            for key, (name, child, note) in runs.items():
                pair.ids[key] = stack.enter_context(self.p.tracker.run(
                    name, parent_id=self.run_id, tags={"entcal.stage": "child", "entcal.child": child, **ids,
                                                       **self.p.links}, description=note, system_metrics=True))
                self.children[model.label, dataset.label, key] = pair.ids[key]
            yield pair
        self.excerpts += pair.excerpts

    def report(self, result: StudyResult) -> dict:
        """The report (tasks/report.py: figures, sections, calibration.json, report.md and report.html in the
        report folder), then the parent's note, headline metrics and summary table, the report's files in the
        run's report/ folder, and the Prefect report artifact. Returns what the study flow returns (the CLI
        prints it)."""
        p, cfg, tracker = self.p, self.p.config, self.p.tracker
        ids = [self.children[pair.model, pair.dataset, pair.decoding.key] for pair in result.pairs]
        rows = [{**pair.row(), "run_id": i, "run_url": tracker.run_url(i)} for pair, i in zip(result.pairs, ids)]
        note = f"{self.note}\n\n{describe.results_markdown(rows)}"
        headline = describe.headline_metrics(rows, several_models=len(cfg.models) > 1)
        if len(result.calibrations) == 1:
            headline |= describe.calibration_metrics(result.calibrations[0])
        inputs = {f"model {m.label}": models.identity(m) for m in cfg.models}
        inputs |= {f"dataset {d.label}": datasets.identity(d) for d in cfg.datasets}
        written = report.write_report(p.out_dir, cfg.name, rows, result, horizon=cfg.horizon, run_url=self.url,
                                      excerpts=self.excerpts, inputs=inputs)
        tracker.set_tags(self.run_id, {NOTE: note})
        tracker.log_metrics(self.run_id, headline)
        tracker.log_table_view(self.run_id, pl.DataFrame(rows).select("decoding", "dataset", "model",
                                                                      *report.METRIC_COLUMNS, "run_id"),
                               "tables/summary.json")
        for path in written.values():
            tracker.log_file(self.run_id, path, "report")
        self._report_artifact(written["report"].read_text())
        calibration = {c.label: c.as_dict() for c in result.calibrations}
        return {"run_url": self.url, "experiment_url": tracker.experiment_url(), "run_id": self.run_id,
                "report": str(written["report"]), "html": str(written["html"]), "out_dir": str(p.out_dir),
                "rows": rows, "cached": result.cached, "ran": result.ran,
                "calibration": calibration, "corpus_alpha": result.corpus_alpha}

    def _report_artifact(self, md: str) -> None:
        """report.md as a Prefect artifact, its figures turned into links to MLflow's artifact view (the Prefect
        UI cannot show local images), headed by a link to report.html there."""
        if not _in_flow_run():
            return
        from prefect.artifacts import create_markdown_artifact

        tracker, name = self.p.tracker, self.p.config.name

        def view(file: str) -> str:  # MLflow's UI route for one artifact; it shows .html in an iframe
            return tracker.run_url(self.run_id, f"/artifacts/report/{file}")
        download = f"{tracker.uri}/get-artifact?path=report/report.html&run_uuid={self.run_id}"
        head = (f"**[The full report in MLflow]({view('report.html')})** (figures, and generations shaded by "
                f"entropy) · [download report.html]({download})\n\n")
        create_markdown_artifact(markdown=head + report.artifact_markdown(md, view), key=artifact_key(name),
                                 description=f"entcal study {name}: EntCE per decoding; MLflow {self.url}")


class PairRuns:
    """The open child runs of one (model, dataset)."""

    def __init__(self, study: StudyRun, model: ModelSpec, dataset: DatasetSpec):
        self.study, self.model, self.dataset = study, model, dataset
        self.ids: dict[str, str] = {}  # decoding key -> its child run (opened by StudyRun.pair)
        self.source: str | None = None  # the prompts' S3 copy (their lineage source in MLflow)
        self.excerpts: list[dict] = []  # the report's excerpts of generations: τ = 1's, else the first published

    def publish(self, pair: PairResult) -> None:
        """Fill the decoding's child run (it ends with the pair's block) and write its ``--out`` folder."""
        p, cfg = self.study.p, self.study.p.config
        tracker, run_id, d = p.tracker, self.ids[pair.decoding.key], pair.decoding
        doc = describe.summary_json(pair, cfg, self.model, self.dataset)
        name = describe.child_name(self.model, self.dataset, d)
        note = describe.child_description(cfg, self.model, self.dataset, d)
        params, metrics = describe.child_params(pair, cfg, self.model), describe.child_metrics(pair)
        prompts = pair.tables["prompts"]
        if d.key == "t1" or not self.excerpts:
            self.excerpts = report.pick_excerpts(prompts, pair.tables["generations"], pair.tables["reference"],
                                                 model=self.model.label, horizon=cfg.horizon)
        tracker.log_params(run_id, params)
        tracker.log_metrics(run_id, metrics)
        tracker.log_curves(run_id, {"step_entropy": pair.curves["entropy_mean"].to_list(),
                                    "step_logloss": pair.curves["logloss_mean"].to_list()})
        tracker.log_input_table(run_id, prompts, f"prompts:{pair.dataset}", frame_digest(prompts)[:16],
                                source=self.source)
        for table, df in pair.tables.items():
            tracker.log_table(run_id, df, table)
        tracker.log_table_view(run_id, pair.examples, "tables/examples.json")
        tracker.log_figure(run_id, figures.error_accumulation_figure(pair.curves, f"{name}: h_t vs l_t"),
                           "figures/error_accumulation.png")
        tracker.log_json(run_id, doc, "summary.json")
        tracker.set_tags(run_id, {NOTE: f"{note}\n\n{describe.result_sentence(doc)}"})
        if p.write_tables:
            write_child_dir(p.out_dir, name, pair.tables, doc)

    @contextlib.contextmanager
    def calibration(self):
        """The calibration child run, RUNNING for the block (its fits), filled by ``publish``."""
        with self.study._child(*describe.calibration_run(self.study.p.config, self.model, self.dataset)) as run_id:
            yield CalibrationRun(self.study.p.tracker, run_id)


class CalibrationRun:
    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def publish(self, result: CalibrationResult) -> None:
        """Stable metric names (tau_star, ...) and calibration.json."""
        self.tracker.log_metrics(self.run_id, describe.calibration_metrics(result))
        self.tracker.log_json(self.run_id, result.as_dict(), "calibration.json")


# ------------------------------------------------------------------ files
def write_child_dir(out: Path, name: str, tables: dict[str, pl.DataFrame], summary: dict) -> Path:
    """out/<name>/{prompts,generations,reference}.parquet + summary.json, committed atomically."""
    final = out / name
    partial = out / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for table, df in tables.items():
        df.write_parquet(partial / f"{table}.parquet")
    (partial / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def _link_artifact(name: str, url: str) -> None:
    """A Prefect link artifact ``mlflow-<study>`` on this flow run pointing at the MLflow study run."""
    if not _in_flow_run():
        return
    from prefect.artifacts import create_link_artifact

    create_link_artifact(link=url, link_text=f"MLflow study run of {name}",
                         key="mlflow-" + artifact_key(name).removeprefix("entcal-"),
                         description=f"The MLflow run of entcal study {name}: metrics, tables, figures")
