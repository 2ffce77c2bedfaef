"""One receiver process: the webhook site, the metrics site, RabbitMQ, and a graceful stop.

On SIGTERM or SIGINT (or ``stop`` set) the sites stop accepting connections, the requests in
flight are answered (their batches published and confirmed, within ``SHUTDOWN_TIMEOUT_S``), and
only then is the RabbitMQ connection closed.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Any

import structlog
from aiohttp import web

from worker.observability.logging import mask_url
from worker.receipts.models import STATUS_QUEUE
from worker.settings import Settings
from worker.webhooks.metrics import ReceiverMetrics
from worker.webhooks.publisher import Publisher
from worker.webhooks.server import Receiver, create_app, create_metrics_app, registry_text

__all__ = ["serve"]

#: Connections waiting to be accepted (a burst of WhatsApp's retries arrives at once).
_BACKLOG = 1024
_log = structlog.get_logger("worker.webhooks")


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (None: until SIGTERM or SIGINT)."""
    publisher = Publisher(
        settings.amqp_url.get_secret_value(),
        status_exchange=settings.status_exchange,
        events_exchange=settings.events_exchange,
        timeout_s=settings.webhook_publish_timeout_s,
    )
    metrics = ReceiverMetrics()
    receiver = Receiver(settings, publisher, metrics)
    runners: list[web.AppRunner] = []
    stop = stop or _on_signals()
    try:
        webhook_site = (settings.webhook_bind, settings.webhook_port)
        runners.append(
            await _start(create_app(receiver), *webhook_site, settings.shutdown_timeout_s)
        )
        if settings.webhook_metrics_port:
            app = create_metrics_app(registry_text(metrics), lambda: _health(publisher))
            metrics_site = (settings.metrics_bind, settings.webhook_metrics_port)
            runners.append(await _start(app, *metrics_site, 5.0))
        await publisher.start()
        # Everything loaded so far lives as long as the process: a full garbage collection
        # would scan it all (about 50 ms here, every request waiting), so it is set aside.
        gc.collect()
        gc.freeze()
        _log.info(
            "webhook receiver listening",
            url=f"http://{settings.webhook_bind}:{settings.webhook_port}{settings.webhook_path}",
            metrics_port=settings.webhook_metrics_port or None,
            amqp=mask_url(settings.amqp_url.get_secret_value()),
            status_exchange=settings.status_exchange,
            status_queue=STATUS_QUEUE,
            events_exchange=settings.events_exchange,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        await stop.wait()
        _log.info("webhook receiver stopping: answering the requests in flight")
    finally:
        # The webhook site first: it stops accepting, then waits for the handlers in flight
        # (whose batches are published meanwhile); the connection closes last.
        for runner in runners:
            await runner.cleanup()
        await receiver.stop()
        await publisher.close()
    _log.info("webhook receiver stopped")


async def _start(
    app: web.Application, host: str, port: int, shutdown_timeout: float
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=_BACKLOG)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _health(publisher: Publisher) -> dict[str, Any]:
    return {"status": "ok", "rabbitmq": "connected" if publisher.connected else "not connected"}
