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
import logging
from datetime import datetime
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger

from flows import calibration
from flows.calibration import calibrate_pair
from flows.runner import Stages, check_ray
from flows.stages import artifact_key, frame_digest, publish_calibration_task, publish_child_task, report_task
from flows.stages import study_run_name
from storage.settings import from_env
from storage.tracking import NOTE, Tracker, TrackingError, owner_of, owner_tags
from tasks import calibrate, datasets, publish, report
from tasks.config import StudyConfig
from tasks.models import max_positions, source_of


# ------------------------------------------------------------------ the flow
_PREFLIGHT_PASSED: set[str] = set()  # config digests checked in this process (the CLI, then the flow)


def preflight(config: StudyConfig) -> None:
    """Cheap checks of every input before any service or model starts: user mistakes fail in seconds.

    Needs no weights and no service: model configs, dataset sources, RAY_ADDRESS, then for each
    (model, local or built-in dataset) whether enough examples pass the filters with the model's real
    tokenizer (the same prepare_prompts the prepare task runs; hub datasets are left to that task)."""
    if config.digest() in _PREFLIGHT_PASSED:
        return
    for model in config.models:
        source_of(model)
        max_positions(model)  # reads the model's config (no weights): a broken model dir fails here
    for dataset in config.datasets:
        datasets.check_source(dataset)
    check_ray(config)
    for model in config.models:
        for dataset in config.datasets:
            if dataset.hf or dataset.preset:
                continue  # a download: the prepare task counts those examples
            datasets.prepare_prompts(model, dataset, **prepare_knobs(config))
    _PREFLIGHT_PASSED.add(config.digest())


def prepare_knobs(config: StudyConfig) -> dict:
    """The prompts-table knobs, one place for preflight's check and the prepare stage."""
    return dict(num_examples=config.num_examples, prompt_tokens=config.prompt_tokens,
                min_reference_tokens=config.min_reference_tokens,
                max_reference_tokens=max(config.horizon, config.max_new_tokens), max_new_tokens=config.max_new_tokens)


