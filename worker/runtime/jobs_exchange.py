"""The jobs exchange: a direct exchange that reaches the job queues and nothing else; and the
statuses exchange, which reaches the status queue alone (the webhook receiver's only way in).

Write permission on the default exchange reaches every queue of the vhost (dead letters, delay
queues, event queues); ``JOBS_EXCHANGE`` lets a producer enqueue jobs and nothing else (README.md,
"Producers that may only enqueue"). Each worker process declares it and its bindings at boot,
after its queues; the worker itself keeps publishing retries, delays and replays through the
default exchange.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import pika.exceptions
import structlog
from dramatiq.middleware import Middleware

from worker.connections.amqp import close_quietly, open_connection
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.receipts.models import STATUS_QUEUE

__all__ = ["JOB_QUEUES", "JobsExchange", "declare_jobs_exchange"]

#: The queues the jobs exchange reaches (routing key = queue name).
JOB_QUEUES: Final = (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE)

_log = structlog.get_logger()


def declare_jobs_exchange(channel: Any, exchange: str, status_exchange: str | None = None) -> None:
    """Declare ``exchange`` (direct, durable) and bind each job queue to it, and the same for
    ``status_exchange`` and the status queue; the queues must exist already."""
    for name, queues in ((exchange, JOB_QUEUES), (status_exchange, (STATUS_QUEUE,))):
        if name is None:
            continue
        channel.exchange_declare(name, exchange_type="direct", durable=True)
        for queue in queues:
            channel.queue_bind(queue, name, routing_key=queue)


class JobsExchange(Middleware):
    """Declares the jobs exchange and its bindings when a worker boots.

    Runs after the broker declared the queues (its own middleware comes first). Should
    RabbitMQ not answer then, the worker still starts (its consumers declare the queues once
    RabbitMQ is back) and a thread tries again every ``retry_s`` until the bindings exist.
    """

    def __init__(
        self,
        amqp_url: str,
        exchange: str,
        *,
        status_exchange: str | None = None,
        retry_s: float = 5.0,
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.status_exchange = status_exchange
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._retrying: threading.Thread | None = None

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        if not self._declare(log_failure=True):
            self._stop.clear()
            self._retrying = threading.Thread(target=self._retry, name="jobs-exchange", daemon=True)
            self._retrying.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()

    def _retry(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self._declare(log_failure=False):
                _log.info("jobs exchange declared", exchange=self.exchange)
                return

    def _declare(self, *, log_failure: bool) -> bool:
        try:
            connection = open_connection(self.amqp_url)
        except (pika.exceptions.AMQPError, OSError) as exc:
            return self._failed(exc, log_failure)
        try:
            declare_jobs_exchange(connection.channel(), self.exchange, self.status_exchange)
        except (pika.exceptions.AMQPError, OSError) as exc:
            return self._failed(exc, log_failure)
        finally:
            close_quietly(connection)
        return True

    def _failed(self, exc: BaseException, log_failure: bool) -> bool:
        if log_failure:
            _log.warning(
                "could not declare the jobs exchange; trying again",
                exchange=self.exchange,
                error=f"{type(exc).__name__}: {exc}",
                retry_s=self.retry_s,
            )
        return False
