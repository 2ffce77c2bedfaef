"""Per-phone-number token lookup: tokens file, this process's memory, Redis (the fleet's), then
``get_phone_token`` (one fetcher at a time across the fleet).

A rejected token is dropped by compare-and-delete and looked up again; every token is registered
with the log redactor as soon as it is seen. A 401/403 on ``get_phone_token`` does not say whose
refusal it was, so the system token is checked with ``list_clients`` first (the rule: README.md,
"Tokens", *Who was refused*). Per-process state holds at most ``TOKEN_LOCAL_MAX_ENTRIES`` numbers.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Literal

import redis
import structlog
from pydantic import SecretStr

from worker.bounded import BoundedDict
from worker.errors import FailureDetails, PermanentFailure, TokenInvalid
from worker.observability.logging import register_secret
from worker.verloop.client import VerloopClient
from worker.verloop.system_token import SystemToken
from worker.verloop.token_cache import FETCH_LOCK_MS, TokenCache, token_cache_entries, token_key

__all__ = ["PhoneTokens", "SystemToken", "TokenSource", "token_cache_entries", "token_key"]

TokenSource = Literal["file", "memory", "redis", "verloop"]

_log = structlog.get_logger()

_POLL_INTERVAL_S = 0.05


class PhoneTokens:
    """Finds the phone number token for (client_id, phone_id); see the module docstring."""

    def __init__(
        self,
        client: VerloopClient,
        cache: redis.Redis,
        system: SystemToken,
        *,
        configured: Mapping[tuple[str, str], SecretStr],
        legacy_lookup: bool = False,
        local_ttl_s: float = 300.0,
        cache_ttl_s: int = 86_400,
        refusal_ttl_s: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._cache = TokenCache(cache, ttl_s=cache_ttl_s)
        self._system = system
        self._configured = {k: v.get_secret_value() for k, v in configured.items()}
        for token in self._configured.values():
            register_secret(token)
        self._legacy = legacy_lookup
        self._local_ttl_s = local_ttl_s
        self._refusal_ttl_s = refusal_ttl_s
        self._clock = clock
        self._local: BoundedDict[tuple[str, str], tuple[str, float]] = BoundedDict(max_entries)
        # A lock forgotten while held costs at most one extra fetch attempt in this process
        # (the fleet lock in Redis still stands between it and Verloop).
        self._locks: BoundedDict[tuple[str, str], threading.Lock] = BoundedDict(max_entries)
        self._refusals: BoundedDict[tuple[str, str], tuple[FailureDetails, float]] = BoundedDict(
            max_entries
        )
        #: How many times this process called get_phone_token (tests and metrics read it).
        self.fetches = 0

    @property
    def configured_pairs(self) -> list[tuple[str, str]]:
        """The (client_id, phone_id) pairs of the tokens file."""
        return list(self._configured)

    # --- public ---------------------------------------------------------------------------------
    def get(self, client_id: str, phone_id: str) -> tuple[str, TokenSource]:
        """The token to use and where it came from.

        Raises:
            PermanentFailure: Verloop refused (or did not know) the number, now or within
                ``TOKEN_REFUSAL_TTL_S``; or it refused the system user token.
        """
        key = (client_id, phone_id)
        configured = self._configured.get(key)
        if configured is not None:
            return configured, "file"
        token = self._from_memory(key)
        if token is not None:
            return token, "memory"
        with self._locks.setdefault(key, threading.Lock):
            token = self._from_memory(key)
            if token is not None:
                return token, "memory"
            token = self._cache.get(key)
            source: TokenSource = "redis"
            if token is None:
                self._raise_if_refused(key)
                token, source = self._fetch_once_for_fleet(key)
            register_secret(token)
            self._local.put(key, (token, self._clock() + self._local_ttl_s))
            return token, source

    def refresh(
        self, client_id: str, phone_id: str, rejected: str | None
    ) -> tuple[str, TokenSource]:
        """Drop ``rejected`` (or whatever is cached, and any remembered refusal, when None)
        and look the token up again."""
        key = (client_id, phone_id)
        if rejected is not None and self._configured.get(key) == rejected:
            # A hand-made token was refused: fall back to asking Verloop from now on.
            del self._configured[key]
        with self._locks.setdefault(key, threading.Lock):
            self._local.pop_if(key, lambda cached: rejected is not None and cached[0] != rejected)
            if rejected is None:
                self._refusals.pop(key)
            self._cache.drop(key, rejected)
        return self.get(client_id, phone_id)

    # --- internals ------------------------------------------------------------------------------
    def _from_memory(self, key: tuple[str, str]) -> str | None:
        entry = self._local.get(key)
        if entry is None or entry[1] < self._clock():
            return None
        return entry[0]

    def _raise_if_refused(self, key: tuple[str, str]) -> None:
        entry = self._refusals.get(key)
        if entry is None:
            return
        details, until = entry
        if until <= self._clock():
            self._refusals.pop_if(key, lambda current: current[1] > self._clock())
            return
        raise PermanentFailure(details.reason, http_status=details.http_status, code=details.code)

    def _fetch_once_for_fleet(self, key: tuple[str, str]) -> tuple[str, TokenSource]:
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + FETCH_LOCK_MS / 1000
        while not self._cache.lock(key, owner):
            # Another process is fetching: wait for its result rather than asking Verloop too.
            time.sleep(_POLL_INTERVAL_S)
            token = self._cache.get(key)
            if token is not None:
                return token, "redis"
            if time.monotonic() > deadline:
                break  # its lock expired without a result; fetch ourselves
        try:
            # Another process may have stored the token between our first look and our lock.
            cached = self._cache.get(key)
            if cached is not None:
                return cached, "redis"
            token = self._fetch_from_verloop(key)
            self._cache.store(key, token)
            return token, "verloop"
        finally:
            self._cache.unlock(key, owner)

    def _fetch_from_verloop(self, key: tuple[str, str]) -> str:
        client_id, phone_id = key
        for attempt in (1, 2):
            system_token = self._system.get()
            try:
                self.fetches += 1
                return self._client.get_phone_token(
                    system_token, client_id, phone_id, legacy=self._legacy
                )
            except TokenInvalid as exc:
                if not self._system.is_refused(system_token):
                    raise self._remember_refusal(
                        key,
                        f"Verloop refused to issue a phone token for client {client_id!r}, "
                        f"number {phone_id!r}, although it accepts the system user token: check "
                        "in Verloop that the partner may use this client and that the number "
                        "is the client's",
                        exc.details,
                    ) from None
                if attempt == 1:
                    continue  # dropped: get() logs in again, or says why it cannot
                raise PermanentFailure(
                    "Verloop refused the system user token while fetching a phone token; "
                    "check VERLOOP_SYSTEM_TOKEN or VERLOOP_USERNAME/VERLOOP_PASSWORD",
                    http_status=exc.details.http_status,
                    code=exc.details.code,
                ) from None
            except PermanentFailure as exc:
                raise self._remember_refusal(
                    key,
                    f"Verloop gave no phone token for client {client_id!r}, number "
                    f"{phone_id!r} ({exc.details.reason}): check the client id and phone id",
                    exc.details,
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _remember_refusal(
        self, key: tuple[str, str], reason: str, answer: FailureDetails
    ) -> PermanentFailure:
        if self._refusal_ttl_s > 0:
            reason += (
                f"; this process dead-letters the number's jobs without asking Verloop again "
                f"for {self._refusal_ttl_s:g} s (TOKEN_REFUSAL_TTL_S)"
            )
        failure = PermanentFailure(reason, http_status=answer.http_status, code=answer.code)
        if self._refusal_ttl_s > 0:
            self._refusals.put(key, (failure.details, self._clock() + self._refusal_ttl_s))
        _log.warning(
            "Verloop gave no phone token for a number",
            client_id=key[0],
            phone_id=key[1],
            http_status=answer.http_status,
            code=answer.code,
        )
        return failure
