"""One study: models × datasets × decodings -> an MLflow parent run and a child run per triple.

prepare ──> generate (per decoding) ──> score (one forward serves all decodings) ──> summarise
        ──> publish (MLflow child runs, --out tables) ──> report (figures, report.md)

Caching: generation and scoring are keyed on content (model spec, a hash of the prompts
table, the decoding, the knobs that change the result, and the source of the module that does
the work), never on model objects or run ids, and their results are persisted, so a re-run of
the same study — from any process pointed at the same result storage — reuses them.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger

from flows import calibration
from flows.calibration import calibrate_pair
from flows.runner import Stages, check_ray
from flows.stages import publish_calibration_task, publish_child_task, report_task
from storage.settings import from_env
from storage.tracking import Tracker, TrackingError
from tasks import calibrate, datasets, publish, report
from tasks.config import StudyConfig
from tasks.models import max_positions, source_of


# ------------------------------------------------------------------ the flow
def preflight(config: StudyConfig) -> None:
    """Cheap checks of every input before any service or model starts: user mistakes fail in a second."""
    for model in config.models:
        source_of(model)
        max_positions(model)  # reads the model's config (no weights): a broken model dir fails here
    for dataset in config.datasets:
        datasets.check_source(dataset)
    check_ray(config)


@flow(name="entcal-study", log_prints=True)
def study(config: StudyConfig, out: str | None = None) -> dict:
    """Run one study; returns the summary rows, the MLflow run URL, the report path and which
    stages were served from cache."""
    logger = get_run_logger()
    preflight(config)
    settings = from_env()  # credentials come from the environment, never from flow parameters
    if not settings.mlflow_uri:
        raise TrackingError("no MLflow server: set MLFLOW_TRACKING_URI or run `entcal stack up`")
    out_dir = Path(out) if out else settings.state_dir / "reports" / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    tracker = Tracker(settings.mlflow_uri, experiment=f"entcal/{config.name}")
    parent_id = tracker.start(config.name, tags={"entcal.stage": "study", **publish.provenance()})
    tracker.log_params(parent_id, publish.flat_params(config))
    logger.info("MLflow study run: %s", tracker.run_url(parent_id))
    stages = Stages(config, settings, logger)
    run = stages.run
    knobs = dict(max_new_tokens=config.max_new_tokens, samples_per_prompt=config.samples_per_prompt,
                 seed=config.seed, batch_size=config.batch_size)
    rows, all_curves, sections, calibrations, alphas = [], [], [], {}, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    status = "FAILED"
    try:
        max_ref = max(config.horizon, config.max_new_tokens)
        for model in config.models:
            for dataset in config.datasets:
                tag = f"{model.label}/{dataset.label}"
                if dataset.label not in alphas:
                    alphas[dataset.label] = run("corpus-alpha", f"corpus-alpha {dataset.label}", dataset=dataset)
                prompts = run("prepare", f"prepare {tag}", model=model, dataset=dataset,
                              num_examples=config.num_examples, prompt_tokens=config.prompt_tokens,
                              min_reference_tokens=config.min_reference_tokens, max_reference_tokens=max_ref,
                              max_new_tokens=config.max_new_tokens)
                gens = stages.generations(model, prompts, config.decodings, tag, **knobs)
                ref = run("score", f"score {tag}", gpu_work=True, model=model, prompts=prompts,
                          decodings=config.decodings, max_tokens=config.horizon, epsilon=config.epsilon,
                          batch_size=config.batch_size)
                for d in config.decodings:
                    g, r = gens[d.key], ref.filter(pl.col("decoding") == d.key)
                    summ = calibrate.entce_summary(g, r, horizon=config.horizon, bootstrap=config.bootstrap,
                                                   ci_level=config.ci_level, seed=config.seed)
                    curves = calibrate.step_curves(g, r, horizon=config.horizon)
                    doc = publish.summary_json(summ, config, model, dataset, d, model.params)
                    name = publish.child_name(model, dataset, d)
                    tables = {"prompts": prompts, "generations": g, "reference": r}
                    params = {"model": model.label, "dataset": dataset.label, "decoding": d.key,
                              **d.model_dump(), "horizon": config.horizon, "num_examples": config.num_examples,
                              "max_new_tokens": config.max_new_tokens, "prompt_tokens": config.prompt_tokens,
                              "seed": config.seed, "samples_per_prompt": config.samples_per_prompt}
                    run_id = publish_child_task(tracker, parent_id, name, params, doc, curves, tables)
                    if out:
                        publish.write_child_dir(out_dir, name, tables, doc)
                    rows.append({"model": model.label, "dataset": dataset.label, "decoding": d.key,
                                 "temperature": d.temperature, "truncated": d.truncated, "run_id": run_id,
                                 "run_url": tracker.run_url(run_id),
                                 **{k: summ[k] for k in report.METRIC_COLUMNS}})
                    all_curves.append({"model": model.label, "dataset": dataset.label, "decoding": d.key,
                                       "curves": curves})
                if config.calibration:
                    stage_tasks = {
                        "generate": lambda model, prompts, decoding, **kw: stages.generations(
                            model, prompts, [decoding], tag, **kw)[decoding.key],
                        "score": lambda **kw: run("score", f"score {tag}/{kw['decodings'][0].key}", gpu_work=True,
                                                  **kw),
                        "recalibrate": lambda **kw: run("recalibrate", f"{kw['method']} {tag}", gpu_work=True, **kw),
                    }
                    label = f"{model.label}__{dataset.label}"
                    cal = calibrate_pair(config, model, prompts, stage_tasks, out_dir, label)
                    calibrations[label] = cal
                    sections.append(calibration.markdown(label, cal))
                    publish_calibration_task(tracker, parent_id, label, cal, calibration.metrics(cal))
        sections.append(report.corpus_alpha_section(alphas))
        sections += scaling_sections(config, rows, out_dir)
        if calibrations:
            doc = next(iter(calibrations.values())) if len(calibrations) == 1 else {"pairs": calibrations}
            (out_dir / "calibration.json").write_text(json.dumps(doc, indent=2, default=str))
            if len(calibrations) == 1:
                tracker.log_metrics(parent_id, calibration.metrics(doc))
        summary = pl.DataFrame(rows)
        files = report_task(tracker, parent_id, str(out_dir), config.name, summary, all_curves,
                            config.horizon, config.smoothing, "\n".join(sections))
        status = "FINISHED"
    finally:
        stages.close()
        tracker.finish(parent_id, status)
    logger.info("stages served from cache: %s", ", ".join(stages.cached) or "none")
    return {"run_url": tracker.run_url(parent_id), "run_id": parent_id, "report": files["report"],
            "out_dir": str(out_dir), "rows": rows, "cached": stages.cached, "ran": stages.ran,
            "calibration": calibrations, "corpus_alpha": alphas}


def scaling_sections(config: StudyConfig, rows: list[dict], out_dir: Path) -> list[str]:
    """Per model family with ≥ 2 models: log EntCE on log parameters at τ = 1 (SCIENCE.md §2)."""
    from tasks import scaling
    from tasks.models import load_model

    families: dict[str, list] = {}
    for m in config.models:
        if m.family:
            families.setdefault(m.family, []).append(m)
    out = []
    for family, models in families.items():
        if len(models) < 2:
            continue
        params = {m.label: m.params or load_model(m).params for m in models}
        for dataset in config.datasets:
            pts = [(params[r["model"]], r["entce"]) for r in rows if r["dataset"] == dataset.label
                   and r["model"] in params and r["temperature"] == 1.0 and not r["truncated"]]
            head = f"## Scaling: {family} on {dataset.label}"
            try:
                fit = scaling.fit_scaling([p for p, _ in pts], [e for _, e in pts])
            except ValueError as err:
                out.append(f"{head}\n\nNo fit: {err}\n")
                continue
            path = scaling.plot_scaling([p for p, _ in pts], [e for _, e in pts], fit,
                                        str(out_dir / f"scaling__{family}__{dataset.label}.png"))
            out.append(f"{head}\n\nslope {fit.slope:.3f} (CI [{fit.slope_ci_low:.3f}, {fit.slope_ci_high:.3f}]) "
                       f"over {fit.n_models} models\n\n![scaling]({Path(path).name})\n")
    return out
