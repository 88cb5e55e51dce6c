"""The whole study flow on a tiny model, against a real S3 server, MLflow server and Prefect harness."""
import io
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from entcal.storage import s3
from entcal.tasks.config import StudyConfig
from tests.conftest import s3_keys


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
    from entcal.flows.study import study

    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:  # MLflow's own override of the 5 s default: samples on a short run
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        return study(config, out=str(out)), out


def _children(client, parent_id: str, experiment_id: str, stage: str = "child") -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' "
                                                             f"and tags.`entcal.stage` = '{stage}'")


def _prefect_task_runs(flow_run_id: str) -> list:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
                                     limit=200)


def test_runs_metrics_and_artifacts_land_in_mlflow_and_s3(first_run, config, stack):
    result, out = first_run
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["horizon"] == "12"
    assert parent.data.tags["device"].startswith(("cpu", "NVIDIA"))
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # run names put the difference first; the entcal.child tag is the --out directory's name
    assert sorted(c.info.run_name for c in children) == sorted(
        f"{k} · python-docs · tiny" for k in ("t1", "t0.7", "t1-p0.9"))
    assert sorted(c.data.tags["entcal.child"] for c in children) == sorted(
        f"tiny__python-docs__{k}" for k in ("t1", "t0.7", "t1-p0.9"))
    for c in children:
        m = c.data.metrics
        assert {"entce", "entropy_mean", "logloss_mean", "entce_ci_low", "entce_ci_high"} <= set(m)
        assert m["entce"] == pytest.approx(m["entropy_mean"] - m["logloss_mean"], abs=1e-9)
        assert len(client.get_metric_history(c.info.run_id, "step_entropy")) == 12
        files = {f.path for f in client.list_artifacts(c.info.run_id, "tables")}
        assert files == {"tables/prompts.parquet", "tables/generations.parquet", "tables/reference.parquet",
                         "tables/examples.json"}
    # the artifacts are objects in the bucket, not files on the MLflow server's disk
    keys = s3_keys(stack, "mlflow/")
    ours = {c.info.run_id for c in children}
    assert sum(k.endswith("tables/generations.parquet") and any(r in k for r in ours) for k in keys) == 3
    assert any(k.endswith("report/error_accumulation.png") for k in keys)
    assert any(k.endswith("summary.json") for k in keys)
    # cached task results live in the bucket too, so other machines reuse them
    assert len(s3_keys(stack, "prefect-results/")) >= 1 + 3 + 1


def test_out_dir_holds_tables_and_summary(first_run):
    result, out = first_run
    child = out / "tiny__python-docs__t1-p0.9"
    summary = json.loads((child / "summary.json").read_text())
    assert summary["decoding"] == {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "top_nsigma": 0.0,
                                   "typical_p": 1.0, "eta_cutoff": 0.0, "epsilon_cutoff": 0.0, "key": "t1-p0.9"}
    assert summary["horizon"] == 12 and summary["model"] == "tiny" and summary["dataset"] == "python-docs"
    assert summary["entce"] == pytest.approx(summary["entropy"] - summary["logloss"])
    gens = pl.read_parquet(child / "generations.parquet")
    assert gens.height == 4 and set(gens["decoding"]) == {"t1-p0.9"}
    assert (out / "report.md").read_text().count("| tiny | python-docs |") == 3
    assert not list(out.glob("*.partial"))


def test_rerun_hits_the_cache_and_runs_no_generation(first_run, config, stack, tmp_path):
    from entcal.flows.study import study

    result, _ = first_run
    again = study(config, out=str(tmp_path))
    assert not any(s.startswith(("generate", "score", "prepare")) for s in again["ran"])
    assert len(again["cached"]) == 1 + 1 + 3 + 1  # corpus-alpha, prepare, 3 generations, score
    assert [r["entce"] for r in again["rows"]] == [r["entce"] for r in result["rows"]]
    # a changed knob is a different cache key: generation runs again
    changed = study(config.model_copy(update={"seed": 1}), out=None)
    assert sum(s.startswith("generate") for s in changed["ran"]) == 3
    # the launches tell each other apart in MLflow: names, and notes that say what changed
    client = MlflowClient(stack.mlflow_uri)
    runs = [client.get_run(r["run_id"]) for r in (result, again, changed)]
    assert len({r.info.run_name for r in runs}) == 3 and all(r.info.run_name.startswith("flowtest-") for r in runs)
    notes = [r.data.tags["mlflow.note.content"] for r in runs]
    assert "same settings: a re-run" in notes[1]
    assert f"changed since the previous launch {runs[1].info.run_name}: seed 0 → 1" in notes[2]
    assert runs[2].data.tags["entcal.config_digest"] == config.model_copy(update={"seed": 1}).digest() != \
        runs[0].data.tags["entcal.config_digest"]


