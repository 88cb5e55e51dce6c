"""The one clean-up step before a study, and the study's place in Prefect (its name, its links).

A study killed with ``kill -9`` runs no ``finally``: its MLflow runs stay RUNNING and its Prefect flow
run stays Running. Every MLflow run and every study flow run carries its process (host, pid, start
time: owner tags and labels), so the next study, as its first step (``end_killed_studies``), sets
KILLED the MLflow runs and Crashed the flow runs whose process on this host is gone. Nothing else
ends another process's runs. (The servers a killed ``entcal run`` started are adopted by
storage.stack.ensure, where the CLI starts services; a killed study's GPU lock is released by the
kernel: storage/locks.py.)
"""
from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

from entcal.storage.stack import owner_alive
from entcal.storage.tracking import Tracker, TrackingError, owner_of, owner_tags

STUDY_FLOW = "entcal-study"


def end_killed_studies(tracker: Tracker, logger) -> None:
    """Label this flow run with this process, then end what studies killed on this host left running:
    their MLflow runs -> KILLED, their flow runs -> Crashed. A check that cannot be made (a Prefect server
    without labels, MLflow refusing) logs a warning: bookkeeping never fails a study."""
    try:
        tracker.end_orphans(logger)
    except TrackingError as err:
        logger.warning("could not end MLflow runs left RUNNING by killed studies: %s", err)
    try:
        _crash_killed_flow_runs(logger)
    except Exception as err:
        logger.warning("could not check for flow runs left RUNNING by killed studies: %s: %s",
                       err.__class__.__name__, (str(err).splitlines() or [""])[0][:200])


def _crash_killed_flow_runs(logger) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    me = flow_run.get_id()
    with get_client(sync_client=True) as client:
        if me:
            client.update_flow_run_labels(UUID(me), owner_tags())
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[STUDY_FLOW])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
            limit=200)
        for fr in running:
            owner = owner_of(dict(fr.labels or {}))
            if str(fr.id) == me or owner is None or owner_alive(owner):
                continue
            client.set_flow_run_state(fr.id, Crashed(message=f"the entcal process running it ({owner['host']} pid "
                                                             f"{owner['pid']}) is gone; found by flow run {me}"),
                                      force=True)
            logger.warning("flow run %s (%s) was left RUNNING by entcal process %s, which is gone: set Crashed",
                           fr.id, fr.name, owner["pid"])


def _utc() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def study_run_name() -> str:
    """The flow run's name (Prefect's ``flow_run_name``): ``<study>-<UTC %Y%m%d-%H%M%S>``, e.g.
    ``demo-20261202-030000``."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    name = config.get("name") if isinstance(config, dict) else getattr(config, "name", None)
    return f"{name or 'study'}-{_utc()}"


def parent_run_name() -> str:
    """The MLflow parent run's name: the flow run's own (study_run_name), so both UIs say the same."""
    from prefect.runtime import flow_run

    return (flow_run.name if flow_run.get_id() else None) or study_run_name()


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
