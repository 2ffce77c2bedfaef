"""Unauthenticated ``/admin/*`` routes for tests and demos to inspect and steer the sandbox.

Admin requests are not counted in ``/admin/stats`` and get no injected latency,
so polling the sandbox never disturbs what is being measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from worker.sandbox.faults import Faults
from worker.sandbox.responses import INVALID_JSON, json_response, read_json
from worker.sandbox.script import ScriptedResponse
from worker.sandbox.statuses import StatusCallbacks
from worker.sandbox.validation import FaultConfigError, digits_of

if TYPE_CHECKING:
    from worker.sandbox.deployment import Sandbox

__all__ = ["add_routes"]


class _AdminError(Exception):
    """Bad admin request; answered with 400 ``{"error": message}``."""


def _bad(message: str) -> web.Response:
    return json_response(400, {"error": message})


async def _json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """Return the body as a JSON object; an empty body counts as ``{}`` if ``optional``."""
    if optional and not await request.read():
        return {}
    data = await read_json(request)
    if data is INVALID_JSON:
        raise _AdminError("request body is not valid JSON")
    if not isinstance(data, dict):
        raise _AdminError("request body must be a JSON object")
    return data


def _string(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _AdminError(f"{key} is required and must be a non-empty string")
    return value


class _Admin:
    """Admin handlers bound to one :class:`Sandbox`."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    async def health(self, request: web.Request) -> web.Response:
        """``GET /admin/health`` -> ``{"ok": true}``."""
        return json_response(200, {"ok": True})

    async def messages(self, request: web.Request) -> web.Response:
        """``GET /admin/messages[?to=&phone_id=&client_id=&limit=]`` -> recorded sends."""
        query = request.query
        to = query.get("to")
        limit = query.get("limit")
        if limit is not None and not limit.isdigit():
            return _bad("limit must be a non-negative integer")
        records = list(
            self._sandbox.state.messages.query(
                wa_id=None if to is None else digits_of(to),
                phone_id=query.get("phone_id"),
                client_id=query.get("client_id"),
            )
        )
        if limit is not None:
            records = records[len(records) - int(limit) :] if int(limit) else []
        return json_response(200, {"messages": records})

    async def stats(self, request: web.Request) -> web.Response:
        """``GET /admin/stats`` -> counters."""
        stats = self._sandbox.state.counters.to_json()
        stats["recorded_messages"] = len(self._sandbox.state.messages)
        stats["scripted_pending"] = self._sandbox.engine.script.pending()
        statuses = self._sandbox.statuses
        stats["statuses"] = statuses.stats.to_json(statuses.pending)
        return json_response(200, stats)

    async def reset(self, request: web.Request) -> web.Response:
        """``POST /admin/reset [{"tokens": true}]`` -> clear messages, counters, faults, script;
        the status webhooks back to the configured ones."""
        try:
            data = await _json_object(request, optional=True)
        except _AdminError as exc:
            return _bad(str(exc))
        tokens = data.get("tokens", False)
        if not isinstance(tokens, bool):
            return _bad("tokens must be a boolean")
        self._sandbox.reset(tokens=tokens)
        return json_response(200, {"ok": True})

    async def get_faults(self, request: web.Request) -> web.Response:
        """``GET /admin/faults`` -> the active fault config (the shape PUT accepts)."""
        return json_response(200, self._sandbox.engine.faults.to_json())

    async def put_faults(self, request: web.Request) -> web.Response:
        """``PUT /admin/faults`` -> replace the whole fault config (missing keys = default)."""
        return await self._set_faults(request, merge=False)

    async def patch_faults(self, request: web.Request) -> web.Response:
        """``PATCH /admin/faults`` -> change only the given keys of the fault config."""
        return await self._set_faults(request, merge=True)

    async def _set_faults(self, request: web.Request, *, merge: bool) -> web.Response:
        engine = self._sandbox.engine
        try:
            data = await _json_object(request)
            if merge:
                data = {**engine.faults.to_json(), **data}
            faults = Faults.from_json(data)
        except (_AdminError, FaultConfigError) as exc:
            return _bad(str(exc))
        engine.configure(faults)
        return json_response(200, faults.to_json())

    async def get_statuses(self, request: web.Request) -> web.Response:
        """``GET /admin/statuses`` -> the status webhook settings (the secret only as
        ``app_secret_set``)."""
        return json_response(200, self._sandbox.statuses.config.to_json())

    async def put_statuses(self, request: web.Request) -> web.Response:
        """``PUT /admin/statuses`` -> the configured settings with the given keys replaced."""
        return await self._set_statuses(request, base=self._sandbox.statuses.configured)

    async def patch_statuses(self, request: web.Request) -> web.Response:
        """``PATCH /admin/statuses`` -> the active settings with the given keys replaced."""
        return await self._set_statuses(request, base=self._sandbox.statuses.config)

    async def _set_statuses(self, request: web.Request, *, base: StatusCallbacks) -> web.Response:
        try:
            config = StatusCallbacks.from_json(await _json_object(request), base=base)
        except (_AdminError, FaultConfigError) as exc:
            return _bad(str(exc))
        self._sandbox.statuses.configure(config)
        return json_response(200, config.to_json())

    async def get_script(self, request: web.Request) -> web.Response:
        """``GET /admin/script`` -> scripted responses not yet consumed."""
        script = self._sandbox.engine.script
        return json_response(200, {"pending": script.pending(), "responses": script.to_json()})

    async def add_script(self, request: web.Request) -> web.Response:
        """``POST /admin/script {"responses": [...]}`` -> append scripted send responses."""
        try:
            data = await _json_object(request)
            entries = data.get("responses")
            if not isinstance(entries, list) or not entries:
                raise _AdminError("responses must be a non-empty list")
            parsed = [ScriptedResponse.from_json(entry) for entry in entries]
        except (_AdminError, FaultConfigError) as exc:
            return _bad(str(exc))
        script = self._sandbox.engine.script
        script.extend(parsed)
        return json_response(200, {"pending": script.pending()})

    async def revoke_phone_token(self, request: web.Request) -> web.Response:
        """``POST /admin/revoke_phone_token {"client_id", "phone_id"}`` -> new token."""
        try:
            data = await _json_object(request)
            client_id, phone_id = _string(data, "client_id"), _string(data, "phone_id")
        except _AdminError as exc:
            return _bad(str(exc))
        token = self._sandbox.state.tokens.revoke_phone_token(client_id, phone_id)
        if token is None:
            return json_response(404, {"error": f"unknown client/phone {client_id}/{phone_id}"})
        return json_response(200, {"client_id": client_id, "phone_id": phone_id, "token": token})

    async def revoke_system_token(self, request: web.Request) -> web.Response:
        """``POST /admin/revoke_system_token`` -> new system user token; the old one gets 401."""
        token = self._sandbox.state.tokens.revoke_system_token()
        return json_response(200, {"system_user_token": token})


def add_routes(router: web.UrlDispatcher, sandbox: Sandbox) -> None:
    """Register the ``/admin/*`` routes for ``sandbox``."""
    admin = _Admin(sandbox)
    router.add_get("/admin/health", admin.health)
    router.add_get("/admin/messages", admin.messages)
    router.add_get("/admin/stats", admin.stats)
    router.add_post("/admin/reset", admin.reset)
    router.add_get("/admin/faults", admin.get_faults)
    router.add_put("/admin/faults", admin.put_faults)
    router.add_patch("/admin/faults", admin.patch_faults)
    router.add_get("/admin/statuses", admin.get_statuses)
    router.add_put("/admin/statuses", admin.put_statuses)
    router.add_patch("/admin/statuses", admin.patch_statuses)
    router.add_get("/admin/script", admin.get_script)
    router.add_post("/admin/script", admin.add_script)
    router.add_post("/admin/revoke_phone_token", admin.revoke_phone_token)
    router.add_post("/admin/revoke_system_token", admin.revoke_system_token)
