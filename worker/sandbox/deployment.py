"""One simulated Verloop deployment: its state, fault engine, status webhooks and shutdown."""

from __future__ import annotations

import asyncio
import contextlib

from worker.sandbox.config import SandboxConfig
from worker.sandbox.faults import FaultEngine
from worker.sandbox.state import SandboxState
from worker.sandbox.status_sender import StatusSender

__all__ = ["Sandbox"]


class Sandbox:
    """One simulated Verloop deployment: its state, fault engine, status webhooks and lifecycle."""

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
        self.statuses = StatusSender(config.statuses)
        # Set on shutdown so requests hanging in a simulated timeout answer at
        # once instead of holding the server's graceful shutdown open.
        self.closing = asyncio.Event()

    def reset(self, *, tokens: bool = False) -> None:
        """Clear messages, counters, script and faults, restore the configured status webhooks
        (waiting statuses are forgotten); also phone tokens if ``tokens``."""
        self.state.reset(tokens=tokens)
        self.engine.reset()
        self.statuses.reset()

    async def hang(self) -> None:
        """Wait ``faults.timeout_s`` seconds (or until shutdown)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), self.engine.faults.timeout_s)
