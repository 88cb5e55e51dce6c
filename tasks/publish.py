"""Put a study's results where people look: MLflow runs (artifacts in S3) and a local directory.

Local writes are atomic: a child's tables go to ``<name>.partial/`` and are renamed into place
only when complete, so a crashed run never leaves a directory that looks finished.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import polars as pl
import torch

from storage.tracking import Tracker
from tasks.config import DatasetSpec, DecodingSpec, ModelSpec, StudyConfig

PACKAGES = ("torch", "transformers", "prefect", "mlflow", "polars", "triton")


def child_name(model: ModelSpec, dataset: DatasetSpec, decoding: DecodingSpec) -> str:
    return f"{model.label}__{dataset.label}__{decoding.key}"


def provenance() -> dict[str, str]:
    """Tags: git commit, package versions, device."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    tags = {"git_commit": commit or "unknown", "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"}
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def flat_params(cfg: StudyConfig) -> dict[str, str]:
    """Study-level params: the scalar knobs plus the lists as compact JSON."""
    d = cfg.model_dump(mode="json")
    out = {k: v for k, v in d.items() if not isinstance(v, list)}
    for k in ("models", "datasets", "decodings"):
        out[k] = json.dumps(d[k], separators=(",", ":"))
    return out


def summary_json(summary: dict, cfg: StudyConfig, model: ModelSpec, dataset: DatasetSpec,
                 decoding: DecodingSpec, model_params: int | None) -> dict:
    """summary.json (DESIGN.md): the metrics, the decoding, model and dataset names, T, provenance."""
    return {
        **summary,
        "decoding": {"temperature": decoding.temperature, "top_k": decoding.top_k, "top_p": decoding.top_p,
                     "min_p": decoding.min_p, "top_nsigma": decoding.top_nsigma, "key": decoding.key},
        "model": model.label, "model_params": model_params, "dataset": dataset.label, "horizon": cfg.horizon,
        "study": cfg.name, "config_digest": cfg.digest(), "provenance": provenance(),
    }


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


def log_child(tracker: Tracker, parent_id: str, name: str, *, params: dict, summary: dict,
              curves: pl.DataFrame, tables: dict[str, pl.DataFrame], prompts_digest: str) -> str:
    """One child MLflow run: params, stable metric names, per-step curves, tables, summary.json."""
    run_id = tracker.start(name, parent_id=parent_id, tags={"entcal.stage": "child"})
    try:
        tracker.log_params(run_id, params)
        tracker.log_metrics(run_id, {
            "entce": summary["entce"], "entropy_mean": summary["entropy"], "logloss_mean": summary["logloss"],
            "entce_ci_low": summary["entce_ci_low"], "entce_ci_high": summary["entce_ci_high"],
            "logloss_untruncated_mean": summary["logloss_untruncated"],
            "truncated_share": summary["truncated_share"], "sampled_surprisal_mean": summary["sampled_surprisal"],
            "n_examples": summary["n_examples"], "eos_share": summary["eos_share"],
        })
        tracker.log_curves(run_id, {"step_entropy": curves["entropy_mean"].to_list(),
                                    "step_logloss": curves["logloss_mean"].to_list()})
        tracker.log_input_table(run_id, tables["prompts"], f"prompts:{params.get('dataset', '')}", prompts_digest)
        for table, df in tables.items():
            tracker.log_table(run_id, df, table)
        tracker.log_json(run_id, summary, "summary.json")
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    tracker.finish(run_id)
    return run_id
