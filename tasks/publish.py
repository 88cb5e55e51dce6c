"""Put a study's results where people look: MLflow runs (artifacts in S3) and a local directory.

Local writes are atomic: a child's tables go to ``<name>.partial/`` and are renamed into place
only when complete, so a crashed run never leaves a directory that looks finished.

Names: ``child_name`` (``<model>__<dataset>__<decoding>``) is the ``--out`` directory of a child
and its ``entcal.child`` tag; ``display_name`` (``t1 · python-docs · smollm2-135m``) is its MLflow
run name, the decoding first because that is where the runs of one study differ and the runs
table cuts long names. Descriptions (the runs' notes) say what was measured and, once known, the
result rounded for reading; the metrics themselves are never rounded.
"""
from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

import polars as pl
import torch

from entcal.storage import s3
from entcal.storage.settings import Settings
from entcal.storage.tracking import Tracker, git_commit
from entcal.tasks import figures
from entcal.tasks.config import DatasetSpec, DecodingSpec, ModelSpec, StudyConfig
from entcal.tasks.contracts import Summary
from entcal.tasks.metrics import per_example

PACKAGES = ("torch", "transformers", "prefect", "mlflow", "polars", "triton")
LIST_FIELDS = {"models": "label", "datasets": "label", "decodings": "key"}
log = logging.getLogger(__name__)
TEXT_CHARS = 80  # characters of each example's first generation in the per-example table


def child_name(model: ModelSpec, dataset: DatasetSpec, decoding: DecodingSpec) -> str:
    """The child's ``--out`` directory name (a contract: tests and README rely on it)."""
    return f"{model.label}__{dataset.label}__{decoding.key}"


def display_name(model: ModelSpec, dataset: DatasetSpec, decoding: DecodingSpec) -> str:
    """The child's MLflow run name, distinguishing part first: ``t1 · python-docs · tiny``."""
    return f"{decoding.key} · {dataset.label} · {model.label}"


def provenance() -> dict[str, str]:
    """Tags: git commit, package versions, device."""
    tags = {"git_commit": git_commit(), "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"}
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def flat_params(cfg: StudyConfig) -> dict[str, str]:
    """Study-level params, all scalar: the knobs, the lists as comma-joined labels / decoding keys, and
    calibration on/off (the whole config is the run's config.json / config.yaml artifact)."""
    d = cfg.model_dump(mode="json")
    out = {k: v for k, v in d.items() if not isinstance(v, (list, dict)) and k != "calibration"}
    for field, attr in LIST_FIELDS.items():
        out[field] = ",".join(getattr(item, attr) for item in getattr(cfg, field))
    out["calibration"] = "on" if cfg.calibration else "off"
    return out


def changed_settings(before: dict, after: dict) -> list[str]:
    """``key old → new`` for every param that differs between two launches (missing = ``—``)."""
    return [f"{k} {before.get(k, '—')} → {after.get(k, '—')}" for k in sorted(set(before) | set(after))
            if str(before.get(k)) != str(after.get(k))]


def study_description(cfg: StudyConfig, *, previous=None) -> str:
    """The parent run's note (markdown): config digest, the settings, and what changed since ``previous``
    (the experiment's newest earlier study run, an ``mlflow.entities.Run``, or None)."""
    p = flat_params(cfg)
    lines = [f"Study **{cfg.name}**, config `{cfg.digest()}`: EntCE = H̄ − L̄ (nats/token) of every model × "
             "dataset × decoding.",
             f"- models: {p['models']} · datasets: {p['datasets']} · decodings: {p['decodings'].replace(',', ', ')}",
             f"- num_examples {cfg.num_examples} · max_new_tokens {cfg.max_new_tokens} · "
             f"horizon T = {cfg.horizon} · samples_per_prompt {cfg.samples_per_prompt} · seed {cfg.seed} · "
             f"calibration {p['calibration']}"]
    if previous is not None:
        changes = changed_settings(previous.data.params, p)
        what = "; ".join(changes) if changes else "nothing (same settings: a re-run)"
        lines.append(f"- changed since the previous launch {previous.info.run_name}: {what}")
    return "\n".join(lines)


