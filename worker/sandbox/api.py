"""Routes imitating Verloop's partner API, as in docs/verloop-api.md: auth, tokens, sends."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from worker.sandbox.faults import FaultResponse, default_error, refusal_code
from worker.sandbox.responses import (
    INVALID_JSON,
    bearer_token,
    graph_error,
    json_response,
    read_json,
    twirp_error,
)
from worker.sandbox.script import ScriptedResponse
from worker.sandbox.state import MessageRecord
from worker.sandbox.validation import digits_of

if TYPE_CHECKING:
    from worker.sandbox.deployment import Sandbox

__all__ = ["API_BASES", "AUTH_PATHS", "MESSAGE_TYPES", "add_routes"]

API_BASES: Final = ("/api/v2/whatsapp", "/whatsapp")
"""Current base path first; the older one is still served for old clients."""
AUTH_PATHS: Final = ("/api/v2/auth", "/auth")
MESSAGE_TYPES: Final = frozenset(
    {"text", "image", "document", "video", "audio", "template", "interactive"}
)
_MEDIA_TYPES: Final = frozenset({"image", "document", "video", "audio"})

_INVALID_TOKEN: Final = graph_error("Invalid OAuth access token.", 190)
_PAIR_LIMIT: Final = graph_error(
    "(Business Account, Consumer Account) pair rate limit hit", 131056, typed=False
)


class _BadMessage(ValueError):
    """A send body that Meta's API would refuse with error code 100."""


def _check_message(data: Any) -> tuple[str, str]:
    """Validate a Cloud-API-shaped message body; return ``(to, type)``."""
    if not isinstance(data, dict):
        raise _BadMessage("request body must be a JSON object")
    product = data.get("messaging_product", "whatsapp")
    if product != "whatsapp":
        raise _BadMessage('Param messaging_product must be "whatsapp"')
    to = data.get("to")
    if not isinstance(to, str) or not digits_of(to):
        raise _BadMessage("Param to is required and must be a phone number string")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise _BadMessage(f"Param type must be one of {', '.join(sorted(MESSAGE_TYPES))}")
    content = data.get(kind)
    if not isinstance(content, dict):
        raise _BadMessage(f"Param {kind} is required for type {kind} and must be an object")
    # Only the fields whose absence Meta rejects outright: enough to catch
    # malformed payloads from the worker without re-implementing Meta's schema.
    if kind == "text" and not (isinstance(content.get("body"), str) and content["body"]):
        raise _BadMessage("Param text['body'] is required")
    if kind in _MEDIA_TYPES and not any(isinstance(content.get(k), str) for k in ("id", "link")):
        raise _BadMessage(f"Param {kind} must contain id or link")
    if kind == "template" and not isinstance(content.get("name"), str):
        raise _BadMessage("Param template['name'] is required")
    if kind == "interactive" and not isinstance(content.get("type"), str):
        raise _BadMessage("Param interactive['type'] is required")
    return to, kind


