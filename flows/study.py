"""One study: models × datasets × decodings -> an MLflow parent run and a child run per triple.

For each (model, dataset): prompts -> generations (per decoding, in shards) -> reference (the human
text scored under every decoding) -> a PairResult per decoding -> its MLflow child run; then, if
configured, its calibration. Last, the scaling fits and the report. The stages are cached by content
(flows/cache.py), so a re-run of the same study from any process pointed at the same result storage
reuses them; the executor decides where each runs and holds this machine's devices while it works
(flows/executor.py); the publisher puts the records where people read them (flows/publish.py).
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from entcal.flows import housekeeping
from entcal.flows.calibration import calibrate
from entcal.flows.executor import Executor
from entcal.flows.preflight import preflight
from entcal.storage.settings import from_env
from entcal.tasks import scaling
from entcal.tasks.config import StudyConfig
from entcal.tasks.contracts import StudyResult
from entcal.flows.publish import Publisher


@flow(name=housekeeping.STUDY_FLOW, log_prints=True, flow_run_name=housekeeping.study_run_name)
def study(config: StudyConfig, out: str | None = None) -> dict:
    """Run one study; returns the summary rows, the MLflow run URL, the report path and which
    stages were served from cache."""
    preflight(config)
    logger, settings = get_run_logger(), from_env()  # credentials from the environment, never from parameters
    executor = Executor(config, settings, logger)
    publisher = Publisher(config, settings, out, links=housekeeping.prefect_links(),
                          run_name=housekeeping.parent_run_name())
    housekeeping.end_killed_studies(publisher.tracker, logger)
    with executor as ex, publisher.study() as run:  # ex holds this machine's devices
        alphas = {d.label: ex.corpus_alpha(d) for d in config.datasets}
        pairs, calibrations = [], []
        for model in config.models:
            for dataset in config.datasets:
                prompts = ex.prepare(model, dataset)
                with run.pair(model, dataset, prompts) as children:
                    generations = ex.generate(model, prompts, config.decodings)
                    reference = ex.score(model, prompts, config.decodings)
                    for d in config.decodings:
                        pairs.append(ex.measure(model, dataset, d, prompts, generations[d.key], reference))
                        children.publish(pairs[-1])
                    if config.calibration:
                        with children.calibration() as calibration:
                            calibrations.append(calibrate(ex, model, prompts))
                            calibration.publish(calibrations[-1])
        params = {m.label: ex.model_params(m) for m in config.models if m.family}  # counted once, cached
        fits = scaling.study_fits(config, pairs, params)
        logger.info("stages served from cache: %s", ", ".join(ex.cached) or "none")
        return run.report(StudyResult(pairs, calibrations, fits, alphas, ex.cached, ex.ran))
