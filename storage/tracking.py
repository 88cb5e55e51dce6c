"""MLflow: a parent run per study, a child run per (model, dataset, decoding).

Stable metric names for MLflow's comparison views: ``entce``, ``entropy_mean``, ``logloss_mean``,
``entce_ci_low``, ``entce_ci_high`` (and per-step curves ``step_entropy`` / ``step_logloss``,
logged with ``log_batch`` in chunks because one HTTP call per step is slow).
Uses ``MlflowClient`` with explicit run ids, so nothing depends on a thread-local active run.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import polars as pl
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from storage.errors import UserError

log = logging.getLogger(__name__)

BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


class TrackingError(UserError, RuntimeError):
    """MLflow is unreachable or refused a write: the message names the server."""


def check_server(uri: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when the MLflow server does not answer."""
    from storage.stack import http_ok

    if not uri:
        raise TrackingError("no MLflow server: set MLFLOW_TRACKING_URI or run `entcal stack up`")
    if uri.startswith(("http://", "https://")) and not http_ok(uri.rstrip("/") + "/health", timeout_s):
        raise TrackingError(f"MLflow at {uri} is unreachable; check MLFLOW_TRACKING_URI or `entcal stack status`")


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
    def __init__(self, uri: str, experiment: str):
        self.uri = uri.rstrip("/")
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except MlflowException as err:
            raise TrackingError(f"MLflow at {uri}: {str(err).splitlines()[0][:200]}") from None
        except Exception as err:  # connection errors surface as requests/urllib3 exceptions
            raise TrackingError(f"MLflow at {uri} is unreachable ({err.__class__.__name__}); "
                                "is the server up? `entcal stack status`") from None

    def run_url(self, run_id: str) -> str:
        return f"{self.uri}/#/experiments/{self.experiment_id}/runs/{run_id}"

    @_as_tracking_error
    def start(self, name: str, *, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    @_as_tracking_error
    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

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
    def log_input_table(self, run_id: str, df: pl.DataFrame, name: str, digest: str) -> None:
        """Record the prompts table as an MLflow dataset input (shown in the run's 'Datasets')."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        schema = json.dumps({"mlflow_colspec": [{"name": c, "type": str(t)} for c, t in df.schema.items()]})
        ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"table": name}),
                     schema=schema, profile=json.dumps({"num_rows": df.height}))
        self.client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", "eval")])])

    @_as_tracking_error
    def artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri
