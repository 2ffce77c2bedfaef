"""The management jobs' handlers: list the partner's clients, refresh phone tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.errors import JobFailure, PermanentFailure
from worker.finish.outcome import JobOutcome, JobRun, Outcome
from worker.jobs.models import ListClientsJob, RefreshClientTokensJob, RefreshPhoneTokenJob
from worker.verloop.client_list import client_phones

if TYPE_CHECKING:
    from worker.runtime.services import Services

__all__ = ["list_clients", "refresh_client_tokens", "refresh_phone_token"]


def list_clients(services: Services, job: ListClientsJob, run: JobRun) -> JobOutcome:
    """List the partner's clients and their numbers; the list goes out in the job's event."""
    clients = client_phones(services.verloop.list_clients(services.system_token.get()))
    run.note(clients=len(clients))
    return JobOutcome(Outcome.DONE, result={"clients": clients})


def refresh_phone_token(services: Services, job: RefreshPhoneTokenJob, run: JobRun) -> JobOutcome:
    """Forget the cached token of one number and fetch it again from Verloop."""
    _, run.token_source = services.phone_tokens.refresh(job.client_id, job.phone_id, rejected=None)
    return JobOutcome(
        Outcome.DONE, result={"phones": [{"phone_id": job.phone_id, "refreshed": True}]}
    )


def refresh_client_tokens(
    services: Services, job: RefreshClientTokensJob, run: JobRun
) -> JobOutcome:
    """Refresh the token of every number of one client, as ``list_clients`` lists them.

    One number failing does not stop the others; the result says which were refreshed. If
    none could be, the job fails with the first reason (and is retried or dead-lettered).
    """
    listed = client_phones(services.verloop.list_clients(services.system_token.get()))
    phone_ids = next((c["phone_ids"] for c in listed if c["client_id"] == job.client_id), None)
    if phone_ids is None:
        raise PermanentFailure(f"Verloop's client list has no client {job.client_id!r}")
    results: list[dict[str, Any]] = []
    first_failure: JobFailure | None = None
    for phone_id in phone_ids:
        try:
            services.phone_tokens.refresh(job.client_id, phone_id, rejected=None)
            results.append({"phone_id": phone_id, "refreshed": True})
        except JobFailure as exc:
            first_failure = first_failure or exc
            results.append({"phone_id": phone_id, "refreshed": False, "reason": exc.details.reason})
    if phone_ids and first_failure is not None and not any(r["refreshed"] for r in results):
        raise first_failure
    refreshed = sum(1 for r in results if r["refreshed"])
    run.note(phones=len(results), refreshed=refreshed)
    return JobOutcome(Outcome.DONE, result={"phones": results})