class _Api:
    """Partner-API handlers bound to one :class:`Sandbox`."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._state = sandbox.state
        self._engine = sandbox.engine
        self._counters = sandbox.state.counters

    def _reply(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self._counters.responses[status] += 1
        return json_response(status, payload, headers)

    async def _latency(self) -> None:
        delay = self._engine.latency_s()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _enter(self, endpoint: str, request: web.Request) -> web.Response | None:
        """Count, delay and check the system-user token; return a 401 if it is wrong."""
        self._counters.requests[endpoint] += 1
        await self._latency()
        if not self._state.tokens.is_system_token(bearer_token(request)):
            return self._reply(
                401, twirp_error("unauthenticated", "invalid or missing system user token")
            )
        return None

    # --- auth -----------------------------------------------------------------

    async def auth(self, request: web.Request) -> web.Response:
        """``POST /api/v2/auth``: username/password -> system user token."""
        self._counters.requests["auth"] += 1
        await self._latency()
        data = await read_json(request)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("username"), str)
            or not isinstance(data.get("password"), str)
        ):
            return self._reply(
                400,
                twirp_error(
                    "invalid_argument", "body must be a JSON object with username and password"
                ),
            )
        config = self._sandbox.config
        if data["username"] != config.username or data["password"] != config.password:
            return self._reply(401, twirp_error("unauthenticated", "invalid username or password"))
        return self._reply(200, {"system_user_token": self._state.tokens.system_user_token})

    # --- phone tokens -----------------------------------------------------------

    def _phone_token(self, client_id: object, phone_id: object, key: str) -> web.Response:
        if not isinstance(client_id, str) or not client_id:
            return self._reply(400, twirp_error("invalid_argument", "client_id is required"))
        if not isinstance(phone_id, str) or not phone_id:
            return self._reply(400, twirp_error("invalid_argument", "phone_id is required"))
        refusal = self._engine.faults.phone_token_refusal(client_id, phone_id)
        if refusal is not None:
            return self._reply(
                refusal,
                twirp_error(
                    refusal_code(refusal),
                    f"unknown client_id/phone_id {client_id}/{phone_id}"
                    if refusal == 404
                    else f"not allowed to get a token for {client_id}/{phone_id}",
                ),
            )
        token = self._state.tokens.phone_token(client_id, phone_id)
        if token is None:
            return self._reply(
                404,
                twirp_error("not_found", f"unknown client_id/phone_id {client_id}/{phone_id}"),
            )
        return self._reply(200, {key: token})

    async def get_phone_token_query(self, request: web.Request) -> web.Response:
        """``GET .../get_phone_token?client_id=&phone_id=`` -> ``{"token": ...}``."""
        denied = await self._enter("get_phone_token", request)
        if denied is not None:
            return denied
        query = request.query
        return self._phone_token(query.get("client_id"), query.get("phone_id"), "token")

    async def get_phone_token_body(self, request: web.Request) -> web.Response:
        """``POST .../get_phone_token`` with a JSON body -> ``{"phone_number_token": ...}``."""
        denied = await self._enter("get_phone_token", request)
        if denied is not None:
            return denied
        data = await read_json(request)
        if not isinstance(data, dict):
            return self._reply(400, twirp_error("invalid_argument", "body must be a JSON object"))
        return self._phone_token(data.get("client_id"), data.get("phone_id"), "phone_number_token")

    async def list_clients(self, request: web.Request) -> web.Response:
        """``GET .../list_clients`` -> every client with its phone ids."""
        denied = await self._enter("list_clients", request)
        if denied is not None:
            return denied
        return self._reply(200, {"clients": self._state.tokens.clients()})

    # --- send -----------------------------------------------------------------

    async def send_message(self, request: web.Request) -> web.Response:
        """``POST .../send_message`` authenticated with a phone token."""
        self._counters.send_started()
        try:
            return await self._send(request)
        finally:
            self._counters.send_finished()

    async def _send(self, request: web.Request) -> web.Response:
        # The body is read before the latency: a request that reached the server is handled
        # even if its client goes away while it waits (a worker killed mid-call), as a real
        # server would; the message may be delivered although nobody reads the answer.
        data = await read_json(request)
        await self._latency()
        pair = self._state.tokens.resolve(bearer_token(request))
        if pair is None:
            return self._reply(401, _INVALID_TOKEN)
        if data is INVALID_JSON:
            return self._reply(400, graph_error("request body is not valid JSON", 100))
        try:
            to, kind = _check_message(data)
        except _BadMessage as exc:
            return self._reply(400, graph_error(str(exc), 100))
        wa_id = digits_of(to)
        client_id, phone_id = pair

        scripted = self._engine.script.take(wa_id)
        if scripted is not None:
            self._counters.scripted_responses += 1
            if not scripted.passes_through:
                return await self._scripted(scripted)
            if scripted.delay_ms:
                # A slow success: the send is recorded, its answer comes late.
                await asyncio.sleep(scripted.delay_ms / 1000.0)
        else:
            fault = self._engine.draw()
            if fault is not None:
                return await self._fault(fault)

        verdict = self._engine.check_limits(phone_id, wa_id)
        if verdict.exceeded is not None:
            if verdict.rejected:
                self._counters.rejected_rate_limited += 1
                if verdict.exceeded == "per_pair":
                    self._counters.rejected_pair_limited += 1
                    return self._reply(400, _PAIR_LIMIT)
                body, _ = default_error(429)
                return self._reply(429, body, {"Retry-After": str(verdict.retry_after_s)})
            self._counters.rate_limit_violations += 1

        wamid = "wamid." + secrets.token_hex(16)
        record: MessageRecord = {
            "id": wamid,
            "client_id": client_id,
            "phone_id": phone_id,
            "to": to,
            "type": kind,
            "body": data,
            "idempotency_key": request.headers.get("Idempotency-Key"),
            "received_at": time.time(),
        }
        counters = self._counters
        if self._state.messages.add(record):
            counters.duplicates += 1
        counters.sent += 1
        counters.by_phone[phone_id] += 1
        # Accepted, so WhatsApp reports on it, even if the sender never learns the wamid below.
        self._sandbox.statuses.on_sent(record)
        if scripted is not None and scripted.after_accept is not None:
            # Sent, and the sender does not learn it: the ambiguous outcome. A hang answers
            # 504 after timeout_s, long after a client's read timeout (set timeout_s so).
            counters.injected_timeouts += 1
            if scripted.after_accept == "drop" and request.transport is not None:
                request.transport.abort()
            else:
                await self._sandbox.hang()
            body, headers = default_error(504)
            return self._reply(504, body, headers)
        return self._reply(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": wa_id}],
                "messages": [{"id": wamid}],
            },
        )

    async def _fault(self, fault: FaultResponse) -> web.Response:
        if fault.timeout:
            self._counters.injected_timeouts += 1
            await self._sandbox.hang()
        else:
            self._counters.injected_errors += 1
        body, headers = default_error(fault.status)
        return self._reply(fault.status, body, headers)

    async def _scripted(self, entry: ScriptedResponse) -> web.Response:
        if entry.delay_ms:
            await asyncio.sleep(entry.delay_ms / 1000.0)
        if entry.timeout:
            await self._sandbox.hang()
            body, headers = default_error(504)
            return self._reply(504, body, headers)
        default_body, default_headers = default_error(entry.status)
        return self._reply(
            entry.status,
            default_body if entry.body is None else entry.body,
            default_headers if entry.headers is None else entry.headers,
        )


def add_routes(router: web.UrlDispatcher, sandbox: Sandbox) -> None:
    """Register the partner-API routes (under every base path) for ``sandbox``."""
    handlers = _Api(sandbox)
    for path in AUTH_PATHS:
        router.add_post(path, handlers.auth)
    for base in API_BASES:
        router.add_get(f"{base}/get_phone_token", handlers.get_phone_token_query)
        router.add_post(f"{base}/get_phone_token", handlers.get_phone_token_body)
        router.add_get(f"{base}/list_clients", handlers.list_clients)
        router.add_post(f"{base}/send_message", handlers.send_message)
