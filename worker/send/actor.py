"""The ``send_message`` handler: a campaign's gate, the number's token, then the paced send.

1. a campaign job: cancelled → ``cancelled``, not sent; paused, not started or outside its
   window → re-delayed
2. the number's token (file → memory → Redis → Verloop)
3. the send's steps (:mod:`worker.send.steps`): admit, claim, call, record
4. a rejected token: refresh it once and send again; rejected again: dead letter

Failures are raised for the outcome middleware (:mod:`worker.finish.middleware`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from worker.campaigns.store import CampaignRef
from worker.campaigns.window import seconds_until_open
from worker.errors import Deferred, PermanentFailure, RedisUnavailable, TokenInvalid
from worker.finish.outcome import JobOutcome, JobRun, Outcome
from worker.jobs.models import SendMessageJob
from worker.send.gate import held_while_redis_is_down
from worker.send.steps import paced_send

if TYPE_CHECKING:
    from worker.runtime.services import Services

__all__ = ["send_message"]


def send_message(services: Services, job: SendMessageJob, run: JobRun) -> JobOutcome:
    """Send one WhatsApp message (see the module docstring for the steps)."""
    try:
        if job.campaign_id is not None and not _campaign_allows(
            services, CampaignRef(job.client_id, job.campaign_id)
        ):
            return JobOutcome(Outcome.CANCELLED)
        tokens = services.phone_tokens
        token, run.token_source = tokens.get(job.client_id, job.phone_id)
        try:
            return paced_send(services, token, job, run)
        except TokenInvalid:
            token, run.token_source = tokens.refresh(job.client_id, job.phone_id, rejected=token)
            run.token_refreshed = True
            try:
                return paced_send(services, token, job, run)
            except TokenInvalid as exc:
                raise PermanentFailure(
                    "Verloop rejected the phone token again after refreshing it; check the "
                    "number's token in Verloop (Client Details → Generate Token)",
                    http_status=exc.details.http_status,
                    code=exc.details.code,
                ) from None
    except RedisUnavailable as exc:
        raise held_while_redis_is_down(exc, "redis_unavailable") from None


def _campaign_allows(services: Services, campaign: CampaignRef) -> bool:
    """Whether a campaign job may be sent now; False if its campaign was cancelled.

    Raises:
        Deferred: the campaign is paused, has not started, or is outside its send window.
    """
    state, window, start_at = services.campaigns.gate(campaign)
    if state == "cancelled":
        return False
    settings = services.settings
    if state == "paused":
        raise Deferred(settings.campaign_pause_recheck_s, "campaign paused", kind="campaign_paused")
    now = time.time()
    if start_at is not None and now < start_at:
        raise Deferred(start_at - now, "campaign has not started yet", kind="campaign_scheduled")
    if window is not None:
        wait = seconds_until_open(window, now)
        if wait > 0:
            raise Deferred(
                wait,
                f"outside the send window {window[0]}-{window[1]} {window[2]}",
                kind="send_window",
            )
    return True
