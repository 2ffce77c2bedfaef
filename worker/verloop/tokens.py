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
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

import redis
from pydantic import SecretStr

from ..errors import PermanentFailure, RedisUnavailable, TokenInvalid
from ..observability.logging import register_secret
from .client import VerloopClient

__all__ = ["PhoneTokens", "SystemToken", "TokenSource", "token_cache_entries"]

TokenSource = Literal["file", "memory", "redis", "verloop"]

_KEY_PREFIX = "verloop:phone-token"
#: How long one process may hold the fleet-wide "I am fetching this token" lock.
_FETCH_LOCK_MS = 15_000
_POLL_INTERVAL_S = 0.05

# Delete the key only if it still holds the token that was rejected.
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SystemToken:
    """The system user token: given in settings, or obtained once from a username and password."""

    def __init__(
        self,
        client: VerloopClient,
        *,
        token: SecretStr | None,
        username: str | None,
        password: SecretStr | None,
    ) -> None:
        self._client = client
        self._configured = token.get_secret_value() if token else None
        self._username = username
        self._password = password
        self._obtained: str | None = None
        self._lock = threading.Lock()
        register_secret(self._configured)
        register_secret(password.get_secret_value() if password else None)

    @property
    def can_renew(self) -> bool:
        """True when a rejected token can be replaced by logging in again."""
        return self._username is not None and self._password is not None

    def get(self) -> str:
        """The current system user token, logging in first if needed."""
        if self._configured is not None and self._obtained is None:
            return self._configured
        with self._lock:
            if self._obtained is None:
                if not self.can_renew:
                    raise PermanentFailure(
                        "no Verloop system user token: set VERLOOP_SYSTEM_TOKEN, or "
                        "VERLOOP_USERNAME and VERLOOP_PASSWORD"
                    )
                try:
                    token = self._client.authenticate(str(self._username), _reveal(self._password))
                except TokenInvalid as exc:
                    raise PermanentFailure(
                        "Verloop refused VERLOOP_USERNAME/VERLOOP_PASSWORD",
                        http_status=exc.details.http_status,
                        code=exc.details.code,
                    ) from None
                register_secret(token)
                self._obtained = token
            return self._obtained

    def invalidate(self, rejected: str) -> bool:
        """Forget ``rejected``; True if a new token can be obtained."""
        with self._lock:
            if self._obtained == rejected or self._configured == rejected:
                self._obtained = None
                if self._configured == rejected:
                    self._configured = None
        return self.can_renew


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
    ) -> None:
        self._client = client
        self._cache = cache
        self._system = system
        self._configured = {k: v.get_secret_value() for k, v in configured.items()}
        for token in self._configured.values():
            register_secret(token)
        self._legacy = legacy_lookup
        self._local_ttl_s = local_ttl_s
        self._cache_ttl_s = cache_ttl_s
        self._local: dict[tuple[str, str], tuple[str, float]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._compare_and_delete = cache.register_script(_COMPARE_AND_DELETE)
        #: How many times this process called get_phone_token (tests and metrics read it).
        self.fetches = 0

    # --- public ---------------------------------------------------------------------------------
    def get(self, client_id: str, phone_id: str) -> tuple[str, TokenSource]:
        """The token to use and where it came from."""
        key = (client_id, phone_id)
        configured = self._configured.get(key)
        if configured is not None:
            return configured, "file"
        token = self._from_memory(key)
        if token is not None:
            return token, "memory"
        with self._lock_for(key):
            token = self._from_memory(key)
            if token is not None:
                return token, "memory"
            token = self._redis(lambda: self._cache.get(_key(key)))
            source: TokenSource = "redis"
            if token is None:
                token, source = self._fetch_once_for_fleet(key)
            register_secret(token)
            self._local[key] = (token, time.monotonic() + self._local_ttl_s)
            return token, source

    def refresh(
        self, client_id: str, phone_id: str, rejected: str | None
    ) -> tuple[str, TokenSource]:
        """Drop ``rejected`` (or whatever is cached) and look the token up again."""
        key = (client_id, phone_id)
        if rejected is not None and self._configured.get(key) == rejected:
            # A hand-made token was refused: fall back to asking Verloop from now on.
            del self._configured[key]
        with self._lock_for(key):
            cached = self._local.get(key)
            if cached is not None and (rejected is None or cached[0] == rejected):
                del self._local[key]
            if rejected is None:
                self._redis(lambda: self._cache.delete(_key(key)))
            else:
                self._redis(lambda: self._compare_and_delete(keys=[_key(key)], args=[rejected]))
        return self.get(client_id, phone_id)

    # --- internals ------------------------------------------------------------------------------
    def _from_memory(self, key: tuple[str, str]) -> str | None:
        entry = self._local.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def _lock_for(self, key: tuple[str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _fetch_once_for_fleet(self, key: tuple[str, str]) -> tuple[str, TokenSource]:
        lock_key = _key(key) + ":lock"
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + _FETCH_LOCK_MS / 1000
        while not self._redis(lambda: self._cache.set(lock_key, owner, nx=True, px=_FETCH_LOCK_MS)):
            # Another process is fetching: wait for its result rather than asking Verloop too.
            time.sleep(_POLL_INTERVAL_S)
            token = self._redis(lambda: self._cache.get(_key(key)))
            if token is not None:
                return token, "redis"
            if time.monotonic() > deadline:
                break  # its lock expired without a result; fetch ourselves
        try:
            # Another process may have stored the token between our first look and our lock.
            cached = self._redis(lambda: self._cache.get(_key(key)))
            if cached is not None:
                return cached, "redis"
            token = self._fetch_from_verloop(key)
            self._redis(lambda: self._cache.set(_key(key), token, ex=self._cache_ttl_s))
            return token, "verloop"
        finally:
            self._redis(lambda: self._compare_and_delete(keys=[lock_key], args=[owner]))

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
                if attempt == 1 and self._system.invalidate(system_token):
                    continue
                raise PermanentFailure(
                    "Verloop rejected the system user token while fetching a phone token; "
                    "check VERLOOP_SYSTEM_TOKEN or VERLOOP_USERNAME/VERLOOP_PASSWORD",
                    http_status=exc.details.http_status,
                    code=exc.details.code,
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _redis(op: Callable[[], Any]) -> Any:
        try:
            return op()
        except redis.RedisError as exc:
            raise RedisUnavailable(
                f"token cache unavailable (Redis: {type(exc).__name__})"
            ) from None


def _reveal(secret: SecretStr | None) -> str:
    return secret.get_secret_value() if secret is not None else ""


def _key(key: tuple[str, str]) -> str:
    # Identifiers are restricted to [A-Za-z0-9._:@-] by the job schema, so they are safe here.
    return f"{_KEY_PREFIX}:{key[0]}:{key[1]}"


def token_cache_entries(cache: redis.Redis, client_id: str | None = None) -> list[dict[str, Any]]:
    """The numbers whose token is cached in Redis, with seconds left (never the token)."""
    pattern = f"{_KEY_PREFIX}:{client_id}:*" if client_id else f"{_KEY_PREFIX}:*"
    entries = []
    for raw in cache.scan_iter(match=pattern, count=500):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        client, _, phone = key.removeprefix(_KEY_PREFIX + ":").partition(":")
        ttl = int(cache.ttl(key))
        entries.append(
            {"client_id": client, "phone_id": phone, "expires_in_s": ttl if ttl >= 0 else None}
        )
    return sorted(entries, key=lambda e: (e["client_id"], e["phone_id"]))