def child_description(cfg: StudyConfig, model: ModelSpec, dataset: DatasetSpec, decoding: DecodingSpec) -> str:
    """What the child run measures, written when it starts."""
    return (f"EntCE = H̄ − L̄ of {model.label} on {dataset.label} at {decoding.key} over T = {cfg.horizon} steps, "
            f"{cfg.num_examples} prompts × {cfg.samples_per_prompt} sample(s); study {cfg.name} "
            f"(config `{cfg.digest()}`); `--out` directory {child_name(model, dataset, decoding)}")


def result_sentence(summary: dict) -> str:
    """The result for reading (rounded here only): ``EntCE = 2.1 − 3.4 = −1.3 nats/token (95% CI …)``."""
    return (f"Result: EntCE = {summary['entropy']:.3f} − {summary['logloss']:.3f} = {summary['entce']:+.3f} "
            f"nats/token ({summary.get('ci_level', 0.95):.0%} CI [{summary['entce_ci_low']:+.3f}, "
            f"{summary['entce_ci_high']:+.3f}]) over {summary['n_examples']} examples")


def headline_metrics(rows: list[dict], *, several_models: bool) -> dict[str, float]:
    """The parent's metrics: ``entce_<dataset>_<decoding>`` (``entce_<model>_<dataset>_<decoding>``
    when the study has several models), the children's EntCE unrounded."""
    return {"entce_" + "_".join([r["model"]] * several_models + [r["dataset"], r["decoding"]]): r["entce"]
            for r in rows}


def results_markdown(rows: list[dict]) -> str:
    """The study's results for the parent's note, rounded for reading (the metrics are not)."""
    lines = ["| decoding | dataset | model | EntCE (nats/token) | CI |", "|---|---|---|---|---|"]
    lines += [f"| {r['decoding']} | {r['dataset']} | {r['model']} | {r['entce']:+.3f} | "
              f"[{r['entce_ci_low']:+.3f}, {r['entce_ci_high']:+.3f}] |" for r in rows]
    return "\n".join(lines)


def experiment_description(name: str) -> str:
    return (f"entcal study {name}: one parent run per launch (named {name}-<UTC time>, its note gives the config "
            "digest and what changed since the previous launch), one child run per model × dataset × decoding "
            "(named <decoding> · <dataset> · <model>)")


def config_files(cfg: StudyConfig) -> dict[str, dict]:
    """{artifact file: content} of the config, as JSON and YAML (MlflowClient.log_dict picks by suffix)."""
    d = cfg.model_dump(mode="json")
    return {"config.json": d, "config.yaml": d}


def upload_prompts(settings: Settings, prompts: pl.DataFrame, digest: str) -> str | None:
    """The prompts table as ``s3://<bucket>/prompts/<digest>.parquet`` (its lineage source in MLflow),
    or None without an S3 endpoint. Content-addressed, so writing it again changes nothing."""
    if not settings.s3_endpoint:
        return None
    buf = io.BytesIO()
    prompts.write_parquet(buf)
    key = f"prompts/{digest}.parquet"
    s3.put_bytes(settings, key, buf.getvalue())
    return f"s3://{settings.bucket}/{key}"


def example_table(generations: pl.DataFrame, reference: pl.DataFrame, *, horizon: int) -> pl.DataFrame:
    """One row per example: entropy_mean (H̄ of its samples), logloss_mean (L̄ of its reference),
    entce, tokens pooled (nats/token, first ``horizon`` steps), the first sample's finish_reason and,
    when the generations carry decoded text (their ``text`` column), its first ``TEXT_CHARS`` characters."""
    h = per_example(generations, "step_entropy", horizon)
    l = per_example(reference, "step_logloss", horizon)
    first = generations.group_by("example_id", maintain_order=True).first()
    out = (h.join(l, on="example_id", how="left", suffix="_l")
           .join(first.select("example_id", "finish_reason", "text"), on="example_id", how="left")
           .select("example_id", (pl.col("sum") / pl.col("n")).alias("entropy_mean"),
                   (pl.col("sum_l") / pl.col("n_l")).alias("logloss_mean"),
                   pl.col("n").alias("generated_tokens"), pl.col("n_l").alias("reference_tokens"),
                   "finish_reason", pl.col("text").str.slice(0, TEXT_CHARS))
           .with_columns((pl.col("entropy_mean") - pl.col("logloss_mean")).alias("entce")))
    cols = ["example_id", "entropy_mean", "logloss_mean", "entce", "generated_tokens", "reference_tokens",
            "finish_reason"]
    return out.select(cols + (["text"] if out["text"].null_count() < out.height else []))


