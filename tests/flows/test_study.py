"""The whole study flow on a tiny model, against a real S3 server, MLflow server and Prefect harness."""
import json

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from storage import s3
from tasks.config import StudyConfig


@pytest.fixture(scope="module")
def config(tiny_spec):
    return StudyConfig.model_validate({
        "name": "flowtest", "models": [tiny_spec.model_dump()], "datasets": [{"name": "python-docs"}],
        "decodings": [{"temperature": 1.0}, {"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.9}],
        "num_examples": 4, "prompt_tokens": 8, "max_new_tokens": 12, "min_reference_tokens": 12, "horizon": 12,
        "batch_size": 4, "bootstrap": 50,
    })


@pytest.fixture(scope="module")
def first_run(config, stack, prefect_harness, tmp_path_factory):
    from flows.study import study

    out = tmp_path_factory.mktemp("out")
    return study(config, out=str(out)), out


def test_runs_metrics_and_artifacts_land_in_mlflow_and_s3(first_run, config, stack):
    result, out = first_run
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["horizon"] == "12"
    assert parent.data.tags["device"].startswith(("cpu", "NVIDIA"))
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(
        f"tiny__python-docs__{k}" for k in ("t1", "t0.7", "t1-p0.9"))
    for c in children:
        m = c.data.metrics
        assert {"entce", "entropy_mean", "logloss_mean", "entce_ci_low", "entce_ci_high"} <= set(m)
        assert m["entce"] == pytest.approx(m["entropy_mean"] - m["logloss_mean"], abs=1e-9)
        assert len(client.get_metric_history(c.info.run_id, "step_entropy")) == 12
        files = {f.path for f in client.list_artifacts(c.info.run_id, "tables")}
        assert files == {"tables/prompts.parquet", "tables/generations.parquet", "tables/reference.parquet"}
    # the artifacts are objects in the bucket, not files on the MLflow server's disk
    keys = s3.list_keys(stack, "mlflow/")
    ours = {c.info.run_id for c in children}
    assert sum(k.endswith("tables/generations.parquet") and any(r in k for r in ours) for k in keys) == 3
    assert any(k.endswith("report/error_accumulation.png") for k in keys)
    assert any(k.endswith("summary.json") for k in keys)
    # cached task results live in the bucket too, so other machines reuse them
    assert len(s3.list_keys(stack, "prefect-results/")) >= 1 + 3 + 1


def test_out_dir_holds_tables_and_summary(first_run):
    result, out = first_run
    child = out / "tiny__python-docs__t1-p0.9"
    summary = json.loads((child / "summary.json").read_text())
    assert summary["decoding"] == {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "top_nsigma": 0.0,
                                   "key": "t1-p0.9"}
    assert summary["horizon"] == 12 and summary["model"] == "tiny" and summary["dataset"] == "python-docs"
    assert summary["entce"] == pytest.approx(summary["entropy"] - summary["logloss"])
    gens = pl.read_parquet(child / "generations.parquet")
    assert gens.height == 4 and set(gens["decoding"]) == {"t1-p0.9"}
    assert (out / "report.md").read_text().count("| tiny | python-docs |") == 3
    assert not list(out.glob("*.partial"))


def test_rerun_hits_the_cache_and_runs_no_generation(first_run, config, tmp_path):
    from flows.study import study

    result, _ = first_run
    again = study(config, out=str(tmp_path))
    assert not any(s.startswith(("generate", "score", "prepare")) for s in again["ran"])
    assert len(again["cached"]) == 1 + 1 + 3 + 1  # corpus-alpha, prepare, 3 generations, score
    assert [r["entce"] for r in again["rows"]] == [r["entce"] for r in result["rows"]]
    # a changed knob is a different cache key: generation runs again
    changed = study(config.model_copy(update={"seed": 1}), out=None)
    assert sum(s.startswith("generate") for s in changed["ran"]) == 3


def test_prefect_artifacts_summarise_the_run(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.stages import artifact_key

    result, _ = first_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("flowtest")])),
                                     limit=20)
        progress = [a for a in client.read_artifacts(limit=50) if a.type == "progress"]
    (art,) = [a for a in arts if result["run_id"] in a.data]
    assert "| tiny | python-docs | t1 |" in art.data
    assert progress and max(float(a.data) for a in progress) == 100.0


def test_calibration_study_writes_calibration_json(tiny_spec, stack, prefect_harness, tmp_path):
    from flows.study import study

    cfg = StudyConfig.model_validate({
        "name": "caltest", "models": [tiny_spec.model_dump()], "datasets": [{"name": "python-docs"}],
        "decodings": [{"temperature": 1.0}], "num_examples": 4, "prompt_tokens": 8, "max_new_tokens": 10,
        "min_reference_tokens": 10, "horizon": 10, "batch_size": 4, "bootstrap": 30,
        "calibration": {"tau_bracket": [0.3, 3.0], "tau_rounds": 3, "top_k": [3, 30], "top_p": [0.5, 0.9], "min_p": [],
                        "top_nsigma": [], "candidates": 4},
    })
    result = study(cfg, out=str(tmp_path))
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert {"tau_star", "tau_star_ci", "truncation", "lookahead", "future_entropy"} <= set(doc)
    for name in ("lookahead", "future_entropy"):
        assert set(doc[name]) == {"alpha", "entce_before", "entce_after", "logloss_before", "logloss_after"}
    methods = {r["method"] for r in doc["sweep"]}
    assert {"temperature", "top_k", "top_p"} <= methods
    assert (tmp_path / "pareto__tiny__python-docs.png").stat().st_size > 1000
    assert "## Calibration: tiny__python-docs" in (tmp_path / "report.md").read_text()
    client = MlflowClient(stack.mlflow_uri)
    children = client.search_runs([client.get_run(result["run_id"]).info.experiment_id],
                                  filter_string="tags.`entcal.stage` = 'calibration'")
    assert len(children) == 1 and "lookahead_alpha" in children[0].data.metrics
