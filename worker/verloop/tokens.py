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

Redis keys: ``verloop:token:phone:<client>:<phone>`` (a hash of the token, the client id and the
phone id, so ``tokens list`` need not parse keys) and ``verloop:token:lock:<client>:<phone>``
(the fetch lock). The ids are length-prefixed (:mod:`worker.connections.redis_keys`), so no two
pairs share
a key and a phone id cannot reach into the lock's namespace. Entries of the older format
(``verloop:phone-token:...``) are ignored: they expire by themselves, and each number's token is
fetched once more.

Per-process state keyed by producer-chosen ids (tokens in memory, fetch locks, remembered
refusals) holds at most ``TOKEN_LOCAL_MAX_ENTRIES`` numbers each, forgetting the least recently
used.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

import redis
import structlog
from pydantic import SecretStr

from worker.bounded import BoundedDict
from worker.connections.redis import as_text
from worker.connections.redis_keys import join_parts
from worker.errors import FailureDetails, PermanentFailure, RedisUnavailable, TokenInvalid
from worker.observability.logging import register_secret
from worker.verloop.client import VerloopClient

__all__ = ["PhoneTokens", "SystemToken", "TokenSource", "token_cache_entries", "token_key"]

TokenSource = Literal["file", "memory", "redis", "verloop"]

_log = structlog.get_logger()

_GLOB = re.compile(r"[*?\[\]\\]")
_CACHE_PREFIX = "verloop:token:phone:"
_LOCK_PREFIX = "verloop:token:lock:"
#: How long one process may hold the fleet-wide "I am fetching this token" lock.
_FETCH_LOCK_MS = 15_000
_POLL_INTERVAL_S = 0.05

