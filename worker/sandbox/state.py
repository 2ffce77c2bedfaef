"""In-memory state of the sandbox: tokens, recorded messages and counters.

Pure Python and not thread-safe: all access happens on the server's event loop.
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from worker.sandbox.validation import digits_of

__all__ = ["Counters", "MessageLog", "MessageRecord", "SandboxState", "TokenRegistry"]


def _new_token() -> str:
    return str(uuid.uuid4())


class MessageRecord(TypedDict):
    """One accepted send, as returned by ``GET /admin/messages``."""

    id: str
    client_id: str
    phone_id: str
    to: str
    type: str
    body: dict[str, Any]
    idempotency_key: str | None
    received_at: float


class TokenRegistry:
    """System-user token and per-(client_id, phone_id) phone tokens."""

    def __init__(
        self,
        clients: Mapping[str, Sequence[str]],
        *,
        accept_unknown: bool,
        system_user_token: str | None = None,
    ) -> None:
        """Start with the configured clients and no phone tokens issued yet."""
        self._configured = {client: list(phones) for client, phones in clients.items()}
        self._accept_unknown = accept_unknown
        self.system_user_token = system_user_token or _new_token()
        self._reset_phones()

    def _reset_phones(self) -> None:
        # Phones created on demand are forgotten together with their tokens.
        self._clients = {client: list(phones) for client, phones in self._configured.items()}
        self._by_pair: dict[tuple[str, str], str] = {}
        self._by_token: dict[str, tuple[str, str]] = {}

    def is_system_token(self, token: str) -> bool:
        """Return True if ``token`` is the current system-user token."""
        return token == self.system_user_token

    def revoke_system_token(self) -> str:
        """Replace the system-user token; the old one stops working."""
        self.system_user_token = _new_token()
        return self.system_user_token

    def _admit(self, client_id: str, phone_id: str) -> bool:
        phones = self._clients.get(client_id)
        if phones is not None and phone_id in phones:
            return True
        if not self._accept_unknown:
            return False
        self._clients.setdefault(client_id, []).append(phone_id)
        return True

    def phone_token(self, client_id: str, phone_id: str) -> str | None:
        """Return the pair's token, issuing one if absent; None if the pair is unknown."""
        token = self._by_pair.get((client_id, phone_id))
        if token is not None:
            return token
        if not self._admit(client_id, phone_id):
            return None
        return self._issue(client_id, phone_id)

    def _issue(self, client_id: str, phone_id: str) -> str:
        token = _new_token()
        self._by_pair[(client_id, phone_id)] = token
        self._by_token[token] = (client_id, phone_id)
        return token

    def revoke_phone_token(self, client_id: str, phone_id: str) -> str | None:
        """Replace the pair's token with a new one; None if the pair is unknown."""
        old = self._by_pair.get((client_id, phone_id))
        if old is not None:
            del self._by_token[old]
        elif not self._admit(client_id, phone_id):
            return None
        return self._issue(client_id, phone_id)

    def resolve(self, token: str) -> tuple[str, str] | None:
        """Return the (client_id, phone_id) a phone token belongs to, or None."""
        return self._by_token.get(token)

    def clients(self) -> list[dict[str, Any]]:
        """Return all clients with their phone ids (configured and created on demand)."""
        return [
            {"client_id": client, "phone_ids": list(phones)}
            for client, phones in self._clients.items()
        ]

    def reset(self) -> None:
        """Forget all phone tokens and on-demand phones (the system token stays)."""
        self._reset_phones()


class MessageLog:
    """Accepted sends, in arrival order, plus idempotency keys seen so far."""

    def __init__(self, limit: int | None = None) -> None:
        """Keep at most ``limit`` records (None = unlimited)."""
        self._records: deque[MessageRecord] = deque(maxlen=limit)
        # Never trimmed with the records: duplicates must be detected over the whole run.
        self._keys: set[str] = set()

    def add(self, record: MessageRecord) -> bool:
        """Store ``record``; return True if its idempotency key was seen before."""
        self._records.append(record)
        key = record["idempotency_key"]
        if key is None:
            return False
        if key in self._keys:
            return True
        self._keys.add(key)
        return False

    def query(
        self,
        *,
        wa_id: str | None = None,
        phone_id: str | None = None,
        client_id: str | None = None,
    ) -> Iterator[MessageRecord]:
        """Yield records matching all given filters (``wa_id`` compares recipient digits)."""
        for record in self._records:
            if phone_id is not None and record["phone_id"] != phone_id:
                continue
            if client_id is not None and record["client_id"] != client_id:
                continue
            if wa_id is not None and digits_of(record["to"]) != wa_id:
                continue
            yield record

    def __len__(self) -> int:
        """Return the number of stored records."""
        return len(self._records)

    def clear(self) -> None:
        """Forget all records and idempotency keys."""
        self._records.clear()
        self._keys.clear()


@dataclass(slots=True)
class Counters:
    """Numbers reported by ``GET /admin/stats``."""

    sent: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    responses: Counter[int] = field(default_factory=Counter)
    by_phone: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    rate_limit_violations: int = 0
    rejected_rate_limited: int = 0
    rejected_pair_limited: int = 0
    injected_errors: int = 0
    injected_timeouts: int = 0
    scripted_responses: int = 0
    in_flight: int = 0
    max_concurrency: int = 0

    def send_started(self) -> None:
        """Count a send request entering the server."""
        self.requests["send_message"] += 1
        self.in_flight += 1
        if self.in_flight > self.max_concurrency:
            self.max_concurrency = self.in_flight

    def send_finished(self) -> None:
        """Count a send request leaving the server."""
        self.in_flight -= 1

    def to_json(self) -> dict[str, Any]:
        """Return the ``/admin/stats`` document."""
        return {
            "sent": self.sent,
            "requests": dict(self.requests),
            "responses": {str(status): n for status, n in sorted(self.responses.items())},
            "by_phone": dict(self.by_phone),
            "duplicates": self.duplicates,
            "rate_limit_violations": self.rate_limit_violations,
            "rejected_rate_limited": self.rejected_rate_limited,
            "rejected_pair_limited": self.rejected_pair_limited,
            "injected_errors": self.injected_errors,
            "injected_timeouts": self.injected_timeouts,
            "scripted_responses": self.scripted_responses,
            "in_flight": self.in_flight,
            "max_concurrency": self.max_concurrency,
        }

    def reset(self) -> None:
        """Zero everything except requests still in flight."""
        in_flight = self.in_flight
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, Counter):
                value.clear()
            else:
                setattr(self, name, 0)
        # Requests in flight will still call send_finished(); keep the balance right.
        self.in_flight = in_flight
        self.max_concurrency = in_flight


class SandboxState:
    """Everything the sandbox remembers between requests, except fault configuration."""

    def __init__(
        self,
        clients: Mapping[str, Sequence[str]],
        *,
        accept_unknown: bool,
        system_user_token: str | None = None,
        message_log_limit: int | None = None,
    ) -> None:
        """Create empty state for the given clients."""
        self.tokens = TokenRegistry(
            clients, accept_unknown=accept_unknown, system_user_token=system_user_token
        )
        self.messages = MessageLog(message_log_limit)
        self.counters = Counters()

    def reset(self, *, tokens: bool = False) -> None:
        """Clear messages and counters; also phone tokens if ``tokens``."""
        self.messages.clear()
        self.counters.reset()
        if tokens:
            self.tokens.reset()