def test_prefect_artifacts_summarise_the_run(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from entcal.flows.publish import artifact_key

    result, _ = first_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("flowtest")])),
                                     limit=20)
        progress = [a for a in client.read_artifacts(limit=50) if a.type == "progress"]
    (art,) = [a for a in arts if result["run_id"] in a.data]
    assert "| tiny | python-docs | t1 |" in art.data
    assert progress and max(float(a.data) for a in progress) == 100.0


def test_calibration_study_writes_calibration_json(tiny_spec, stack, prefect_harness, tmp_path):
    from entcal.flows import calibration
    from entcal.flows.study import study

    cfg = StudyConfig.model_validate({
        "name": "caltest", "models": [tiny_spec.model_dump()], "datasets": [{"name": "python-docs"}],
        "decodings": [{"temperature": 1.0}], "num_examples": 4, "prompt_tokens": 8, "max_new_tokens": 10,
        "min_reference_tokens": 10, "horizon": 10, "batch_size": 4, "bootstrap": 30,
        "calibration": {"tau_bracket": [0.3, 3.0], "tau_rounds": 3, "top_k": [3, 30], "top_p": [0.5, 0.9], "min_p": [],
                        "top_nsigma": [], "typical_p": [], "eta_cutoff": [], "epsilon_cutoff": [], "candidates": 4,
                        "regressor_samples": 1, "zero_rounds": 2},
    })
    result = study(cfg, out=str(tmp_path))
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert {"tau_star", "tau_star_ci", "truncation", "lookahead", "future_entropy", "tau_schedule", "entropy_feedback",
            "splits"} <= set(doc)
    t1 = next(r for r in doc["sweep"] if r["decoding"] == "t1")
    for name in ("lookahead", "future_entropy", "tau_schedule", "entropy_feedback"):
        entry = doc[name]
        assert {"alpha", "delta_entce", "delta_entce_ci", "delta_logloss_ci", "alpha_zero_entce",
                "zero_entce_converged"} <= set(entry)
        # "before" is the cached τ = 1 stage on the evaluation split, not a second sampling of it
        assert (entry["entce_before"], entry["logloss_before"]) == (t1["entce"], t1["logloss"])
        lo, hi = entry["delta_entce_ci"]
        assert lo <= entry["delta_entce"] <= hi
        # the zero search's α = 0 end is τ = 1 itself: read from its tables, not generated again
        ident = [r for r in doc["sweep"] if r["method"] == name and r["param"] == 0.0]
        assert name not in calibration.IDENTITY or ident and all(r["decoding"] == "t1" and r["delta_entce"] == 0.0
                                                                  for r in ident)
    methods = {r["method"] for r in doc["sweep"]}
    assert {"temperature", "top_k", "top_p"} <= methods
    assert (tmp_path / "pareto__tiny__python-docs.png").stat().st_size > 1000
    assert "## Calibration: tiny__python-docs" in (tmp_path / "report.md").read_text()
    client = MlflowClient(stack.mlflow_uri)
    children = client.search_runs([client.get_run(result["run_id"]).info.experiment_id],
                                  filter_string="tags.`entcal.stage` = 'calibration'")
    assert len(children) == 1 and {"lookahead_alpha", "future_entropy_delta_entce_ci_low"} <= set(children[0].data.metrics)


# ------------------------------------------------------------------ what the MLflow UI shows
def test_experiment_opens_on_runs_and_the_parent_says_what_it_measured(first_run, config, stack, tmp_path):
    result, _ = first_run
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == "entcal/flowtest" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = parent.data.tags
    assert parent.info.run_name.startswith("flowtest-") and tags["entcal.config_digest"] == config.digest()
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"} <= set(tags)
    note = tags["mlflow.note.content"]
    assert config.digest() in note and "decodings: t1, t0.7, t1-p0.9" in note and "horizon T = 12" in note
    assert "| t0.7 | python-docs | tiny |" in note  # the results, rounded for reading
    # scalar params only; the config itself is an artifact
    params = parent.data.params
    assert params["decodings"] == "t1,t0.7,t1-p0.9" and params["models"] == "tiny" and params["horizon"] == "12"
    assert not [k for k, v in params.items() if v.startswith(("[", "{"))]
    cfg = json.loads(Path(client.download_artifacts(parent.info.run_id, "config.json", str(tmp_path))).read_text())
    assert config.model_validate(cfg).digest() == config.digest()
    assert any(f.path == "config.yaml" for f in client.list_artifacts(parent.info.run_id))
    # headline metrics: each child's EntCE, unrounded
    for row in result["rows"]:
        assert parent.data.metrics[f"entce_python-docs_{row['decoding']}"] == row["entce"]
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "tables/summary.json",
                                                        str(tmp_path))).read_text())
    assert len(summary["data"]) == 3 and "entce" in summary["columns"]