@flow(name="entcal-study", log_prints=True, flow_run_name=study_run_name)
def study(config: StudyConfig, out: str | None = None) -> dict:
    """Run one study; returns the summary rows, the MLflow run URL, the report path and which
    stages were served from cache."""
    logger = get_run_logger()
    preflight(config)
    settings = from_env()  # credentials come from the environment, never from flow parameters
    if not settings.mlflow_uri:
        raise TrackingError("no MLflow server: set MLFLOW_TRACKING_URI or run `entcal stack up`")
    out_dir = Path(out) if out else settings.state_dir / "reports" / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    tracker = Tracker(settings.mlflow_uri, experiment=f"entcal/{config.name}", source="flows/study.py:study",
                      description=publish.experiment_description(config.name))
    previous = tracker.latest_run("tags.`entcal.stage` = 'study'")  # what this launch changed, in its note
    links = prefect_links()
    description = publish.study_description(config, previous=previous)
    parent_id = tracker.start(parent_run_name(config), description=description,
                              tags={"entcal.stage": "study", "entcal.config_digest": config.digest(),
                                    **publish.provenance(), **links})
    own_study(tracker, parent_id, logger)  # and end what killed studies left RUNNING
    tracker.log_params(parent_id, publish.flat_params(config))
    for file, doc in publish.config_files(config).items():
        tracker.log_json(parent_id, doc, file)
    tracker.set_view_state()  # the runs table experiment_url opens: headline metric columns, newest first
    logger.info("MLflow study run: %s", tracker.run_url(parent_id))
    logger.info("MLflow experiment: %s", tracker.experiment_url())
    link_mlflow_run(config.name, tracker.run_url(parent_id))
    stages = Stages(config, settings, logger)
    run = stages.run
    knobs = dict(max_new_tokens=config.max_new_tokens, samples_per_prompt=config.samples_per_prompt,
                 seed=config.seed, batch_size=config.batch_size)
    rows, all_curves, sections, calibrations, alphas, excerpts = [], [], [], {}, {}, []
    example_sums: dict[tuple[str, str], dict] = {}  # (model, dataset) -> τ = 1 per-example sums: scaling CI
    out_dir.mkdir(parents=True, exist_ok=True)
    status = "FAILED"
    try:
        for model in config.models:
            for dataset in config.datasets:
                tag = f"{model.label}/{dataset.label}"
                if dataset.label not in alphas:
                    alphas[dataset.label] = run("corpus-alpha", f"corpus-alpha {dataset.label}", dataset=dataset)
                prompts = run("prepare", f"prepare {tag}", model=model, dataset=dataset, **prepare_knobs(config))
                prompts_uri = publish.upload_prompts(settings, prompts, frame_digest(prompts)[:16])
                children = {d.key: start_child(
                    tracker, parent_id, publish.display_name(model, dataset, d), links,
                    {"entcal.stage": "child", "entcal.child": publish.child_name(model, dataset, d)},
                    publish.child_description(config, model, dataset, d)) for d in config.decodings}
                try:  # the child runs span generation, scoring and publishing; a failure ends them FAILED
                    gens = stages.generations(model, prompts, config.decodings, tag, **knobs)
                    ref = run("score", f"score {tag}", gpu_work=True, model=model, prompts=prompts,
                              decodings=config.decodings, max_tokens=config.horizon, epsilon=config.epsilon,
                              batch_size=config.batch_size)
                    for d in config.decodings:
                        g, r = gens[d.key], ref.filter(pl.col("decoding") == d.key)
                        summ = calibrate.entce_summary(g, r, horizon=config.horizon, bootstrap=config.bootstrap,
                                                       ci_level=config.ci_level, seed=config.seed)
                        if d.temperature == 1.0 and not d.truncated:
                            example_sums[model.label, dataset.label] = calibrate.example_sums(
                                g, r, horizon=config.horizon)
                        curves = calibrate.step_curves(g, r, horizon=config.horizon)
                        doc = publish.summary_json(summ, config, model, dataset, d, model.params)
                        name = publish.child_name(model, dataset, d)
                        tables = {"prompts": prompts, "generations": g, "reference": r}
                        params = {"model": model.label, "dataset": dataset.label, "decoding": d.key,
                                  **d.model_dump(), "horizon": config.horizon, "num_examples": config.num_examples,
                                  "max_new_tokens": config.max_new_tokens, "prompt_tokens": config.prompt_tokens,
                                  "seed": config.seed, "samples_per_prompt": config.samples_per_prompt}
                        run_id = publish_child_task(
                            tracker, parent_id, name, params, doc, curves, tables, run_id=children[d.key],
                            prompts_uri=prompts_uri, description=publish.child_description(config, model, dataset, d),
                            examples=publish.example_table(g, r, horizon=config.horizon))
                        children.pop(d.key)
                        if out:
                            publish.write_child_dir(out_dir, name, tables, doc)
                        rows.append({"model": model.label, "dataset": dataset.label, "decoding": d.key,
                                     "temperature": d.temperature, "truncated": d.truncated, "run_id": run_id,
                                     "run_url": tracker.run_url(run_id),
                                     **{k: summ[k] for k in report.METRIC_COLUMNS}})
                        all_curves.append({"model": model.label, "dataset": dataset.label, "decoding": d.key,
                                           "curves": curves})
                        tracker.log_metrics(parent_id, publish.headline_metrics(rows[-1:],
                                                                                several_models=len(config.models) > 1))
                    excerpts += report.pick_excerpts(prompts, gens, ref, model=model.label, horizon=config.horizon)
                    if config.calibration:
                        stage_tasks = {
                            "generate": lambda model, prompts, decoding, **kw: stages.generations(
                                model, prompts, [decoding], tag, **kw)[decoding.key],
                            "score": lambda **kw: run("score", f"score {tag}/{kw['decodings'][0].key}", gpu_work=True,
                                                      **kw),
                            "recalibrate": lambda **kw: run("recalibrate", f"{kw['method']} {tag}", gpu_work=True,
                                                            **kw),
                        }
                        label = f"{model.label}__{dataset.label}"
                        children["calibration"] = start_child(
                            tracker, parent_id, f"calibration · {dataset.label} · {model.label}", links,
                            {"entcal.stage": "calibration", "entcal.child": f"calibration__{label}"},
                            f"τ*, truncations, lookahead and future-entropy calibration of {model.label} on "
                            f"{dataset.label} (study {config.name}, config `{config.digest()}`)")
                        cal = calibrate_pair(config, model, prompts, stage_tasks, out_dir, label)
                        calibrations[label] = cal
                        sections.append(calibration.markdown(label, cal))
                        publish_calibration_task(tracker, parent_id, label, cal, calibration.metrics(cal),
                                                 run_id=children.pop("calibration"))
                except BaseException as err:
                    for run_id in children.values():
                        tracker.finish_quietly(run_id, "FAILED" if isinstance(err, Exception) else "KILLED")
                    raise
        tracker.set_tags(parent_id, {NOTE: f"{description}\n\n{publish.results_markdown(rows)}"})
        tracker.log_table_view(parent_id, pl.DataFrame(rows).select(
            "decoding", "dataset", "model", *report.METRIC_COLUMNS, "run_id"), "tables/summary.json")
        sections.append(report.corpus_alpha_section(alphas))
        sections += scaling_sections(config, rows, out_dir, example_sums)
        if calibrations:
            doc = next(iter(calibrations.values())) if len(calibrations) == 1 else {"pairs": calibrations}
            (out_dir / "calibration.json").write_text(json.dumps(doc, indent=2, default=str))
            if len(calibrations) == 1:
                tracker.log_metrics(parent_id, calibration.metrics(doc))
        summary = pl.DataFrame(rows)
        files = report_task(tracker, parent_id, str(out_dir), config.name, summary, all_curves,
                            config.horizon, config.smoothing, "\n".join(sections), excerpts=excerpts)
        status = "FINISHED"
    except BaseException as err:  # SIGTERM (Prefect's TerminationSignal), Ctrl-C, SystemExit: KILLED
        status = "FAILED" if isinstance(err, Exception) else "KILLED"
        raise
    finally:
        stages.close()
        tracker.finish(parent_id, status)
    logger.info("stages served from cache: %s", ", ".join(stages.cached) or "none")
    return {"run_url": tracker.run_url(parent_id), "experiment_url": tracker.experiment_url(), "run_id": parent_id,
            "report": files["report"], "html": files.get("html"),
            "out_dir": str(out_dir), "rows": rows, "cached": stages.cached, "ran": stages.ran,
            "calibration": calibrations, "corpus_alpha": alphas}


