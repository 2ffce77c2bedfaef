"""The Verloop HTTP client: one per worker process, owned by the worker lifecycle.

Every call goes through :meth:`VerloopClient._call`, the one place where httpx exceptions and
non-2xx answers become our errors (:mod:`worker.errors`). Tokens travel only in the
``Authorization`` header; nothing here formats a token into a message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
import orjson

from worker.errors import OutcomeUnknown, PermanentFailure, TransientFailure
from worker.verloop.classify import classify_response
from worker.verloop.endpoints import Endpoint, pick
from worker.verloop.transport import DirectTransport, read_bounded

__all__ = ["MAX_RESPONSE_BYTES", "SendResult", "VerloopClient"]

_HEADERS = {"User-Agent": "verloop-worker/0.1", "Accept": "application/json"}
#: A call with a JSON body: encoded by orjson (httpx's own encoder, the standard library's, costs
#: about a third of building the request; both write the same compact UTF-8).
_JSON_HEADERS = _HEADERS | {"Content-Type": "application/json"}
_RAW_HEADERS = [(k.encode(), v.encode()) for k, v in _HEADERS.items()]
_RAW_JSON_HEADERS = [(k.encode(), v.encode()) for k, v in _JSON_HEADERS.items()]
#: Verloop's answers are small JSON objects: more than this is not read (what was read is kept).
MAX_RESPONSE_BYTES = 1024 * 1024
#: Failures that mean the request never reached Verloop whole: sending it again is safe. Any
#: other transport failure (a read timeout, a connection dropped before the answer) came after
#: the request was written, and Verloop may have acted on it.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
    httpx.LocalProtocolError,
    httpx.UnsupportedProtocol,
    httpx.ProxyError,
)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: Any


@dataclass(frozen=True, slots=True)
class SendResult:
    """What Verloop answered to an accepted send."""

    message_id: str | None
    http_status: int


class VerloopClient:
    """Calls Verloop's partner API through the endpoint table.

    Args:
        base_url: ``https://partners.verloop.io`` (no trailing slash).
        api_prefix: ``/api/v2/whatsapp``; prepended to every path not marked ``from_root``.
        endpoints: the resolved endpoint table.
        timeout: per-call timeouts; a call never waits longer than these.
        limits: the bounds of each thread's connection pool.
        transport: a seam for tests (``httpx.MockTransport``), shared by every thread.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_prefix: str,
        endpoints: dict[str, Endpoint],
        timeout: httpx.Timeout,
        limits: httpx.Limits,
        transport: httpx.BaseTransport | None = None,
        observe: Callable[[str, str, str, float], None] | None = None,
    ) -> None:
        self._endpoints = endpoints
        prefix = "/" + api_prefix.strip("/") if api_prefix.strip("/") else ""
        self._urls = {
            name: httpx.URL(base_url.rstrip("/") + ("" if e.from_root else prefix) + e.path)
            for name, e in endpoints.items()
        }
        # httpx's transport (its public, lower layer) rather than httpx.Client: we use none of
        # the client's per-request features (base-URL merging, cookies, auth, redirects).
        # Timeouts travel with each request, as httpx.Client would send them, and are kept by
        # the kernel on the transport's sockets (worker.verloop.transport).
        #
        # Each thread has a connection pool of its own: a worker thread makes one call at a time,
        # and httpx's pool looks over every connection it holds (a poll of each idle one) at the
        # start and the end of each call, so a pool shared by T threads cost T times that.
        self._shared = transport
        self._timeout, self._limits = timeout, limits
        self._local = threading.local()
        self._opened: list[DirectTransport] = []
        self._opened_lock = threading.Lock()
        self._extensions = {"timeout": timeout.as_dict()}
        #: Called after every call with (endpoint, status, code, seconds): the metrics hook.
        self._observe = observe

    def close(self) -> None:
        """Close every thread's connection pool (a later call opens one again)."""
        if self._shared is not None:
            self._shared.close()
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for transport in opened:
            transport.close()
        self._local = threading.local()

    def _transport(self) -> DirectTransport:
        """This thread's connection pool."""
        transport: DirectTransport | None = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = DirectTransport(self._timeout, self._limits)
            with self._opened_lock:
                self._opened.append(transport)
        return transport

    # --- documented calls ----------------------------------------------------------------------
    def authenticate(self, username: str, password: str) -> str:
        """Exchange a username and password for the system user token."""
        answer = self._call("auth", token=None, json={"username": username, "password": password})
        return self._value(answer, "auth")

    def get_phone_token(
        self, system_token: str, client_id: str, phone_id: str, *, legacy: bool = False
    ) -> str:
        """Get (or have Verloop generate) the token of one sending number."""
        ids = {"client_id": client_id, "phone_id": phone_id}
        if legacy:
            answer = self._call("get_phone_token_legacy", token=system_token, json=ids)
            return self._value(answer, "get_phone_token_legacy")
        answer = self._call("get_phone_token", token=system_token, params=ids)
        return self._value(answer, "get_phone_token")

    def list_clients(self, system_token: str) -> Any:
        """The partner's clients, as Verloop returns them (the shape is not public)."""
        return self._call("list_clients", token=system_token).body

    # --- modeled calls -------------------------------------------------------------------------
    def send_message(
        self, phone_token: str, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> SendResult:
        """Send one message; ``body`` is the Cloud-API-shaped message object."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        answer = self._call("send", token=phone_token, json=body, headers=headers)
        # A 2xx means Verloop accepted the message, even if we cannot find its id: the send
        # must not be retried or dead-lettered for that (it would message the customer twice).
        message_id = pick(answer.body, self._endpoints["send"].response_keys)
        return SendResult(
            message_id=None if message_id is None else str(message_id),
            http_status=answer.status,
        )

    # --- the boundary --------------------------------------------------------------------------
    def _call(
        self,
        name: str,
        *,
        token: str | None,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        content = b"" if json is None else orjson.dumps(json)
        extra = {"Authorization": token or ""} | (headers or {})
        started = time.perf_counter()
        try:
            status, answer_headers, answer = self._exchange(name, content, params, extra)
        except _NOT_SENT as exc:
            self._observed(name, _failure_status(exc), "", started)
            what = "timed out before" if isinstance(exc, httpx.TimeoutException) else "failed in"
            raise TransientFailure(
                f"{name} could not reach Verloop: {what} sending the request ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            self._observed(name, _failure_status(exc), "", started)
            what = "timed out waiting for" if isinstance(exc, httpx.TimeoutException) else "lost"
            raise OutcomeUnknown(
                f"{name} {what} Verloop's answer after the request was sent ({type(exc).__name__})"
            ) from None
        if not 200 <= status < 300:
            failure = classify_response(status, answer, httpx.Headers(answer_headers), what=name)
            self._observed(name, str(status), failure.details.code or "", started)
            raise failure
        self._observed(name, str(status), "", started)
        try:
            body = orjson.loads(answer) if answer else None
        except ValueError:
            body = None  # callers that need a value say so; a send is accepted regardless
        return _Answer(status, body)

    def _exchange(
        self, name: str, content: bytes, params: dict[str, str] | None, extra: dict[str, str]
    ) -> tuple[int, Any, bytes]:
        """One call's status, headers and body (at most MAX_RESPONSE_BYTES of it).

        Raises:
            httpx.TransportError: no answer.
        """
        endpoint = self._endpoints[name]
        if self._shared is not None:  # a test's transport: through httpx's objects
            request = httpx.Request(
                endpoint.method,
                self._urls[name],
                content=content or None,
                params=params,
                headers=(_JSON_HEADERS if content else _HEADERS) | extra,
                extensions=self._extensions,
            )
            response = self._shared.handle_request(request)
            try:
                body = _read_bounded(response)
            finally:
                response.close()
            return response.status_code, response.headers, body
        url = self._urls[name] if params is None else self._urls[name].copy_merge_params(params)
        head = [
            (b"Host", url.netloc),
            *(_RAW_JSON_HEADERS if content else _RAW_HEADERS),
            *((k.encode("ascii"), v.encode("ascii")) for k, v in extra.items()),
        ]
        if content or endpoint.method in ("POST", "PUT", "PATCH"):  # as httpx adds it
            head.append((b"Content-Length", str(len(content)).encode()))
        target = httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        )
        return self._transport().exchange(
            endpoint.method.encode(), target, head, content, self._extensions, MAX_RESPONSE_BYTES
        )

    def _observed(self, name: str, status: str, code: str, started: float) -> None:
        if self._observe is not None:
            self._observe(name, status, code, time.perf_counter() - started)

    def _value(self, answer: _Answer, name: str) -> str:
        value = pick(answer.body, self._endpoints[name].response_keys)
        if not isinstance(value, str) or not value:
            keys = ", ".join(self._endpoints[name].response_keys)
            raise PermanentFailure(
                f"{name} answered without any of the expected keys ({keys}); "
                "correct them with VERLOOP_ENDPOINTS",
                http_status=answer.status,
            )
        return value


def _read_bounded(response: httpx.Response) -> bytes:
    """The answer's body, at most :data:`MAX_RESPONSE_BYTES` of it. A body cut short (the
    connection dropped while it came) is what arrived: the status has been answered already."""
    try:
        return response.content[:MAX_RESPONSE_BYTES]  # in memory already (a test transport's)
    except httpx.ResponseNotRead:
        pass
    return read_bounded(
        response.iter_raw(),
        MAX_RESPONSE_BYTES,
        cut=lambda exc: isinstance(exc, httpx.TransportError),
    )


def _failure_status(exc: httpx.TransportError) -> str:
    """The ``status`` label of a call that got no answer."""
    return "timeout" if isinstance(exc, httpx.TimeoutException) else "error"
