"""Deployments of the study flow: studies on a schedule, and an on-demand study whose typed parameters
(StudyConfig) render as a form in the Prefect UI.

`entcal serve` runs them in this process (`prefect.serve`): by default the demo's nightly study and the
on-demand form; with `--config study.yaml --cron "0 3 * * *" [--timezone Europe/Paris]` (repeatable)
your own studies instead, one deployment per study named after it, and the on-demand form's defaults
are the first of them. `entcal deploy --pool gpu` registers the same deployments for a work pool
(docker/compose.yaml's GPU worker), as `prefect deploy --all` does with prefect.yaml's two.

All enforce their parameter schema: a run with a value out of the form's ranges (temperature −1,
top_p 2) is refused by the Prefect API when it is created, before any worker picks it up. A
``config`` parameter given to a run replaces the whole default config: unset fields take
StudyConfig's defaults, not the deployment's.
"""
from __future__ import annotations

from dataclasses import dataclass

from prefect import deploy, serve
from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron, Schedule

from entcal.flows.study import study
from entcal.tasks.config import ConfigError, StudyConfig

NIGHTLY_CRON = "0 3 * * *"
NIGHTLY_TIMEZONE = "UTC"  # the schedule's own zone: 03:00 UTC whatever the serving machine's clock says


@dataclass(frozen=True)
class Scheduled:
    """A study to serve on a schedule: its config and a cron expression in a time zone."""

    config: StudyConfig
    cron: str
    timezone: str = NIGHTLY_TIMEZONE

    def schedule(self) -> Schedule:
        """The schedule, checked as the Prefect server will check it: a one-line error if it is not one."""
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValidationError as err:
            why = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"study {self.config.name}: --cron {self.cron!r} --timezone {self.timezone}: {why} "
                              "(a cron expression: minute hour day month weekday, e.g. '0 3 * * *'; a zone "
                              "like UTC or Europe/Paris)") from None
        return Cron(self.cron, timezone=self.timezone)


def demo_config(quick: bool = False, calibrate: bool = False) -> dict:
    """The embedded default study (`entcal demo`, the nightly deployment): SmolLM2-135M on both built-in
    corpora at three temperatures; with ``calibrate``, a calibration study on the prose corpus. Here, not in
    tasks/config.py: every stage's cache key covers that module's code, and resizing the demo must not
    re-key every cached stage of every study."""
    if quick:
        size = dict(num_examples=8, prompt_tokens=32, max_new_tokens=48, min_reference_tokens=48,
                    batch_size=8)
    else:
        size = dict(num_examples=24, prompt_tokens=64, max_new_tokens=160, min_reference_tokens=160,
                    batch_size=12)
    cfg = {"name": "demo-quick" if quick else "demo", "models": [{"name": "smollm2-135m"}],
           "datasets": [{"name": "python-docs"}, {"name": "python-stdlib"}],
           "decodings": [{"temperature": 1.0}, {"temperature": 0.9}, {"temperature": 0.8}], "seed": 0, **size}
    if calibrate:  # quick: about 9 minutes on 2 cores; full: 24 evaluation prompts, for paired CIs of about ±0.1
        cfg.update(name=cfg["name"].replace("demo", "demo-calibrate"), datasets=[{"name": "python-docs"}],
                   decodings=[{"temperature": 1.0}], calibration={"tau_rounds": 4 if quick else 6})
        if not quick:
            cfg.update(num_examples=32, max_new_tokens=96, min_reference_tokens=96, batch_size=8)
            cfg["calibration"].update(fit_fraction=0.25, zero_rounds=3)  # 8 fit prompts (× 4 own generations for f̂)
    return cfg


def nightly_schedule() -> Schedule:
    return Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)


def _deployment(name: str, config: dict, schedule: Schedule | None, description: str, tags: list[str]):
    return study.to_deployment(name=name, schedules=[schedule] if schedule else None, parameters={"config": config},
                               enforce_parameter_schema=True, entrypoint_type=EntrypointType.MODULE_PATH,
                               description=description, tags=tags, _sync=True)


def deployments(studies: list[Scheduled] = (), *, nightly: Schedule | None = None, nightly_config: dict | None = None):
    """One scheduled deployment per study of ``studies`` (named after it), else the demo's nightly (``nightly``
    / ``nightly_config`` replace its schedule and study: tests serve it with a schedule due in seconds); and
    the on-demand form, whose defaults are the first study's config (else the quick demo's)."""
    names = [s.config.name for s in studies]
    for i, name in enumerate(names):
        if name in names[:i] or name == "on-demand":
            raise ConfigError(f"study name {name!r}: each served study needs its own name (a deployment is named "
                              "after its study; on-demand is the form's)")
    scheduled = [_deployment(s.config.name, s.config.model_dump(mode="json", exclude_none=True), s.schedule(),
                             f"Study {s.config.name} on {s.cron} ({s.timezone}).", ["entcal", "scheduled"])
                 for s in studies]
    if not studies:
        scheduled = [_deployment("nightly", nightly_config or demo_config(quick=False), nightly or nightly_schedule(),
                                 "The demo study every night at 03:00 UTC: SmolLM2-135M on both built-in corpora.",
                                 ["entcal", "scheduled"])]
    defaults = studies[0].config.model_dump(mode="json", exclude_none=True) if studies else demo_config(quick=True)
    return [*scheduled, _deployment("on-demand", defaults, None, "A study you launch from the UI: edit models, "
                                    "datasets and decodings in the form.", ["entcal", "on-demand"])]


def serve_all(limit: int | None = 1, **overrides) -> None:
    """Serve the deployments here until interrupted; ``overrides`` go to :func:`deployments`."""
    serve(*deployments(**overrides), limit=limit)


def deploy_all(pool: str, studies: list[Scheduled] = ()) -> list:
    """Register the deployments for the work pool ``pool`` (its workers run them; the code is the installed
    entcal package: entrypoint entcal.flows.study.study). Returns their ids."""
    try:
        return deploy(*deployments(studies), work_pool_name=pool, print_next_steps_message=False)
    except ValueError as err:
        if "Could not find work pool" in str(err):
            raise ConfigError(f"work pool {pool!r} does not exist on this Prefect server: start its worker "
                              f"(docker/compose.yaml's creates 'gpu') or `prefect work-pool create {pool} --type "
                              "process`") from None
        raise
