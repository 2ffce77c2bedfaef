"""The receiver's HTTP side (aiohttp): WhatsApp's webhook on ``WEBHOOK_PATH``, and a second
small site with ``/metrics`` and ``/healthz`` on ``WEBHOOK_METRICS_PORT``.

A POST is answered, in this order: 413 when its body is over ``WEBHOOK_MAX_BODY_BYTES`` (unread,
the connection closed), 401 when the signature is missing or wrong (nothing published), 400
when it is not a webhook body, 503 when RabbitMQ did not confirm every publish the body asked
for within ``WEBHOOK_PUBLISH_TIMEOUT_S`` (the sender retries), else 200. A GET with
``hub.mode=subscribe`` and the right ``hub.verify_token`` gets its ``hub.challenge`` back; 403
otherwise. Neither the app secret, the verify token nor the signature header is ever logged or
answered.

Why aiohttp: a well-kept asyncio HTTP server the project already uses (the simulator), with a C
HTTP parser, keep-alive, body size limits and a graceful shutdown that waits for the handlers in
flight; on uvloop it takes about 0.16 ms of CPU per webhook (bench/webhooks.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.settings import Settings
from worker.webhooks.batcher import Batcher, encode_statuses
from worker.webhooks.mapping import InboundEvent, MalformedBody, map_body
from worker.webhooks.metrics import ReceiverMetrics
from worker.webhooks.publisher import Publisher
from worker.webhooks.signature import signature_ok, token_ok
from worker.webhooks.throttle import LogThrottle

__all__ = ["Receiver", "create_app", "create_metrics_app", "registry_text"]

#: What a verification challenge may be (Meta's is a number); it is answered back as text.
_CHALLENGE = re.compile(r"[!-~]{1,256}")
_TEXT: Final = "text/plain"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_log = structlog.get_logger("worker.webhooks")


class Receiver:
    """The webhook's handlers, with what they share: the secret, the batcher, the metrics."""

    def __init__(self, settings: Settings, publisher: Publisher, metrics: ReceiverMetrics) -> None:
        if settings.webhook_app_secret is None:
            raise ValueError("WEBHOOK_APP_SECRET is not set")
        self._secret = settings.webhook_app_secret.get_secret_value().encode("utf-8")
        token = settings.webhook_verify_token
        self._verify_token = token.get_secret_value().encode("utf-8") if token else None
        self.path = settings.webhook_path
        self.header = settings.webhook_signature_header
        self.max_bytes = settings.webhook_max_body_bytes
        self.timeout_s = settings.webhook_publish_timeout_s
        self.publisher = publisher
        self.metrics = metrics
        self.batcher = Batcher(
            publisher.publish_job,
            max_size=settings.webhook_batch_max,
            linger_s=settings.webhook_batch_linger_ms / 1000,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._throttle = LogThrottle()

    # --- POST: statuses and messages --------------------------------------------------------------
    async def post(self, request: web.Request) -> web.Response:
        """A webhook body (see the module docstring)."""
        received_at_ms = int(time.time() * 1000)
        length = request.content_length
        if length is not None and length > self.max_bytes:
            return self._too_large(length)
        try:
            body = await request.read()  # the application's client_max_size bounds it
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        if not signature_ok(request.headers.get(self.header), body, self._secret):
            self._throttle.warning(
                "bad_signature",
                "webhook refused: signature missing or wrong (is WEBHOOK_APP_SECRET the app's?)",
                peer=request.remote,
                has_signature=self.header in request.headers,
            )
            return self._answer(401, "bad_signature", "signature missing or wrong")
        try:
            mapped = map_body(orjson.loads(body), received_at_ms)
        except (orjson.JSONDecodeError, MalformedBody) as exc:
            why = str(exc) if isinstance(exc, MalformedBody) else "the body is not JSON"
            self._throttle.warning("malformed", "webhook refused: not a webhook body", why=why)
            return self._answer(400, "malformed", f"malformed body: {why}")
        if mapped.ignored:
            self._throttle.info(
                "ignored",
                "webhook items ignored",
                count=len(mapped.ignored),
                reasons=sorted(set(mapped.ignored))[:5],
            )
        for invalid in mapped.invalid:
            self._throttle.info(
                "invalid_status",
                "a status that does not fit the record_statuses job: published alone, for the "
                "status actor to dead-letter with its reason",
                reason=invalid.reason,
            )
        try:  # before anything is published: a body that cannot go out whole is refused
            alone = [encode_statuses([invalid.kwargs]) for invalid in mapped.invalid]
            events = [(event, orjson.dumps(event.body)) for event in mapped.events]
        except (TypeError, ValueError, RecursionError):
            why = "a status or message nests too deeply to be published"
            self._throttle.warning("malformed", "webhook refused: not a webhook body", why=why)
            return self._answer(400, "malformed", f"malformed body: {why}")
        waits: list[asyncio.Future[None]] = list(self.batcher.add(mapped.statuses))
        waits += [self._background(self.publisher.publish_job(*job)) for job in alone]
        waits += [self._background(self._publish_event(*event)) for event in events]
        if waits and not await self._confirmed(waits):
            return self._answer(503, "unavailable", "not stored; try again later")
        items = self.metrics.items
        items["status"].inc(len(mapped.statuses) + len(mapped.invalid))
        items["message"].inc(len(mapped.events))
        items["ignored"].inc(len(mapped.ignored))
        return self._answer(200, "accepted", "ok")

    async def _confirmed(self, waits: list[asyncio.Future[None]]) -> bool:
        """Wait for every publish of a body; False when one failed or the time is up."""
        started = time.perf_counter()
        done, pending = await asyncio.wait(waits, timeout=self.timeout_s)
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        if pending:
            self._throttle.warning(
                "confirm_timeout",
                "RabbitMQ did not confirm in time (WEBHOOK_PUBLISH_TIMEOUT_S); answering 503",
                timeout_s=self.timeout_s,
            )
            return False
        return all(not future.cancelled() and future.exception() is None for future in done)

    async def _publish_event(self, event: InboundEvent, body: bytes) -> None:
        kind = str(event.body["event"])
        await self.publisher.publish_event(event.routing_key, body, event.message_id, kind)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """A task kept alive (and its failure retrieved) even if the request stops waiting."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(_forget(self._tasks))
        return task

    def _too_large(self, length: int | None) -> web.Response:
        self._throttle.warning(
            "too_large",
            "webhook refused: body over WEBHOOK_MAX_BODY_BYTES",
            content_length=length,
            limit=self.max_bytes,
        )
        response = self._answer(413, "too_large", "body too large")
        response.force_close()  # the rest of the body is not read
        return response

    def _answer(self, status: int, result: str, text: str) -> web.Response:
        self.metrics.requests[result].inc()
        return web.Response(status=status, text=text, content_type=_TEXT)

    # --- GET: verification ----------------------------------------------------------------------
    async def verify(self, request: web.Request) -> web.Response:
        """Meta's verification request: the challenge back when the token is right."""
        query = request.query
        challenge = query.get("hub.challenge", "")
        if (
            query.get("hub.mode") == "subscribe"
            and _CHALLENGE.fullmatch(challenge)
            and token_ok(query.get("hub.verify_token"), self._verify_token)
        ):
            _log.info("webhook verified (hub.mode=subscribe)", peer=request.remote)
            return self._answer(200, "verified", challenge)
        self._throttle.warning(
            "verify_refused",
            "webhook verification refused"
            + ("" if self._verify_token else ": WEBHOOK_VERIFY_TOKEN is not set"),
            mode=str(query.get("hub.mode", ""))[:20],
            peer=request.remote,
        )
        return self._answer(403, "verify_refused", "verification refused")

    async def stop(self) -> None:
        """Publish the open batch and wait for what is still being published."""
        await self.batcher.drain()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout_s)


def create_app(receiver: Receiver) -> web.Application:
    """The public application: ``WEBHOOK_PATH`` (POST, GET), every other path counted 404."""

    @web.middleware
    async def count_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            receiver.metrics.requests["not_found"].inc()
            raise

    app = web.Application(client_max_size=receiver.max_bytes, middlewares=[count_not_found])
    app.router.add_post(receiver.path, receiver.post)
    app.router.add_get(receiver.path, receiver.verify, allow_head=False)
    return app


def create_metrics_app(
    registry_text: Callable[[], bytes], healthy: Callable[[], dict[str, Any]]
) -> web.Application:
    """``/metrics`` (Prometheus text) and ``/healthz`` (200 while the process serves; its JSON
    says whether RabbitMQ is connected)."""

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=registry_text())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(healthy())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


def registry_text(metrics: ReceiverMetrics) -> Callable[[], bytes]:
    """The exposition of one process's metrics."""
    return lambda: generate_latest(metrics.registry)


def _forget(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # seen: the request reported it, or had stopped waiting

    return done