# ------------------------------------------------------------------ MLflow runs and their Prefect links
def prefect_links() -> dict[str, str]:
    """Tags linking an MLflow run to this Prefect flow run: ``prefect.flow_run_id``, ``prefect.flow_run_name``
    and ``prefect.flow_run_url`` (the Prefect UI, ``PREFECT_UI_URL`` or the API URL without ``/api``,
    then ``/runs/flow-run/<id>``; any user:password in the URL is dropped). Empty outside a flow run."""
    from urllib.parse import urlsplit, urlunsplit

    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    flow_run_id = flow_run.get_id()
    if not flow_run_id:
        return {}
    tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": str(flow_run.name or "")}
    api = PREFECT_API_URL.value()
    ui = PREFECT_UI_URL.value() or (api.rstrip("/").removesuffix("/api") if api else None)
    if ui:
        parts = urlsplit(ui.rstrip("/"))
        ui = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        tags["prefect.flow_run_url"] = f"{ui}/runs/flow-run/{flow_run_id}"
    return tags


def parent_run_name(config: StudyConfig) -> str:
    """``<study>-<UTC %Y%m%d-%H%M%S>``: the flow run's own name when it has that form, so both UIs agree."""
    from datetime import timezone

    from prefect.runtime import flow_run

    name = flow_run.name if flow_run.get_id() else None
    if name and name.startswith(f"{config.name}-"):
        return name
    return f"{config.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def link_mlflow_run(name: str, url: str) -> None:
    """A Prefect link artifact ``mlflow-<study>`` on this flow run pointing at the MLflow study run."""
    from prefect.artifacts import create_link_artifact

    try:
        create_link_artifact(link=url, link_text=f"MLflow study run of {name}",
                             key="mlflow-" + artifact_key(name).removeprefix("entcal-"),
                             description=f"The MLflow run of entcal study {name}: metrics, tables, figures")
    except Exception as err:  # a link never fails a study
        get_run_logger().warning("no Prefect link artifact to %s: %s", url, err)


def start_child(tracker: Tracker, parent_id: str, name: str, links: dict, tags: dict, description: str) -> str:
    """A RUNNING child run of ``parent_id`` with system metrics sampled until it finishes."""
    run_id = tracker.start(name, parent_id=parent_id, tags={**tags, **links}, description=description)
    tracker.start_system_metrics(run_id)
    return run_id


