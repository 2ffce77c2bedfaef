"""Per-phone-number token lookup: configured tokens, then the cache, then Verloop.

For a job's (client_id, phone_id) the token comes from, in order:

1. the tokens file (``VERLOOP_PHONE_TOKENS_FILE``, tokens made by hand in Verloop's UI);
2. this process's memory (trusted for ``TOKEN_LOCAL_TTL_S``);
3. Redis, shared by the whole fleet;
4. ``get_phone_token`` with the system user token. Across the fleet one process fetches (a
   short Redis lock); the others wait for its result. Within a process one thread fetches.

When Verloop rejects a token, :meth:`PhoneTokens.refresh` drops exactly that token (a
compare-and-delete, so a token another process already replaced is kept) and looks it up again.
Every token is registered with the log redactor the moment it is seen.

Who was refused. ``get_phone_token`` needs the system user token *and* a client and number the
partner may use, and Verloop's 401/403 does not say which of the two it refused. The rule:

* After a refusal of ``get_phone_token`` the system token is checked with ``list_clients``, a
  documented call that needs nothing else. A process checks a given token at most once per
  ``SYSTEM_TOKEN_CHECK_INTERVAL_S`` (one thread checks, the others wait for its answer), and
  reuses the answer within that interval: a system token revoked right after a check that
  passed is noticed at the next check, and until then its refusals count as the numbers'.
* ``list_clients`` refused too: the system token itself is refused and is dropped. With
  ``VERLOOP_USERNAME``/``VERLOOP_PASSWORD`` the process logs in once for a new one (one thread;
  a refused login is not tried again for the interval) and asks for the phone token again. A
  ``VERLOOP_SYSTEM_TOKEN`` without them is not used for the interval (jobs that need a fetch
  are dead-lettered saying so), then tried again.
* ``list_clients`` accepted it (or failed in a way that is not a refusal): the system token
  stays; Verloop refused that client or number. The process remembers the refusal, like any
  other permanent answer of ``get_phone_token`` (404 for an unknown number), for
  ``TOKEN_REFUSAL_TTL_S``: that number's jobs are dead-lettered at once with the reason, without
  asking Verloop again. ``tokens refresh`` for the number forgets it in the process that runs it.
* ``list_clients`` could not be reached (timeout, 5xx): nothing is decided, the job is retried.

The system user token is :mod:`worker.verloop.system_token`'s; the Redis side (keys, the fetch
lock, ``tokens list``) is :mod:`worker.verloop.token_cache`'s.

Per-process state keyed by producer-chosen ids (tokens in memory, fetch locks, remembered
refusals) holds at most ``TOKEN_LOCAL_MAX_ENTRIES`` numbers each, forgetting the least recently
used.
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
