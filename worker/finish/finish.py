"""The one place a job is finished: its ledger record, campaign counter and event, together.

:class:`JobFinisher` sends a final outcome's Redis commands in one round trip, the ledger record
of a sent message first (then its campaign counter, the link its statuses will find it by, and
its event), so a message Verloop accepted is recorded before anything else is tried;
nothing failing afterwards turns it into a retry (a resend): it is logged and counted. If Redis
does not answer, the event is published straight to RabbitMQ (as with ``EVENTS_DELIVERY=direct``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pika.exceptions
import structlog
from dramatiq.errors import BrokerConnectionError

from worker.campaigns.store import CampaignRef
from worker.connections.redis import RedisErrors
from worker.errors import LedgerNotReplicated, RedisUnavailable
from worker.finish.events import declare_exchange, publish_event
from worker.finish.outcome import Afterwards, JobOutcome, JobRun, Outcome
from worker.receipts.links import Link

if TYPE_CHECKING:
    from worker.runtime.services import Lifecycle, Services

__all__ = ["JobFinisher"]

_log = structlog.get_logger()
#: A Redis error of the finishing round trip becomes RedisUnavailable("finishing a job: <error>").
_REDIS = RedisErrors("finishing a job: {error}")


class JobFinisher:
    """The outcome middleware's ``on_final``: write what a final outcome leaves behind."""

    def __init__(self, lifecycle: Lifecycle, exchange: str) -> None:
        self.lifecycle = lifecycle
        self.exchange = exchange

    def __call__(self, broker: Any, run: JobRun) -> None:
        outcome = run.outcome
        if outcome is None or not outcome.final:
            return
        services = self.lifecycle.services
        sent = outcome.kind is Outcome.SENT and outcome.ledger_key is not None
        commands: list[Sequence[Any]] = []
        steps: list[str] = []
        campaign = _campaign_of(run)
        if campaign is not None:
            counted = services.campaigns.outcome_commands(
                campaign, outcome.kind.value, outcome.dead_letter
            )
            commands += counted
            steps += ["campaign"] * len(counted)
        if sent:
            linked = services.receipts.link_commands(outcome.verloop_message_id, _link_of(run))
            if not linked:
                run.note(status_link="none: Verloop's message id cannot name a status")
            commands += linked
            steps += ["link"] * len(linked)
        event_pending = bool(self.exchange) and not outcome.quiet
        if event_pending and services.outbox is not None:
            try:
                commands.append(services.outbox.command(*run.event_fields()))
                steps.append("event")
            except Exception:  # noqa: BLE001 - an event that cannot be built must not undo the job
                event_pending = False
                run.note(event_published=False)
                self._failed(run, sent, "event", "the outcome event could not be encoded")
        holds = getattr(broker, "held_acks", None)
        if sent and holds is not None and services.ledger.carried is not None:
            self._record_later(broker, run, holds, commands, steps, event_pending)
        else:
            try:
                replies = self._write(services, outcome, commands, sent) if sent or commands else []
            except LedgerNotReplicated as written:
                # Written on the primary, not yet on a replica: acknowledged all the same (a
                # redelivery could only send it again); the ledger writes the record again later.
                replies = written.replies
                run.note(ledger="not_replicated")
                _log.warning("a sent message's record reached no replica in time; kept to rewrite")
            except RedisUnavailable as exc:
                replies = exc  # type: ignore[assignment]
            self._written(broker, run, steps, event_pending, replies)
        for fields, extra in outcome.events:
            self._publish(broker, run, fields, extra)

    def _record_later(
        self,
        broker: Any,
        run: JobRun,
        holds: Any,
        commands: list[Sequence[Any]],
        steps: list[str],
        event_pending: bool,
    ) -> None:
        """A sent job's writes, carried by the next claim (worker.send.carried). Its log line
        (``run.written_later``) and its acknowledgement (worker.runtime.consumer) wait for them."""
        outcome = run.outcome
        assert outcome is not None
        assert outcome.ledger_key is not None
        message_id, queue = run.ctx.message_id, run.ctx.queue
        later = run.written_later = Afterwards()
        holds.hold(queue, message_id)

        def written(result: list[Any] | RedisUnavailable) -> None:
            try:
                self._written(broker, run, steps, event_pending, result)
            finally:
                try:
                    later.done()
                finally:
                    holds.release(queue, message_id)

        self.lifecycle.services.ledger.mark_sent_later(
            outcome.ledger_key, outcome.verloop_message_id, written, also=commands
        )

    def _written(
        self,
        broker: Any,
        run: JobRun,
        steps: list[str],
        event_pending: bool,
        replies: list[Any] | RedisUnavailable,
    ) -> None:
        """What follows a final outcome's writes: each failed step logged and counted, the
        event published straight to RabbitMQ if it did not reach the outbox."""
        outcome = run.outcome
        assert outcome is not None
        sent = outcome.kind is Outcome.SENT and outcome.ledger_key is not None
        if isinstance(replies, RedisUnavailable):
            if sent:
                # Sent, but not written down: acknowledging is right (sending again is not).
                # The ledger writes the record with its next claim that reaches Redis; a
                # redelivery before that finds the claim and treats it as an uncertain outcome.
                run.note(ledger="not_recorded")
                self._failed(run, sent, "ledger", "a sent message could not be recorded")
            if _campaign_of(run) is not None:
                run.note(campaign_counted=False)
                _log.warning("campaign progress not counted: Redis did not answer")
            if event_pending:
                if "event" in steps:
                    run.note(event_outbox=False)
                self._publish(broker, run)
            return
        failed = {
            step for step, reply in zip(steps, replies, strict=True) if isinstance(reply, Exception)
        }
        for step in sorted(failed):
            self._failed(run, sent, step, f"Redis refused the job's {step} update")
        if "campaign" in failed:
            run.note(campaign_counted=False)
        if event_pending and ("event" not in steps or "event" in failed):
            self._publish(broker, run)

    @staticmethod
    def _write(
        services: Services, outcome: JobOutcome, commands: list[Sequence[Any]], sent: bool
    ) -> list[Any]:
        """Send the commands in one round trip (after the ledger record, for a send)."""
        if sent and outcome.ledger_key is not None:
            return services.ledger.mark_sent(
                outcome.ledger_key, outcome.verloop_message_id, also=commands
            )
        with _REDIS:
            return services.connections.execute(commands, raise_refusals=False)

    @staticmethod
    def _failed(run: JobRun, sent: bool, step: str, what: str) -> None:
        if sent:
            run.after_send_failures.append(step)
            _log.error(
                what + "; the message was sent and is not sent again",
                step=step,
                message_id=run.ctx.message_id,
            )
        else:
            _log.warning(what, step=step, message_id=run.ctx.message_id)

    def _publish(
        self,
        broker: Any,
        run: JobRun,
        fields: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish the job's event (or the given one) straight to RabbitMQ: tried once more on
        a fresh connection."""
        if fields is None:
            fields, extra = run.event_fields()
        for attempt in (1, 2):
            try:
                publish_event(broker.channel, self.exchange, fields, extra)
                return
            except (pika.exceptions.AMQPError, BrokerConnectionError) as exc:
                # A missing exchange closes the channel (404); a dead connection is replaced.
                del broker.connection
                if attempt == 2:
                    run.note(event_published=False)
                    _log.error("outcome event not published", error=type(exc).__name__)
                    return
                try:
                    declare_exchange(broker.channel, self.exchange)
                except (pika.exceptions.AMQPError, BrokerConnectionError):
                    del broker.connection


def _link_of(run: JobRun) -> Link:
    """What a status of this send will need to know of it (:mod:`worker.receipts.links`)."""
    facts = run.facts
    return Link(
        message_id=run.ctx.message_id,
        client_id=facts.client_id or "",
        phone_id=facts.phone_id or "",
        to=facts.to or "",
        lane=run.ctx.lane,
        sent_at=time.time(),
        campaign_id=facts.campaign_id,
        idempotency_key=facts.idempotency_key,
    )


def _campaign_of(run: JobRun) -> CampaignRef | None:
    facts = run.facts
    if facts.campaign_id and facts.client_id:
        return CampaignRef(facts.client_id, facts.campaign_id)
    return None