# Delete the key only if it still holds the value that was rejected (a lock's owner).
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The same for a cached token, kept in the hash's "token" field.
_COMPARE_AND_DELETE_CACHED = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SystemToken:
    """The system user token: given in settings, or obtained from a username and password.

    See the module docstring for when it is dropped (:meth:`is_refused`).
    """

    def __init__(
        self,
        client: VerloopClient,
        *,
        token: SecretStr | None,
        username: str | None,
        password: SecretStr | None,
        check_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._configured = token.get_secret_value() if token else None
        self._username = username
        self._password = password
        self._interval_s = check_interval_s
        self._clock = clock
        self._obtained: str | None = None
        #: A configured token Verloop refused, without credentials to log in: unused until then.
        self._configured_refused_until = float("-inf")
        #: A refused login: not tried again until then, with this reason.
        self._login_refused: tuple[FailureDetails, float] | None = None
        #: The last token Verloop accepted (or issued) and when; the last one it refused.
        self._accepted: tuple[str, float] | None = None
        self._refused: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        register_secret(self._configured)
        register_secret(password.get_secret_value() if password else None)

    @property
    def can_renew(self) -> bool:
        """True when a rejected token can be replaced by logging in again."""
        return self._username is not None and self._password is not None

    def get(self) -> str:
        """The current system user token, logging in first if needed."""
        configured = self._configured
        if configured is not None and self._obtained is None:
            if self._clock() < self._configured_refused_until:
                raise PermanentFailure(
                    "Verloop refused VERLOOP_SYSTEM_TOKEN (list_clients refused it too); it is "
                    f"tried again {self._interval_s:g} s (SYSTEM_TOKEN_CHECK_INTERVAL_S) after "
                    "the refusal. Set a valid token, or VERLOOP_USERNAME and VERLOOP_PASSWORD"
                )
            return configured
        with self._lock:
            if self._obtained is None:
                self._obtained = self._log_in()
            return self._obtained

    def is_refused(self, token: str) -> bool:
        """Whether Verloop refuses ``token`` itself, after it refused a call made with it.

        Asks ``list_clients`` at most once per interval per token; a refused token is dropped,
        so the next :meth:`get` logs in again (or, without credentials, fails for a while).

        Raises:
            TransientFailure: ``list_clients`` could not be reached; nothing was decided.
        """
        with self._check_lock:
            now = self._clock()
            for known, refused in ((self._accepted, False), (self._refused, True)):
                if known is not None and known[0] == token and now - known[1] < self._interval_s:
                    return refused
            try:
                self._client.list_clients(token)
            except TokenInvalid as exc:
                self._refused = (token, now)
                self._drop(token, now)
                _log.warning(
                    "Verloop refused the system user token (get_phone_token and list_clients)",
                    http_status=exc.details.http_status,
                    code=exc.details.code,
                    renew="log in again" if self.can_renew else "none: no username/password",
                )
                return True
            except PermanentFailure as exc:
                # Not a refusal of the token (a path or shape problem): the token stays.
                _log.warning("system user token check inconclusive", reason=exc.details.reason)
            self._accepted = (token, now)
            return False

    def _drop(self, token: str, now: float) -> None:
        with self._lock:
            if self._obtained == token:
                self._obtained = None
            if self._configured == token:
                if self.can_renew:
                    self._configured = None  # logging in replaces it from now on
                else:
                    self._configured_refused_until = now + self._interval_s

    def _log_in(self) -> str:
        if not self.can_renew:
            raise PermanentFailure(
                "no Verloop system user token: set VERLOOP_SYSTEM_TOKEN, or "
                "VERLOOP_USERNAME and VERLOOP_PASSWORD"
            )
        now = self._clock()
        if self._login_refused is not None and now < self._login_refused[1]:
            details = self._login_refused[0]
            raise PermanentFailure(
                details.reason, http_status=details.http_status, code=details.code
            )
        try:
            token = self._client.authenticate(str(self._username), _reveal(self._password))
        except TokenInvalid as exc:
            failure = PermanentFailure(
                "Verloop refused VERLOOP_USERNAME/VERLOOP_PASSWORD; the login is tried again "
                f"{self._interval_s:g} s (SYSTEM_TOKEN_CHECK_INTERVAL_S) after the refusal",
                http_status=exc.details.http_status,
                code=exc.details.code,
            )
            self._login_refused = (failure.details, now + self._interval_s)
            raise failure from None
        register_secret(token)
        self._login_refused = None
        return token


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
        self._cache = cache
        self._system = system
        self._configured = {k: v.get_secret_value() for k, v in configured.items()}
        for token in self._configured.values():
            register_secret(token)
        self._legacy = legacy_lookup
        self._local_ttl_s = local_ttl_s
        self._cache_ttl_s = cache_ttl_s
        self._refusal_ttl_s = refusal_ttl_s
        self._clock = clock
        self._local: BoundedDict[tuple[str, str], tuple[str, float]] = BoundedDict(max_entries)
        # A lock forgotten while held costs at most one extra fetch attempt in this process
        # (the fleet lock in Redis still stands between it and Verloop).
        self._locks: BoundedDict[tuple[str, str], threading.Lock] = BoundedDict(max_entries)
        self._refusals: BoundedDict[tuple[str, str], tuple[FailureDetails, float]] = BoundedDict(
            max_entries
        )
        self._compare_and_delete = cache.register_script(_COMPARE_AND_DELETE)
        self._compare_and_delete_cached = cache.register_script(_COMPARE_AND_DELETE_CACHED)
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
            token = self._redis(lambda: self._cache.hget(token_key(key), "token"))
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
                self._redis(lambda: self._cache.delete(token_key(key)))
            else:
                self._redis(
                    lambda: self._compare_and_delete_cached(keys=[token_key(key)], args=[rejected])
                )
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
        lock_key = _LOCK_PREFIX + join_parts(*key)
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + _FETCH_LOCK_MS / 1000
        while not self._redis(lambda: self._cache.set(lock_key, owner, nx=True, px=_FETCH_LOCK_MS)):
            # Another process is fetching: wait for its result rather than asking Verloop too.
            time.sleep(_POLL_INTERVAL_S)
            token = self._redis(lambda: self._cache.hget(token_key(key), "token"))
            if token is not None:
                return token, "redis"
            if time.monotonic() > deadline:
                break  # its lock expired without a result; fetch ourselves
        try:
            # Another process may have stored the token between our first look and our lock.
            cached = self._redis(lambda: self._cache.hget(token_key(key), "token"))
            if cached is not None:
                return cached, "redis"
            token = self._fetch_from_verloop(key)
            self._redis(lambda: self._store(key, token))
            return token, "verloop"
        finally:
            self._redis(lambda: self._compare_and_delete(keys=[lock_key], args=[owner]))

    def _store(self, key: tuple[str, str], token: str) -> None:
        # One transaction: a hash left without its expiry would outlive TOKEN_CACHE_TTL_S.
        pipe = self._cache.pipeline(transaction=True)
        name = token_key(key)
        pipe.delete(name)
        pipe.hset(name, mapping={"token": token, "client_id": key[0], "phone_id": key[1]})
        pipe.expire(name, self._cache_ttl_s)
        pipe.execute()

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


def token_key(key: tuple[str, str]) -> str:
    """The Redis key of a number's cached token."""
    return _CACHE_PREFIX + join_parts(*key)


def token_cache_entries(cache: redis.Redis, client_id: str | None = None) -> list[dict[str, Any]]:
    """The numbers whose token is cached in Redis, with seconds left (never the token)."""
    # A client id typed on the command line may hold glob characters: they match themselves.
    prefix = _GLOB.sub(r"\\\g<0>", join_parts(client_id) + ":") if client_id else ""
    pattern = _CACHE_PREFIX + prefix + "*"
    keys = list(cache.scan_iter(match=pattern, count=500))
    pipe = cache.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, ["client_id", "phone_id"])
        pipe.ttl(key)
    answers = pipe.execute()
    entries = []
    for (client, phone), ttl in zip(answers[::2], answers[1::2], strict=True):
        if client is None or phone is None:
            continue  # expired between the scan and the read
        entries.append(
            {
                "client_id": as_text(client),
                "phone_id": as_text(phone),
                "expires_in_s": int(ttl) if int(ttl) >= 0 else None,
            }
        )
    return sorted(entries, key=lambda e: (e["client_id"], e["phone_id"]))
