"""Wiring of the sandbox aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from aiohttp import web

from worker.sandbox import admin, api
from worker.sandbox.config import SandboxConfig
from worker.sandbox.faults import FaultEngine
from worker.sandbox.state import SandboxState

__all__ = ["SANDBOX_KEY", "Sandbox", "create_app"]


class Sandbox:
    """One simulated Verloop deployment: its state, fault engine and lifecycle."""

    def __init__(self, config: SandboxConfig) -> None:
        """Create fresh state from ``config``."""
        self.config = config
        self.state = SandboxState(
            config.clients,
            accept_unknown=config.accept_unknown_phones,
            system_user_token=config.system_user_token,
            message_log_limit=config.message_log_limit,
        )
        self.engine = FaultEngine(config.faults)
        # Set on shutdown so requests hanging in a simulated timeout answer at
        # once instead of holding the server's graceful shutdown open.
        self.closing = asyncio.Event()

    def reset(self, *, tokens: bool = False) -> None:
        """Clear messages, counters, script and faults; also phone tokens if ``tokens``."""
        self.state.reset(tokens=tokens)
        self.engine.reset()

    async def hang(self) -> None:
        """Wait ``faults.timeout_s`` seconds (or until shutdown)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), self.engine.faults.timeout_s)


SANDBOX_KEY: Final = web.AppKey("sandbox", Sandbox)


async def _on_shutdown(app: web.Application) -> None:
    app[SANDBOX_KEY].closing.set()


def create_app(config: SandboxConfig | None = None) -> web.Application:
    """Build the aiohttp application; ``app[SANDBOX_KEY]`` is its :class:`Sandbox`."""
    sandbox = Sandbox(config or SandboxConfig())
    app = web.Application()
    app[SANDBOX_KEY] = sandbox
    api.add_routes(app.router, sandbox)
    admin.add_routes(app.router, sandbox)
    app.on_shutdown.append(_on_shutdown)
    return app