def scaling_sections(config: StudyConfig, rows: list[dict], out_dir: Path,
                     example_sums: dict[tuple[str, str], dict] | None = None) -> list[str]:
    """Per model family with ≥ 2 models: log EntCE on log parameters at τ = 1 (SCIENCE.md §2).

    ``example_sums[(model, dataset)]``: calibrate.example_sums of that model's τ = 1, untruncated
    decoding; the slope CI resamples them (nested bootstrap, ``config.bootstrap`` resamples at
    ``config.ci_level``; scaling.fit_scaling). Without them, or with < 3 models, the slope has no CI."""
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
            pts = [(params[r["model"]], r["entce"], r["model"]) for r in rows if r["dataset"] == dataset.label
                   and r["model"] in params and r["temperature"] == 1.0 and not r["truncated"]]
            sums = [(example_sums or {}).get((name, dataset.label)) for _, _, name in pts]
            head = f"## Scaling: {family} on {dataset.label}"
            try:
                fit = scaling.fit_scaling([p for p, _, _ in pts], [e for _, e, _ in pts],
                                          examples=None if None in sums else sums, n_boot=config.bootstrap,
                                          ci_level=config.ci_level, seed=config.seed)
            except ValueError as err:
                out.append(f"{head}\n\nNo fit: {err}\n")
                continue
            path = scaling.plot_scaling([p for p, _, _ in pts], [e for _, e, _ in pts], fit,
                                        str(out_dir / f"scaling__{family}__{dataset.label}.png"))
            out.append(f"{head}\n\n{fit.describe()}\n\n![scaling]({Path(path).name})\n")
    return out


# ------------------------------------------------------------------ crashes, cancellations, kill -9
FLOW_RUN_TAG = "entcal.flow_run_id"  # on the MLflow parent run: the Prefect flow run it belongs to


def own_study(tracker: Tracker, parent_id: str, logger) -> None:
    """Link the MLflow parent run and this Prefect flow run to this process (owner tags / labels), and
    end what studies killed with SIGKILL left RUNNING: their MLflow runs -> KILLED, their flow runs ->
    Crashed. Checks that cannot be made (e.g. a Prefect server without labels) only log a warning."""
    from prefect.runtime import flow_run

    flow_run_id = flow_run.get_id()
    if flow_run_id:
        tracker.set_tags(parent_id, {FLOW_RUN_TAG: flow_run_id})
    try:
        tracker.end_orphans(logger)
    except TrackingError as err:
        logger.warning("could not end MLflow runs left RUNNING by killed studies: %s", err)
    try:
        crash_orphan_flow_runs(flow_run_id, logger)
    except Exception as err:  # bookkeeping never fails a study
        logger.warning("could not check for flow runs left RUNNING by killed studies: %s: %s",
                       err.__class__.__name__, str(err).splitlines()[0][:200] if str(err) else "")


def crash_orphan_flow_runs(flow_run_id: str | None, logger) -> list[str]:
    """Label flow run ``flow_run_id`` with this process (``owner_tags``); set Crashed (forced) every other
    RUNNING ``entcal-study`` flow run whose labelled owner on this host is gone. Returns their ids."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from storage.stack import owner_alive

    crashed = []
    with get_client(sync_client=True) as client:
        if flow_run_id:
            client.update_flow_run_labels(UUID(flow_run_id), owner_tags())
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[study.name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
            limit=200)
        for fr in running:
            owner = owner_of(dict(fr.labels or {}))
            if str(fr.id) == flow_run_id or owner is None or owner_alive(owner):
                continue
            client.set_flow_run_state(fr.id, Crashed(message=f"the entcal process running it ({owner['host']} pid "
                                                             f"{owner['pid']}) is gone; found by flow run {flow_run_id}"),
                                      force=True)
            crashed.append(str(fr.id))
            logger.warning("flow run %s (%s) was left RUNNING by entcal process %s, which is gone: set Crashed",
                           fr.id, fr.name, owner["pid"])
    return crashed


def _end_mlflow_runs(status: str):
    """A flow state hook: end, with ``status``, the MLflow runs of the flow run still RUNNING (the
    study's ``finally`` normally has; this covers what it cannot, e.g. a crash before it is reached)."""
    def hook(flow, flow_run, state) -> None:
        settings = from_env()
        cfg = (flow_run.parameters or {}).get("config")
        name = cfg.get("name") if isinstance(cfg, dict) else getattr(cfg, "name", None)
        if not settings.mlflow_uri or not name:
            return
        ended = Tracker(settings.mlflow_uri, experiment=f"entcal/{name}").end_tagged(FLOW_RUN_TAG, str(flow_run.id),
                                                                                      status)
        if ended:
            logging.getLogger(__name__).warning("flow run %s: MLflow runs %s set %s", state.name, ", ".join(ended),
                                                status)
    hook.__name__ = f"end_mlflow_runs_{status.lower()}"
    return hook


study.on_crashed(_end_mlflow_runs("KILLED"))
study.on_cancellation(_end_mlflow_runs("KILLED"))
study.on_failure(_end_mlflow_runs("FAILED"))
