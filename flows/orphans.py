"""Crashes, cancellations, kill -9: what a killed study leaves RUNNING gets ended.

Each study and calibration flow run is labelled with its process (host, pid, start time); the MLflow
parent run is tagged with its flow run. The next study sets Crashed the flow runs whose process is
gone and KILLED the MLflow runs theirs left; the flow's state hooks end its own MLflow runs when it
crashes, fails or is cancelled before its own bookkeeping could.
"""
from __future__ import annotations

import logging

from entcal.storage.settings import from_env
from entcal.storage.tracking import Tracker, TrackingError, owner_of, owner_tags

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


FLOW_NAMES = ("entcal-study", "entcal-calibration")  # flow runs labelled with their process


def label_flow_run(extra: dict[str, str] | None = None) -> None:
    """Label this flow run with this process (``owner_tags``), and ``extra``: a later study can tell it
    was killed."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.get_id():
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(UUID(flow_run.get_id()), {**owner_tags(), **(extra or {})})


def crash_orphan_flow_runs(flow_run_id: str | None, logger) -> list[str]:
    """Label this flow run (``flow_run_id``) with this process (label_flow_run); set Crashed (forced) every
    other RUNNING study or calibration flow run whose labelled owner on this host is gone. Returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from entcal.storage.stack import owner_alive

    label_flow_run()
    crashed = []
    with get_client(sync_client=True) as client:
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOW_NAMES))),
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


SLOT_LABEL = "entcal.gpu_slot"  # a study's flow run: the lease id of the GPU slot it holds, else "free"


def mark_slot(lease_id=None) -> None:
    """Label this flow run with this process and the lease of the GPU slot it holds (``lease_id``; None:
    it holds none). Best effort: bookkeeping never fails a study."""
    try:
        label_flow_run({SLOT_LABEL: str(lease_id) if lease_id else "free"})
    except Exception as err:
        logging.getLogger(__name__).warning("could not label the flow run's GPU slot: %s", err)


def free_leaked_slots(limit: str, logger) -> int:
    """Release the GPU slot leases of studies killed on this host; returns how many.

    A study killed with SIGKILL never gives its slot back, and Prefect's ephemeral server (``entcal
    run`` without a Prefect server, the test harness) never expires leases: every later study would
    wait for ever. Each study labels its flow run with its process and, while it holds the slot, with
    the slot's lease (mark_slot). After crash_orphan_flow_runs has set Crashed the runs whose process
    on this host is gone, the leases their labels still name are released: exactly the dead studies'
    slots, never a running study's (one that has just taken a slot and not yet labelled its run
    included). A lease that a Prefect server has expired meanwhile is not counted."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.runtime import flow_run

    crash_orphan_flow_runs(flow_run.get_id(), logger)
    freed = 0
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["entcal-study"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED]))),
            sort=FlowRunSort.END_TIME_DESC, limit=200)  # the latest crashes: a study frees its own on exit
        for fr in crashed:
            try:
                lease = UUID(str((fr.labels or {}).get(SLOT_LABEL, "")))
            except ValueError:  # "free", none, or an earlier entcal's "held": no lease to release
                continue
            if _lease_alive(client, lease):  # (a Prefect server may have expired it meanwhile)
                client.release_concurrency_slots_with_lease(lease)
                freed += 1
                logger.warning("freed 1 slot(s) of Prefect concurrency limit %s: the GPU slot of flow run %s (%s), "
                               "whose process was killed", limit, fr.id, fr.name)
            client.update_flow_run_labels(fr.id, {SLOT_LABEL: "free"})
    return freed


def _lease_alive(client, lease_id) -> bool:
    """Whether a concurrency lease still holds its slots. Prefect reads no lease back; renewing one is
    the probe (410 Gone when it expired or was released), and a live one is released right after."""
    import httpx

    try:
        client.renew_concurrency_lease(lease_id, lease_duration=60)  # (the shortest lease a server grants)
    except httpx.HTTPStatusError as err:
        if err.response.status_code in (404, 410):
            return False
        raise
    return True


def end_mlflow_runs(status: str):
    """A flow state hook: end, with ``status``, the MLflow runs of the flow run still RUNNING (the
    study normally has; this covers what it cannot, e.g. a crash before its ``finally``)."""
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
