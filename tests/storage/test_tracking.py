"""storage.tracking and the MLflow side of flows.publish / tasks.describe against the real MLflow server of
the stack: what a user sees in the MLflow UI (experiment kind, standard tags, system metrics, dataset lineage,
tables and figures), read back through MlflowClient."""
import getpass
import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import polars as pl
from mlflow.tracking import MlflowClient

from entcal.tasks import describe, figures
from entcal.tasks.config import StudyConfig
from entcal.tasks.contracts import frame_digest

ROOT = Path(__file__).resolve().parents[2]


def _tracker(stack, name=None, **kw):
    from entcal.storage.tracking import Tracker

    return Tracker(stack.mlflow_uri, experiment=name or f"entcal/tracking-{uuid.uuid4().hex[:8]}", **kw)


# ------------------------------------------------------------------ names, params, descriptions (no server)
def test_display_names_put_the_difference_first_and_keep_the_out_dir_contract():
    cfg = StudyConfig.model_validate({"name": "demo-quick", "models": [{"name": "smollm2-135m"}],
                                      "decodings": [{"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9}]})
    m, ds = cfg.models[0], cfg.datasets[0]
    names = [describe.display_name(m, ds, d) for d in cfg.decodings]
    assert names == ["t1 · python-docs · smollm2-135m", "t1-p0.9 · python-docs · smollm2-135m"]
    assert [describe.child_name(m, ds, d) for d in cfg.decodings] == ["smollm2-135m__python-docs__t1",
                                                                     "smollm2-135m__python-docs__t1-p0.9"]


def test_study_params_are_scalar_and_two_launches_differ_in_their_descriptions():
    a = StudyConfig.model_validate({"name": "demo-quick", "num_examples": 4, "max_new_tokens": 16,
                                    "min_reference_tokens": 16,
                                    "decodings": [{"temperature": 1.0}, {"temperature": 0.7}]})
    b = a.model_copy(update={"num_examples": 8})
    params = describe.flat_params(a)
    assert params["decodings"] == "t1,t0.7" and params["models"] == "smollm2-135m" and params["calibration"] == "off"
    assert not [k for k, v in params.items() if str(v).startswith(("[", "{"))]  # no JSON blobs
    assert describe.changed_settings(params, describe.flat_params(b)) == ["num_examples 4 → 8"]

    previous = SimpleNamespace(info=SimpleNamespace(run_name="demo-quick-20261201-120000"),  # an mlflow Run's shape
                               data=SimpleNamespace(params={k: str(v) for k, v in params.items()}))
    da, db = describe.study_description(a), describe.study_description(b, previous=previous)
    assert a.digest() in da and b.digest() in db and da != db
    assert "changed since the previous launch demo-quick-20261201-120000: num_examples 4 → 8" in db


def test_headline_metrics_name_the_dataset_and_decoding_and_keep_full_precision():
    rows = [{"model": "m", "dataset": "python-docs", "decoding": "t1", "entce": 0.123456789},
            {"model": "m", "dataset": "python-docs", "decoding": "t0.7", "entce": -1.5}]
    assert describe.headline_metrics(rows, several_models=False) == {"entce_python-docs_t1": 0.123456789,
                                                                    "entce_python-docs_t0.7": -1.5}
    assert set(describe.headline_metrics(rows, several_models=True)) == {"entce_m_python-docs_t1",
                                                                        "entce_m_python-docs_t0.7"}


# ------------------------------------------------------------------ against the MLflow server
def test_experiments_open_on_their_runs_new_and_old(stack):
    from entcal.storage.tracking import EXPERIMENT_KIND_TAG

    client = MlflowClient(stack.mlflow_uri)
    new = _tracker(stack)
    new.describe_experiment("what this experiment holds")
    new.describe_experiment("a later launch's text")  # a description, once there (or written in the UI), stays
    tags = client.get_experiment(new.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"  # the 3.17 UI's "Machine learning" kind
    assert tags["mlflow.note.content"] == "what this experiment holds"
    # an experiment made before (no kind: the UI opened it on the GenAI traces overview) gets one
    old_name = f"entcal/old-{uuid.uuid4().hex[:8]}"
    old_id = client.create_experiment(old_name)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old_id).tags
    assert _tracker(stack, old_name).experiment_id == old_id
    assert client.get_experiment(old_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # a kind someone chose in the UI is left alone
    chosen = client.create_experiment(f"entcal/chosen-{uuid.uuid4().hex[:8]}",
                                      tags={EXPERIMENT_KIND_TAG: "genai_development"})
    _tracker(stack, client.get_experiment(chosen).name)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_two_studies_of_one_name_starting_at_once_share_its_experiment(stack, monkeypatch):
    """The other study creates the experiment between this one's lookup and its create: this one adopts it
    (the server's RESOURCE_ALREADY_EXISTS is not an error here). The lookup is made to miss once, the way
    it does in that race; the server and both creates are real."""
    client = MlflowClient(stack.mlflow_uri)
    name = f"entcal/race-{uuid.uuid4().hex[:8]}"
    theirs = client.create_experiment(name)
    lookup = MlflowClient.get_experiment_by_name
    missed = []

    def miss_once(self, experiment_name):
        if not missed:
            missed.append(experiment_name)
            return None  # what this study read before the other created it
        return lookup(self, experiment_name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", miss_once)
    assert _tracker(stack, name).experiment_id == theirs and missed == [name]


def test_runs_carry_the_standard_tags_and_a_description(stack):
    tracker = _tracker(stack, source="flows/study.py:study")
    parent = tracker.start("p", description="EntCE of nothing")
    child = tracker.start("c", parent_id=parent, tags={"entcal.stage": "child"})
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    client = MlflowClient(stack.mlflow_uri)
    for run_id in (parent, child):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.name"] == "flows/study.py:study" and tags["mlflow.source.type"] == "JOB"
        assert tags["mlflow.source.git.commit"] == (head or "unknown")
    assert client.get_run(parent).data.tags["mlflow.note.content"] == "EntCE of nothing"
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_system_metrics_are_sampled_until_the_run_finishes(stack):
    from entcal.storage.tracking import _MONITORS

    tracker = _tracker(stack)
    run_id = tracker.start("busy")
    tracker.start_system_metrics(run_id, interval_s=0.5)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # some CPU work to sample
        sum(i * i for i in range(20000))
    tracker.end(run_id)
    assert run_id not in _MONITORS
    client = MlflowClient(stack.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    n = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert n >= 1
    time.sleep(1.2)  # stopped: no samples after the run ended
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) == n


def test_prompts_are_a_dataset_input_whose_source_is_their_s3_copy(stack):
    import io

    from entcal.storage import s3

    prompts = pl.DataFrame({"example_id": ["e0", "e1"], "dataset": ["d", "d"], "prompt_ids": [[1, 2], [3]],
                            "reference_ids": [[4], [5, 6]]})
    prompts = prompts.with_columns(pl.lit(uuid.uuid4().hex).alias("dataset"))  # new content: a new object
    digest = frame_digest(prompts)[:16]
    buf = io.BytesIO()
    prompts.write_parquet(buf)
    uri = s3.put_content(stack, "prompts", buf.getvalue(), ".parquet")
    assert uri.startswith(f"s3://{stack.bucket}/prompts/") and uri.endswith(".parquet")
    assert s3.put_content(stack, "prompts", buf.getvalue(), ".parquet") == uri  # named by content
    key = uri.removeprefix(f"s3://{stack.bucket}/")
    assert pl.read_parquet(io.BytesIO(s3.get_bytes(stack, key))).equals(prompts)
    tracker = _tracker(stack)
    run_id = tracker.start("lineage")
    tracker.log_input_table(run_id, prompts, "prompts:d", digest, source=uri)
    (inp,) = MlflowClient(stack.mlflow_uri).get_run(run_id).inputs.dataset_inputs
    assert inp.dataset.name == "prompts:d" and inp.dataset.digest == digest
    assert inp.dataset.source_type == "s3" and json.loads(inp.dataset.source) == {"uri": uri}
    assert json.loads(inp.dataset.profile)["num_rows"] == 2
    assert {c["name"] for c in json.loads(inp.dataset.schema)["mlflow_colspec"]} == set(prompts.columns)


def test_table_view_is_shown_once_even_when_a_publish_is_retried(stack, tmp_path):
    tracker = _tracker(stack)
    run_id = tracker.start("table")
    df = pl.DataFrame({"example_id": ["a", "b", "c"], "entce": [0.1, -0.2, 0.3]})
    tracker.log_table_view(run_id, df, "tables/examples.json")
    tracker.log_table_view(run_id, df, "tables/examples.json")  # a retry: MLflow alone would append
    client = MlflowClient(stack.mlflow_uri)
    doc = json.loads(Path(client.download_artifacts(run_id, "tables/examples.json", str(tmp_path))).read_text())
    assert doc["columns"] == ["example_id", "entce"] and len(doc["data"]) == 3
    logged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "tables/examples.json", "type": "table"} in logged


def test_child_figure_is_a_png_artifact(stack, tmp_path):
    curves = pl.DataFrame({"step": [0, 1, 2], "entropy_mean": [1.0, 1.5, 2.0], "logloss_mean": [2.0, 2.1, 2.2]})
    tracker = _tracker(stack)
    run_id = tracker.start("figure")
    figure = figures.error_accumulation_figure(curves, "t1 · d · m")
    tracker.log_figure(run_id, figure, "figures/error_accumulation.png")
    path = Path(MlflowClient(stack.mlflow_uri).download_artifacts(run_id, "figures/error_accumulation.png",
                                                                   str(tmp_path)))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_latest_run_finds_the_previous_study_launch(stack):
    tracker = _tracker(stack)
    first = tracker.start("s-1", tags={"entcal.stage": "study"})
    tracker.start("c", parent_id=first, tags={"entcal.stage": "child"})
    time.sleep(0.05)
    second = tracker.start("s-2", tags={"entcal.stage": "study"})
    query = "tags.`entcal.stage` = 'study'"
    assert tracker.latest_run(query).info.run_id == second
    assert tracker.latest_run(query, exclude=second).info.run_id == first


def test_experiment_url_loads_a_shared_view_state_of_the_headline_metric_columns(stack):
    from entcal.storage.tracking import HEADLINE_COLUMNS, IDENTITY_TAGS

    tracker = _tracker(stack)
    tracker.set_view_state()
    url = tracker.experiment_url()
    assert url == (f"{tracker.uri}/#/experiments/{tracker.experiment_id}/runs"
                   "?workflowType=machine_learning&viewStateShareKey=entcal")
    key = re.search(r"viewStateShareKey=(\w+)", url).group(1)
    tag = MlflowClient(stack.mlflow_uri).get_experiment(tracker.experiment_id).tags[f"mlflow.sharedViewState.{key}"]
    state = json.loads(tag)
    metrics = [f"metrics.`{m}`" for m in HEADLINE_COLUMNS]
    assert state["selectedColumns"] == (metrics[:3] + [f"tags.`{t}`" for t in IDENTITY_TAGS] + metrics[3:] +
                                        ["attributes.`Dataset`"])
    # grouped by stage, the children's group open: each child run's values in sight, not under its parent
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "entcal.stage"}]
    assert state["groupsExpanded"] == {"tag.entcal.stage.child": True}
    assert state["columnOrder"] == state["selectedColumns"][:-1] == list(state["columnWidths"])  # widths need an order
    assert min(state["columnWidths"].values()) >= 120
    assert (state["orderByKey"], state["orderByAsc"]) == ("attributes.start_time", False)
    run_id = tracker.start("r")
    assert tracker.run_url(run_id) == f"{url.split('/runs?')[0]}/runs/{run_id}?workflowType=machine_learning"
    assert tracker.run_url(run_id, "/artifacts/report/report.html").endswith(
        f"/runs/{run_id}/artifacts/report/report.html?workflowType=machine_learning")


def test_the_installed_mlflow_ui_reads_the_view_state_and_column_ids_tracking_writes():
    """The names storage.tracking relies on, in the JS bundle of the installed MLflow: an MLflow upgrade
    that renames them fails here, not silently in a user's browser."""
    import mlflow

    js = "".join(p.read_text(errors="replace")
                 for p in (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("*.js"))
    assert '"viewStateShareKey"' in js and '"mlflow.sharedViewState."' in js
    assert 'e+".`"+t+"`"' in js  # makeCanonicalSortKey: metrics.`entce`
    assert 'ATTRIBUTES:"attributes"' in js and 'DATASET:"Dataset"' in js and 'DATE:"attributes.start_time"' in js
    assert '"selectedColumns","columnOrder","columnWidths"' in js  # uiState keys a shared state may set
    assert '"groupBy","groupsExpanded"' in js and 'groupByKeys' in js and '`${t}.${e}.${n||null}`' in js
    assert 'MACHINE_LEARNING="machine_learning"' in js and '"workflowType"' in js
