"""MLflow: a parent run per study, a child run per (model, dataset, decoding).

Stable metric names for MLflow's comparison views: ``entce``, ``entropy_mean``, ``logloss_mean``,
``entce_ci_low``, ``entce_ci_high`` (and per-step curves ``step_entropy`` / ``step_logloss``,
logged with ``log_batch`` in chunks because one HTTP call per step is slow).
Uses ``MlflowClient`` with explicit run ids, so nothing depends on a thread-local active run;
since ``create_run`` adds no standard tags, ``Tracker.start`` adds them (user, source, git commit,
description). Experiments are tagged ``mlflow.experimentKind = custom_model_development``, but MLflow
3.17's UI picks its GenAI or Model-training view from the URL's ``workflowType`` (else a browser-stored
choice, GenAI by default), so every link made here carries ``workflowType=machine_learning``, and
``experiment_url`` adds ``viewStateShareKey=entcal``: the shared view state ``set_view_state`` stores in
the experiment tag ``mlflow.sharedViewState.entcal`` (the headline metric columns, newest run first).
System metrics (``system/cpu_utilization_percentage``, memory, GPU) come from MLflow's own
``SystemMetricsMonitor`` on the runs that do model work, every ``SYSTEM_METRICS_INTERVAL_S``
seconds (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides).
"""
from __future__ import annotations

import contextlib
import getpass
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from entcal.storage.errors import UserError

log = logging.getLogger(__name__)

BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning" in MLflow 3.17's UI: opens on the runs
NOTE = "mlflow.note.content"  # the run's (or experiment's) description in the UI
ML_VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI ignores experimentKind: the URL chooses the view
VIEW_STATE_KEY = "entcal"  # ?viewStateShareKey=entcal loads the experiment tag VIEW_STATE_TAG + VIEW_STATE_KEY
VIEW_STATE_TAG = "mlflow.sharedViewState."
HEADLINE_COLUMNS = ("entce", "entce_ci_low", "entce_ci_high", "entropy_mean", "logloss_mean", "calib_error_per_step",
                    "entce_slope")
IDENTITY_TAGS = ("entcal.model_identity", "entcal.dataset_identity")  # what a child run read: told apart by them
# runs grouped by their stage tag, the children's group open: MLflow lists a group's runs flat, so each
# child's values are in sight (nested under its parent they would hide behind an expander MLflow never shares)
GROUP_BY_STAGE = {"groupByKeys": [{"mode": "tag", "groupByData": "entcal.stage"}], "aggregateFunction": "average"}
SYSTEM_METRICS_INTERVAL_S = 5.0
_MONITORS: dict[str, object] = {}  # run id -> SystemMetricsMonitor, stopped by Tracker.finish
_MONITORS_LOCK = threading.Lock()


class TrackingError(UserError, RuntimeError):
    """MLflow is unreachable or refused a write: the message names the server."""


def owner_tags() -> dict[str, str]:
    """Tags naming the process that starts a run (``entcal.owner_host`` / ``_pid`` / ``_start``: the
    process's start time, seconds since the epoch), so a later study can end the runs of a killed one."""
    from entcal.storage.stack import owner_record

    rec = owner_record()
    return {"entcal.owner_host": rec["host"], "entcal.owner_pid": str(rec["pid"]), "entcal.owner_start": str(rec["start"])}


def owner_of(tags: dict) -> dict | None:
    """The owner record (storage.stack.owner_record's shape) in a run's tags or a flow run's labels, else None."""
    try:
        return {"host": tags["entcal.owner_host"], "pid": int(tags["entcal.owner_pid"]),
                "start": float(tags["entcal.owner_start"]) if tags.get("entcal.owner_start") not in (None, "None") else None}
    except (KeyError, TypeError, ValueError):
        return None


def check_server(uri: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when the MLflow server does not answer."""
    from entcal.storage.stack import http_ok

    if not uri:
        raise TrackingError("no MLflow server: set MLFLOW_TRACKING_URI or run `entcal stack up`")
    if uri.startswith(("http://", "https://")) and not http_ok(uri.rstrip("/") + "/health", timeout_s):
        raise TrackingError(f"MLflow at {uri} is unreachable; check MLFLOW_TRACKING_URI or `entcal stack status`")


def git_commit() -> str:
    """HEAD of the repository this package lives in, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def _as_tracking_error(method):
    """MLflow and connection failures leave a Tracker method as one-line TrackingErrors, never silently."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except TrackingError:
            raise
        except Exception as err:
            first = (str(err).splitlines() or [""])[0][:200]
            raise TrackingError(f"MLflow at {self.uri} failed during {method.__name__} "
                                f"({err.__class__.__name__}: {first})") from err
    return wrapper


class Tracker:
    """One experiment on one MLflow server. ``source`` names the code that makes the runs
    (``mlflow.source.name``)."""

    def __init__(self, uri: str, experiment: str, *, source: str | None = None):
        self.uri = uri.rstrip("/")
        self.client = MlflowClient(tracking_uri=uri)
        self.standard_tags = {"mlflow.user": _user(), "mlflow.source.name": source or Path(sys.argv[0]).name,
                              "mlflow.source.type": "JOB", "mlflow.source.git.commit": git_commit()}
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(experiment,
                                                                       tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except MlflowException:  # a study of the same name, started at the same moment, made it first
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
            if exp is not None:
                self.experiment_id = exp.experiment_id
                if not exp.tags.get(EXPERIMENT_KIND_TAG):  # made before kinds existed: opens on traces
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except MlflowException as err:
            raise TrackingError(f"MLflow at {uri}: {str(err).splitlines()[0][:200]}") from None
        except Exception as err:  # connection errors surface as requests/urllib3 exceptions
            raise TrackingError(f"MLflow at {uri} is unreachable ({err.__class__.__name__}); "
                                "is the server up? `entcal stack status`") from None

    def describe_experiment(self, text: str) -> None:
        """The experiment's description (its note in the UI), unless it has one: a note written in the UI stays."""
        if not self.client.get_experiment(self.experiment_id).tags.get(NOTE):
            self.client.set_experiment_tag(self.experiment_id, NOTE, text)

    def run_url(self, run_id: str, path: str = "") -> str:
        """The run's page in the Model-training view; ``path`` is a sub-route (``/artifacts/report/x.html``),
        put before the query string."""
        return f"{self.uri}/#/experiments/{self.experiment_id}/runs/{run_id}{path}?{ML_VIEW}"

    def experiment_url(self) -> str:
        """The experiment's runs table in the Model-training view, with the shared view state of
        ``set_view_state`` (MLflow shows an error notification if that tag is missing)."""
        return f"{self.uri}/#/experiments/{self.experiment_id}/runs?{ML_VIEW}&viewStateShareKey={VIEW_STATE_KEY}"

    @staticmethod
    def view_state(metrics: tuple[str, ...] = HEADLINE_COLUMNS, tags: tuple[str, ...] = IDENTITY_TAGS,
                   width_px: int = 125, tag_width_px: int = 320) -> dict:
        """MLflow 3.17's shared view state (search facets and uiState fields): runs grouped by stage with the
        children's group open (``GROUP_BY_STAGE``: MLflow drops runsExpanded from a shared state, so nested
        under their parents the children's values would hide behind its expander), newest first, with
        ``metrics`` (``width_px`` wide), the identity ``tags`` (which weights and data a run read: two
        checkpoints of one model differ there; ``tag_width_px`` wide, right after EntCE and its CI, so both
        are in sight in a laptop's window) and Dataset as columns. Column ids
        are the UI's canonical keys (``metrics.`entce```, ``tags.`entcal.model_identity```). The UI applies
        ``columnWidths`` only to the columns in ``columnOrder``, so they are listed there too."""
        first = [f"metrics.`{m}`" for m in metrics[:3]]  # EntCE and its CI, then what the run read, then the rest
        columns = first + [f"tags.`{t}`" for t in tags] + [f"metrics.`{m}`" for m in metrics[3:]]
        widths = {c: (tag_width_px if c.startswith("tags.") else width_px) for c in columns}
        return {"orderByKey": "attributes.start_time", "orderByAsc": False, "groupBy": GROUP_BY_STAGE,
                "groupsExpanded": {"tag.entcal.stage.child": True},
                "selectedColumns": [*columns, "attributes.`Dataset`"], "columnOrder": columns, "columnWidths": widths}

    @_as_tracking_error
    def set_view_state(self, state: dict | None = None) -> None:
        """Store ``state`` (default ``view_state()``) as JSON in the experiment tag ``experiment_url`` loads."""
        import json

        self.client.set_experiment_tag(self.experiment_id, VIEW_STATE_TAG + VIEW_STATE_KEY,
                                       json.dumps(state or self.view_state()))

    @_as_tracking_error
    def start(self, name: str, *, parent_id: str | None = None, tags: dict[str, str] | None = None,
              description: str | None = None) -> str:
        """A RUNNING run with the standard tags the fluent API would add (user, source, git commit),
        ``tags`` on top, and ``description`` as its note."""
        tags = {**self.standard_tags, **owner_tags(), **(tags or {})}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        if description:
            tags[NOTE] = description
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    @_as_tracking_error
    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """The one way a run ends: stop its system-metrics monitor (flushing its samples), then set its status."""
        self.stop_system_metrics(run_id)
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def run(self, name: str, *, parent_id: str | None = None, tags: dict[str, str] | None = None,
            description: str | None = None, system_metrics: bool = False):
        """A run (``start``) for the block, with system metrics sampled while it lasts if asked; it ends
        FINISHED, FAILED on an exception, KILLED on SIGTERM / Ctrl-C. Yields the run id. A second error
        while ending a failed run (MLflow down) is logged, so the first one reaches the user."""
        run_id = self.start(name, parent_id=parent_id, tags=tags, description=description)
        if system_metrics:
            self.start_system_metrics(run_id)
        try:
            yield run_id
        except BaseException as err:
            try:
                self.end(run_id, "FAILED" if isinstance(err, Exception) else "KILLED")
            except TrackingError as second:
                log.warning("could not end MLflow run %s: %s", run_id, second)
            raise
        self.end(run_id)

    def start_system_metrics(self, run_id: str, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> None:
        """Sample CPU, memory, disk, network (and GPU where pynvml sees one) into ``system/*`` metrics
        of ``run_id`` every ``interval_s`` seconds, in a daemon thread, until ``finish``."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=self.uri)
            monitor.start()
        except Exception as err:  # a diagnostic never fails a study
            log.warning("no system metrics for MLflow run %s: %s", run_id, err)
            return
        with _MONITORS_LOCK:
            _MONITORS[run_id] = monitor

    def stop_system_metrics(self, run_id: str) -> None:
        with _MONITORS_LOCK:
            monitor = _MONITORS.pop(run_id, None)
        if monitor is not None:
            monitor.finish()

    @_as_tracking_error
    def latest_run(self, filter_string: str, *, exclude: str | None = None):
        """The newest run of this experiment matching ``filter_string`` (other than ``exclude``), or None."""
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"], max_results=2)
        return next((r for r in runs if r.info.run_id != exclude), None)

    @_as_tracking_error
    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    @_as_tracking_error
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH])

    @_as_tracking_error
    def log_curves(self, run_id: str, curves: dict[str, list[float]]) -> None:
        """Per-step curves as step metrics (NaN steps skipped), in batches."""
        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, t) for name, values in curves.items()
                 for t, v in enumerate(values) if v is not None and v == v]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH])

    @_as_tracking_error
    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    @_as_tracking_error
    def log_table(self, run_id: str, df: pl.DataFrame, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"{name}.parquet"
            df.write_parquet(p)
            self.client.log_artifact(run_id, str(p), "tables")

    @_as_tracking_error
    def log_json(self, run_id: str, obj: dict, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    @_as_tracking_error
    def log_table_view(self, run_id: str, df: pl.DataFrame, artifact_file: str) -> None:
        """A table the MLflow UI shows (``MlflowClient.log_table``, JSON). MLflow appends to an existing
        table file, so a retried publish would double its rows: an existing file is left as it is."""
        folder = str(Path(artifact_file).parent)
        if artifact_file in {f.path for f in self.client.list_artifacts(run_id, None if folder == "." else folder)}:
            return
        self.client.log_table(run_id, df.to_pandas(), artifact_file)

    @_as_tracking_error
    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        """A matplotlib ``Figure`` as a PNG artifact (shown inline in the run's artifacts)."""
        self.client.log_figure(run_id, figure, artifact_file)

    @_as_tracking_error
    def log_input_table(self, run_id: str, df: pl.DataFrame, name: str, digest: str,
                        source: str | None = None) -> None:
        """Record the prompts table as an MLflow dataset input (the run's 'Datasets'), through
        ``mlflow.data``: ``source`` is where the table lives (an ``s3://`` URI), else the code that made it."""
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        ds = from_pandas(df.to_pandas(), source=source, name=name, digest=digest)
        self.client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                              tags=[InputTag("mlflow.data.context", "eval")])])

    # ---- runs left RUNNING by a process that died (kill -9 runs no finally and no Prefect hook)
    def _running(self, filter_string: str) -> list:
        exps = [e.experiment_id for e in self.client.search_experiments(filter_string="name LIKE 'entcal/%'")]
        exps = sorted(set(exps) | {self.experiment_id})
        runs, token = [], None
        while True:
            page = self.client.search_runs(exps, filter_string=f"attributes.status = 'RUNNING' and {filter_string}",
                                           max_results=500, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    @_as_tracking_error
    def end_orphans(self, logger=None) -> list[str]:
        """Set KILLED every RUNNING run of the entcal experiments whose owner process on this host is
        gone (see ``owner_tags``), logging one line per run (to ``logger``, else this module's). Returns their ids."""
        import socket

        from entcal.storage.stack import owner_alive

        ended = []
        for run in self._running(f"tags.`entcal.owner_host` = '{socket.gethostname()}'"):
            owner = owner_of(run.data.tags)
            if owner is None or owner_alive(owner):
                continue
            self.end(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
            (logger or log).warning("MLflow run %s (%s) was left RUNNING by entcal process %s, which is gone: set KILLED",
                        run.info.run_id, run.info.run_name, owner["pid"])
        return ended

    @_as_tracking_error
    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
