"""Deployments of the study flow: a nightly schedule and an on-demand study whose typed
parameters (StudyConfig) render as a form in the Prefect UI.

`entcal serve` runs them in this process (`prefect.serve`); `prefect deploy --all` registers the
same two from prefect.yaml for a work pool (docker/compose.yaml's GPU worker).
"""
from __future__ import annotations

from prefect import serve

from flows.study import study
from tasks.config import demo_config

NIGHTLY_CRON = "0 3 * * *"


def deployments():
    nightly = study.to_deployment(
        name="nightly", cron=NIGHTLY_CRON, parameters={"config": demo_config(quick=False)},
        description="The demo study every night at 03:00 UTC: SmolLM2-135M on both built-in corpora.",
        tags=["entcal", "scheduled"],
    )
    on_demand = study.to_deployment(
        name="on-demand", parameters={"config": demo_config(quick=True)},
        description="A study you launch from the UI: edit models, datasets and decodings in the form.",
        tags=["entcal", "on-demand"],
    )
    return [nightly, on_demand]


def serve_all(limit: int | None = 1) -> None:
    serve(*deployments(), limit=limit)
