"""Wiring of the sandbox aiohttp application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from worker.sandbox import admin, api
from worker.sandbox.config import SandboxConfig
from worker.sandbox.deployment import Sandbox

__all__ = ["SANDBOX_KEY", "create_app"]


SANDBOX_KEY: Final = web.AppKey("sandbox", Sandbox)


async def _on_shutdown(app: web.Application) -> None:
    app[SANDBOX_KEY].closing.set()


async def _status_webhooks(app: web.Application) -> AsyncIterator[None]:
    """Post status webhooks while the server runs."""
    statuses = app[SANDBOX_KEY].statuses
    await statuses.start()
    yield
    await statuses.stop()


def create_app(config: SandboxConfig | None = None) -> web.Application:
    """Build the aiohttp application; ``app[SANDBOX_KEY]`` is its :class:`Sandbox`."""
    sandbox = Sandbox(config or SandboxConfig())
    app = web.Application()
    app[SANDBOX_KEY] = sandbox
    api.add_routes(app.router, sandbox)
    admin.add_routes(app.router, sandbox)
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_status_webhooks)
    return app
