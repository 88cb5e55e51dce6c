"""What entcal writes into the places people read: run names, descriptions (the runs' notes), params,
tags and summary.json. Plain functions of the config and the records; flows/publish.py puts them there.

Names: ``child_name`` (``<model>__<dataset>__<decoding>``) is the ``--out`` directory of a child
and its ``entcal.child`` tag; ``display_name`` (``t1 · python-docs · smollm2-135m``) is its MLflow
run name, the decoding first because that is where the runs of one study differ and the runs
table cuts long names. Descriptions say what was measured and, once known, the result rounded for
reading; the metrics themselves are never rounded.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from entcal.storage.tracking import git_commit
from entcal.tasks import datasets, models
from entcal.tasks.config import DatasetSpec, DecodingSpec, ModelSpec, StudyConfig
from entcal.tasks.contracts import EPS_COLUMNS, CalibrationResult, PairResult

PACKAGES = ("torch", "transformers", "prefect", "mlflow", "polars", "triton")
LIST_FIELDS = {"models": "label", "datasets": "label", "decodings": "key"}
SETTING_COLUMNS = ("logloss", "truncated_share", "logloss_untruncated", *EPS_COLUMNS)  # of each zeroing setting


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


def calibration_run(cfg: StudyConfig, model: ModelSpec, dataset: DatasetSpec) -> tuple[str, dict[str, str], str]:
    """The calibration child run of one (model, dataset): (its name, its tags, what it measures)."""
    spec = cfg.calibration
    what = ", ".join(["τ*"] + spec.sweeps + spec.methods)
    return (f"calibration · {dataset.label} · {model.label}",
            {"entcal.stage": "calibration", "entcal.child": f"calibration__{model.label}__{dataset.label}"},
            f"Calibration of {model.label} on {dataset.label}: {what}; fitted on {spec.fit_fraction:.0%} of the "
            f"prompts, compared with τ = 1 (paired) on the rest (study {cfg.name}, config `{cfg.digest()}`)")


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


SUPPORT_METRICS = ("support_differs_share", "support_larger_in_vllm", "support_smaller_in_vllm", "support_beyond_top_l",
                   "implied_abs_dH_mean", "implied_abs_dH_differing_mean", "logz_shift_tol_mean")


def agreement_metrics(agreement: dict | None) -> dict[str, float]:
    """engine: vllm: vLLM's sampled-token log-probs against entcal's re-score, and whether it sampled each
    step from entcal's support (tasks.vllm_support; absent from agreements recorded before it), as
    child-run metrics."""
    if not agreement:
        return {}
    return {"engine/logprob_abs_diff_mean": agreement["logprob_abs_diff_mean"],
            "engine/logprob_abs_diff_max": agreement["logprob_abs_diff_max"],
            "engine/support_mismatches": agreement["support_mismatches"],
            **{f"engine/{k}": agreement[k] for k in SUPPORT_METRICS if k in agreement}}


def identity_tags(model: ModelSpec, dataset: DatasetSpec) -> dict[str, str]:
    """What a child run read (tasks.models.identity, tasks.datasets.identity: a hub commit or a fingerprint of
    the files), as tags: the column that tells two checkpoints of one model apart in MLflow's runs table."""
    return {"entcal.model_identity": models.identity(model), "entcal.dataset_identity": datasets.identity(dataset)}


def summary_json(pair: PairResult, cfg: StudyConfig, model: ModelSpec, dataset: DatasetSpec) -> dict:
    """summary.json (docs/DESIGN.md): the metrics, the decoding, model and dataset names and identities
    (identity_tags), T, provenance; the engine that sampled, and for engine: vllm its agreement with the
    re-score."""
    d, ids = pair.decoding, identity_tags(model, dataset)
    return {
        "engine": {"name": model.engine, **({"agreement": pair.agreement} if pair.agreement else {})},
        **pair.summary.as_dict(),
        "decoding": {**d.model_dump(), "key": d.key},
        "model": pair.model, "model_identity": ids["entcal.model_identity"], "model_params": model.params,
        "dataset": pair.dataset, "dataset_identity": ids["entcal.dataset_identity"], "horizon": cfg.horizon,
        "study": cfg.name, "config_digest": cfg.digest(), "provenance": provenance(),
    }


def child_params(pair: PairResult, cfg: StudyConfig, model: ModelSpec) -> dict:
    """The child run's params: names, the decoding's knobs and the study's sizes."""
    return {"model": pair.model, "dataset": pair.dataset, "decoding": pair.decoding.key, "engine": model.engine,
            **pair.decoding.model_dump(), "horizon": cfg.horizon, "num_examples": cfg.num_examples,
            "max_new_tokens": cfg.max_new_tokens, "prompt_tokens": cfg.prompt_tokens, "seed": cfg.seed,
            "samples_per_prompt": cfg.samples_per_prompt}


def child_metrics(pair: PairResult) -> dict[str, float]:
    """The child run's metrics: stable names for MLflow's comparison views."""
    s = pair.summary
    return {"entce": s.entce, "entropy_mean": s.entropy, "logloss_mean": s.logloss, "entce_ci_low": s.entce_ci_low,
            "entce_ci_high": s.entce_ci_high, "calib_error_per_step": s.calib_error_per_step,
            "calib_error_per_step_ci_low": s.calib_error_per_step_ci[0],
            "calib_error_per_step_ci_high": s.calib_error_per_step_ci[1], "entce_slope": s.entce_slope,
            "entce_slope_ci_low": s.entce_slope_ci[0], "entce_slope_ci_high": s.entce_slope_ci[1],
            "diag/logloss_untruncated_mean": s.logloss_untruncated,
            "diag/truncated_share": s.truncated_share, "diag/sampled_surprisal_mean": s.sampled_surprisal,
            "diag/eos_share": s.eos_share, "diag/n_examples": s.n_examples, **agreement_metrics(pair.agreement)}


def calibration_metrics(result: CalibrationResult) -> dict[str, float]:
    """Stable MLflow metric names for comparison views."""
    m = {"tau_star": result.tau_star, "logloss_at_tau_star": result.logloss_at_tau_star,
         "logloss_at_tau_1": result.logloss_at_tau_1}
    m["tau_star_ci_low"], m["tau_star_ci_high"] = result.tau_star_ci
    for t in result.truncation:
        m[f"{t['method']}_zeroing_param"] = t["param"]
        for col in SETTING_COLUMNS:
            m[f"{t['method']}_zeroing_{col}"] = t.get(col)
    for name, r in result.recalibrations.items():
        doc = r.as_dict()
        m.update({f"{name}_{k}": doc.get(k) for k in RECALIBRATION_METRICS})
        m[f"{name}_delta_entce_ci_low"], m[f"{name}_delta_entce_ci_high"] = doc["delta_entce_ci"]
        m[f"{name}_delta_logloss_ci_low"], m[f"{name}_delta_logloss_ci_high"] = doc["delta_logloss_ci"]
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


RECALIBRATION_METRICS = ("alpha", "entce_before", "entce_after", "logloss_before", "logloss_after", "delta_entce",
                         "delta_logloss", "alpha_zero_entce", "logloss_at_zero_entce", "delta_logloss_at_zero_entce",
                         "calib_error_per_step_before", "calib_error_per_step_after", "entce_slope_before",
                         "entce_slope_after", "eos_share_before", "eos_share_after", "heldout_r2", "gradient_at_zero",
                         "entce_fit_split")