def agreement_metrics(agreement: dict | None) -> dict[str, float]:
    """engine: vllm: vLLM's sampled-token log-probs against entcal's re-score, as child-run metrics."""
    if not agreement:
        return {}
    return {"engine/logprob_abs_diff_mean": agreement["logprob_abs_diff_mean"],
            "engine/logprob_abs_diff_max": agreement["logprob_abs_diff_max"],
            "engine/support_mismatches": agreement["support_mismatches"]}


def summary_json(summary: Summary, cfg: StudyConfig, model: ModelSpec, dataset: DatasetSpec,
                 decoding: DecodingSpec, model_params: int | None, agreement: dict | None = None) -> dict:
    """summary.json (docs/DESIGN.md): the metrics, the decoding, model and dataset names, T, provenance;
    the engine that sampled, and for engine: vllm its agreement with the re-score."""
    return {
        "engine": {"name": model.engine, **({"agreement": agreement} if agreement else {})},
        **summary.as_dict(),
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
              curves: pl.DataFrame, tables: dict[str, pl.DataFrame], prompts_digest: str,
              run_id: str | None = None, prompts_uri: str | None = None, examples: pl.DataFrame | None = None,
              description: str | None = None) -> str:
    """One child MLflow run: params, stable metric names, per-step curves, the prompts as a dataset
    input, tables (parquet, plus ``examples`` as a table MLflow shows), its figure, summary.json; then
    the result appended to its note and the run finished.

    ``run_id``: a run the caller started (spanning generation and scoring) and ends FAILED if this
    raises; without it a run named ``name`` is started here and ended FAILED here on failure."""
    own = run_id is None
    if own:
        run_id = tracker.start(name, parent_id=parent_id, tags={"entcal.stage": "child"}, description=description)
    try:
        tracker.log_params(run_id, params)
        tracker.log_metrics(run_id, {
            "entce": summary["entce"], "entropy_mean": summary["entropy"], "logloss_mean": summary["logloss"],
            "entce_ci_low": summary["entce_ci_low"], "entce_ci_high": summary["entce_ci_high"],
            "diag/logloss_untruncated_mean": summary["logloss_untruncated"],
            "diag/truncated_share": summary["truncated_share"],
            "diag/sampled_surprisal_mean": summary["sampled_surprisal"],
            "diag/eos_share": summary["eos_share"], "diag/n_examples": summary["n_examples"],
            **agreement_metrics(summary.get("engine", {}).get("agreement")),
        })
        tracker.log_curves(run_id, {"step_entropy": curves["entropy_mean"].to_list(),
                                    "step_logloss": curves["logloss_mean"].to_list()})
        tracker.log_input_table(run_id, tables["prompts"], f"prompts:{params.get('dataset', '')}", prompts_digest,
                                source=prompts_uri)
        for table, df in tables.items():
            tracker.log_table(run_id, df, table)
        if examples is not None:
            tracker.log_table_view(run_id, examples, "tables/examples.json")
        tracker.log_figure(run_id, figures.error_accumulation_figure(curves, f"{name}: h_t vs l_t"),
                           "figures/error_accumulation.png")
        tracker.log_json(run_id, summary, "summary.json")
        tracker.set_tags(run_id, {"mlflow.note.content": "\n\n".join(filter(None, [description,
                                                                                   result_sentence(summary)]))})
    except BaseException as err:
        if own:
            tracker.finish_quietly(run_id, "FAILED" if isinstance(err, Exception) else "KILLED")
        raise
    tracker.finish(run_id)
    return run_id
