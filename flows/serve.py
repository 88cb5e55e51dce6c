"""Deployments of the study flow: a nightly schedule and an on-demand study whose typed
parameters (StudyConfig) render as a form in the Prefect UI.

`entcal serve` runs them in this process (`prefect.serve`); `prefect deploy --all` registers the
same two from prefect.yaml for a work pool (docker/compose.yaml's GPU worker).

Both enforce their parameter schema: a run with a value out of the form's ranges (temperature −1,
top_p 2) is refused by the Prefect API when it is created, before any worker picks it up. A
``config`` parameter given to a run replaces the whole default config: unset fields take
StudyConfig's defaults, not the deployment's.
"""
from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron, Schedule

from entcal.flows.study import study
from entcal.tasks.config import demo_config

NIGHTLY_CRON = "0 3 * * *"
NIGHTLY_TIMEZONE = "UTC"  # the schedule's own zone: 03:00 UTC whatever the serving machine's clock says


def nightly_schedule() -> Schedule:
    return Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)


def deployments(nightly: Schedule | None = None, nightly_config: dict | None = None):
    """The nightly and on-demand deployments; ``nightly`` / ``nightly_config`` replace the nightly's
    schedule and study (tests serve the real deployment with a schedule due in seconds)."""
    nightly_dep = study.to_deployment(
        name="nightly", schedules=[nightly or nightly_schedule()], _sync=True, entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"config": nightly_config or demo_config(quick=False)}, enforce_parameter_schema=True,
        description="The demo study every night at 03:00 UTC: SmolLM2-135M on both built-in corpora.",
        tags=["entcal", "scheduled"],
    )
    on_demand = study.to_deployment(
        name="on-demand", parameters={"config": demo_config(quick=True)}, enforce_parameter_schema=True, _sync=True,
        entrypoint_type=EntrypointType.MODULE_PATH, description="A study you launch from the UI: edit models, datasets and decodings in the form.",
        tags=["entcal", "on-demand"],
    )
    return [nightly_dep, on_demand]


def serve_all(limit: int | None = 1, **overrides) -> None:
    """Serve both deployments here until interrupted; ``overrides`` go to :func:`deployments`."""
    serve(*deployments(**overrides), limit=limit)
