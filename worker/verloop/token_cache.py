"""The fleet's phone tokens in Redis: cached tokens, the fetch lock, and ``tokens list``.

Keys ``verloop:token:phone:<client>:<phone>`` (a hash holding the token and both ids, so
``tokens list`` need not parse keys) and ``verloop:token:lock:<client>:<phone>``, ids
length-prefixed so no two pairs share a key. Entries of the older ``verloop:phone-token:...``
format are ignored and expire by themselves.
"""

from __future__ import annotations

import re
from typing import Any, Final

import redis

from worker.connections.redis import RedisErrors, as_text
from worker.connections.redis_keys import join_parts

__all__ = ["FETCH_LOCK_MS", "TokenCache", "token_cache_entries", "token_key"]

_GLOB = re.compile(r"[*?\[\]\\]")
_CACHE_PREFIX: Final = "verloop:token:phone:"
_LOCK_PREFIX: Final = "verloop:token:lock:"
#: How long one process may hold the fleet-wide "I am fetching this token" lock.
FETCH_LOCK_MS: Final = 15_000

#: Every Redis error of the token cache becomes RedisUnavailable (the job is held).
_REDIS: Final = RedisErrors("token cache unavailable (Redis: {error})")

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

Pair = tuple[str, str]


class TokenCache:
    """A number's (``(client_id, phone_id)``) token and fetch lock in Redis. Every method
    raises :class:`~worker.errors.RedisUnavailable` when Redis does not answer.

    Args:
        ttl_s: how long a stored token is kept (``TOKEN_CACHE_TTL_S``).
    """

    def __init__(self, cache: redis.Redis, *, ttl_s: int) -> None:
        self._cache = cache
        self._ttl_s = ttl_s
        self._compare_and_delete = cache.register_script(_COMPARE_AND_DELETE)
        self._compare_and_delete_cached = cache.register_script(_COMPARE_AND_DELETE_CACHED)

    @_REDIS
    def get(self, key: Pair) -> Any:
        """The cached token, or None."""
        return self._cache.hget(token_key(key), "token")

    @_REDIS
    def store(self, key: Pair, token: str) -> None:
        """Cache ``token`` for ``ttl_s``."""
        # One transaction: a hash left without its expiry would outlive TOKEN_CACHE_TTL_S.
        pipe = self._cache.pipeline(transaction=True)
        name = token_key(key)
        pipe.delete(name)
        pipe.hset(name, mapping={"token": token, "client_id": key[0], "phone_id": key[1]})
        pipe.expire(name, self._ttl_s)
        pipe.execute()

    @_REDIS
    def drop(self, key: Pair, rejected: str | None) -> None:
        """Forget the cached token: any (``rejected`` None), or only if it is still
        ``rejected`` (a token another process already replaced is kept)."""
        if rejected is None:
            self._cache.delete(token_key(key))
        else:
            self._compare_and_delete_cached(keys=[token_key(key)], args=[rejected])

    @_REDIS
    def lock(self, key: Pair, owner: str) -> bool:
        """Take the fleet-wide fetch lock for ``FETCH_LOCK_MS``; False if another holds it."""
        return bool(self._cache.set(_lock_key(key), owner, nx=True, px=FETCH_LOCK_MS))

    @_REDIS
    def unlock(self, key: Pair, owner: str) -> None:
        """Let go of the fetch lock, if ``owner`` still holds it."""
        self._compare_and_delete(keys=[_lock_key(key)], args=[owner])


def token_key(key: Pair) -> str:
    """The Redis key of a number's cached token."""
    return _CACHE_PREFIX + join_parts(*key)


def _lock_key(key: Pair) -> str:
    return _LOCK_PREFIX + join_parts(*key)


def token_cache_entries(cache: redis.Redis, client_id: str | None = None) -> list[dict[str, Any]]:
    """The numbers whose token is cached in Redis, with seconds left (never the token).

    Raises redis-py's own errors (``tokens list`` says which Redis did not answer).
    """
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