def test_child_runs_describe_themselves_and_show_tables_figures_and_lineage(first_run, config, stack, tmp_path):
    result, out = first_run
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    prompts = pl.read_parquet(out / "tiny__python-docs__t1" / "prompts.parquet")
    for child in _children(client, parent.info.run_id, parent.info.experiment_id):
        key = child.data.params["decoding"]
        tags, m = child.data.tags, child.data.metrics
        assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"} <= set(tags)
        what = f"EntCE = H̄ − L̄ of tiny on python-docs at {key} over T = 12"
        assert tags["mlflow.note.content"].startswith(what)
        assert f"= {m['entce']:+.3f} nats/token" in tags["mlflow.note.content"]
        # the per-example table MLflow shows: H̄ − L̄ per example, and the text's first characters
        doc = json.loads(Path(client.download_artifacts(child.info.run_id, "tables/examples.json",
                                                        str(tmp_path / key))).read_text())
        ex = pl.DataFrame(doc["data"], schema=doc["columns"], orient="row")
        assert ex.height == 4 and set(ex["example_id"]) == set(prompts["example_id"])
        assert (ex["entce"] - (ex["entropy_mean"] - ex["logloss_mean"])).abs().max() < 1e-9
        assert ex["text"].str.len_chars().max() > 0
        png = client.download_artifacts(child.info.run_id, "figures/error_accumulation.png", str(tmp_path / key))
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
        # lineage: the prompts table is the run's input, its source the S3 copy
        (inp,) = child.inputs.dataset_inputs
        uri = json.loads(inp.dataset.source)["uri"]
        assert inp.dataset.source_type == "s3" and uri.startswith(f"s3://{stack.bucket}/prompts/")
        stored = pl.read_parquet(io.BytesIO(s3.get_bytes(stack, uri.split("/", 3)[3])))
        assert stored.equals(prompts)
        # system metrics sampled while generation ran
        assert "system/cpu_utilization_percentage" in m, sorted(m)


def test_child_runs_span_their_generation_and_scoring(first_run, stack):
    result, _ = first_run
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    task_runs = _prefect_task_runs(parent.data.tags["prefect.flow_run_id"])
    work = [t for t in task_runs if t.name.startswith(("generate", "score"))]
    assert len(work) >= 4, [t.name for t in task_runs]  # 3 generations + 1 scoring
    began = min(t.start_time for t in work).timestamp() * 1000
    ended = max(t.end_time for t in work).timestamp() * 1000
    for child in _children(client, parent.info.run_id, parent.info.experiment_id):
        assert child.info.status == "FINISHED"
        assert child.info.start_time <= began and child.info.end_time >= ended, child.info.run_name


def test_mlflow_and_prefect_link_to_each_other(first_run, stack):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL

    result, _ = first_run
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(result["run_id"])
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    ui = PREFECT_API_URL.value().rstrip("/").removesuffix("/api")
    for run in [parent, *_children(client, parent.info.run_id, parent.info.experiment_id)]:
        assert run.data.tags["prefect.flow_run_id"] == flow_run_id
        assert run.data.tags["prefect.flow_run_url"] == f"{ui}/runs/flow-run/{flow_run_id}"
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(UUID(flow_run_id))
        links = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mlflow-flowtest"])),
                                       limit=50)
    assert flow_run.name == parent.info.run_name  # one name in both UIs
    assert [a for a in links if a.flow_run_id == flow_run.id and result["run_url"] in a.data]


def test_a_failed_generation_ends_its_child_runs_failed(tiny_model_dir, stack, prefect_harness, tmp_path):
    """A model whose weights are NaN passes the preflight (config and tokenizer are fine) and fails at
    its first generation step: the child runs, started before generation, end FAILED, none RUNNING."""
    import torch
    from transformers import LlamaForCausalLM

    from entcal.flows.study import study
    from entcal.tasks.generate import NonFiniteLogits

    broken = tmp_path / "nan-llama"
    shutil.copytree(tiny_model_dir, broken)
    model = LlamaForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(broken)
    cfg = StudyConfig.model_validate({
        "name": "nantest", "models": [{"path": str(broken), "name": "nan"}], "datasets": [{"name": "python-docs"}],
        "decodings": [{"temperature": 1.0}, {"temperature": 0.7}], "num_examples": 2, "prompt_tokens": 8,
        "max_new_tokens": 8, "min_reference_tokens": 8, "horizon": 8, "bootstrap": 20})
    with pytest.raises(NonFiniteLogits):
        study(cfg, out=str(tmp_path / "out"))
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("entcal/nantest")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("entcal.stage") == "child"]
    assert sorted(r.info.run_name for r in children) == ["t0.7 · python-docs · nan", "t1 · python-docs · nan"]
    assert {r.info.status for r in runs} == {"FAILED"} and all(r.info.end_time for r in runs)
