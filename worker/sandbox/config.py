"""Static configuration of a sandbox instance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from worker.sandbox.faults import Faults
from worker.sandbox.statuses import StatusCallbacks

__all__ = ["DEFAULT_CLIENTS", "SandboxConfig"]

DEFAULT_CLIENTS: Mapping[str, tuple[str, ...]] = {
    "demo-client": ("demo-phone-1", "demo-phone-2"),
}


def _default_clients() -> dict[str, tuple[str, ...]]:
    return dict(DEFAULT_CLIENTS)


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """How a sandbox instance starts: credentials, known phones, initial faults and status
    webhooks."""

    username: str = "sandbox"
    password: str = "sandbox-password"  # noqa: S105  # well-known fake credential
    system_user_token: str | None = None
    """Token returned by ``/auth``; None = a fresh uuid4 per server instance."""
    clients: Mapping[str, Sequence[str]] = field(default_factory=_default_clients)
    """client_id -> phone_ids known from the start."""
    accept_unknown_phones: bool = True
    """True: any (client_id, phone_id) gets a token on demand; False: unknown ones get 404."""
    faults: Faults = field(default_factory=Faults)
    """Faults active at start (``POST /admin/reset`` clears them to none)."""
    statuses: StatusCallbacks = field(default_factory=StatusCallbacks)
    """Status webhooks after each accepted send (off by default; ``POST /admin/reset`` returns
    to these)."""
    message_log_limit: int | None = None
    """Keep at most this many message records (oldest dropped); None = unlimited.

    Counters in ``/admin/stats`` are unaffected; this only bounds memory in long benchmarks.
    """
