"""The idempotency ledger: a job whose send already completed is never sent again.

Before calling Verloop a job *claims* ``verloop:ledger:<key>`` (one Lua script, Redis's clock);
the finisher records Verloop's message id once it accepted. Values:

* ``s:<verloop message id>``: sent, kept ``LEDGER_TTL_S``; a later delivery is ``suppressed``.
* ``p:<lease end, ms>:<owner>``: a call is under way; another delivery waits for the lease.
* uncertain: the call may have reached Verloop; the next delivery follows ``UNCERTAIN_SEND_POLICY``.

With ``replicas`` (``LEDGER_DURABILITY=replica``) a record counts once that many replicas have
it (``WAIT``); one they did not confirm in time is written again later, like one Redis did not
take. A claim may name *holds* (the limiter's recipient and number holds) that keep it from sending.
A job's key from an earlier version is honoured until it expires.

With ``carry_s`` (and no replicas to wait for), :meth:`Ledger.mark_sent_later` queues a record
for the next claim's round trip to carry (:mod:`worker.send.carried`).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis

from worker.connections.redis import RedisErrors, as_text
from worker.connections.redis_direct import ThreadConnections
from worker.errors import LedgerNotReplicated, RedisUnavailable
from worker.send.carried import CarriedWrites, Written

__all__ = ["MAX_UNRECORDED", "Claim", "Ledger", "LedgerEntry", "LedgerKey"]

_PREFIX: Final = "verloop:ledger:"
#: At most this many records of sends Redis did not take are kept for later, per process.
MAX_UNRECORDED: Final = 10_000
#: Records written late per claim, at most.
_LATE_BATCH: Final = 100
#: With replicas to wait for, records are written late at most this often (each try may wait
#: the replica timeout on the claim's thread).
_LATE_EVERY_S: Final = 1.0
#: Every Redis error of the ledger becomes RedisUnavailable("idempotency ledger: <error>").
_REDIS: Final = RedisErrors("idempotency ledger: {error}")

# KEYS[1] entry, KEYS[2] its legacy key (or the entry again), KEYS[3..] holds; ARGV: lease_ms,
# ttl_s, owner, take_over_uncertain (1/0). The owner's own claim is renewed (a send retried in
# the same delivery after a token refresh). An entry only under the legacy key counts as if it
# were the entry; the claim is written under the entry's key.
# Returns {state, detail}: claimed | sent <message id> | busy <ms left> | uncertain <entry> |
# held <ms left>.
_CLAIM: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 3, #KEYS do
  local left = redis.call('PTTL', KEYS[i])
  if left > 0 then return {'held', tostring(left)} end
end
local v = redis.call('GET', KEYS[1])
if not v and KEYS[2] ~= KEYS[1] then v = redis.call('GET', KEYS[2]) end
if v then
  if string.sub(v, 1, 2) == 's:' then return {'sent', string.sub(v, 3)} end
  local ends, owner = string.match(v, '^p:(%d+):(.*)$')
  ends = tonumber(ends)
  if ends and ends > now and owner ~= ARGV[3] then return {'busy', tostring(ends - now)} end
  if owner == ARGV[3] then v = nil end
  if v and ARGV[4] ~= '1' then return {'uncertain', v} end
end
redis.call('SET', KEYS[1], 'p:' .. tostring(now + lease) .. ':' .. ARGV[3], 'EX', ARGV[2])
if v then return {'claimed', 'after_uncertain'} end
return {'claimed', ''}
"""

# KEYS[1] entry; ARGV: owner, ttl_s. This owner's claim, if still there, becomes uncertain at
# once (its lease ends now): the call's outcome is not known.
_UNCERTAIN: Final = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 2) == 'p:' and string.match(v, '^p:%d+:(.*)$') == ARGV[1] then
  redis.call('SET', KEYS[1], 'p:0:' .. ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: an entry and its legacy key. Deletes a claim whose lease has ended (a live claim, or a
# record of a send, is never deleted). Returns how many were deleted.
_FORGET: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dropped = 0
for i = 1, #KEYS do
  local ends = string.match(redis.call('GET', KEYS[i]) or '', '^p:(%d+):')
  if ends and tonumber(ends) <= now then dropped = dropped + redis.call('DEL', KEYS[i]) end
end
return dropped
"""

# KEYS[1] entry; ARGV: owner. Deletes the entry only if this owner's claim is still there.
_RELEASE: Final = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 2) == 'p:' and string.match(v, '^p:%d+:(.*)$') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`Ledger.claim` found.

    ``state``: ``claimed`` (go ahead and send), ``sent`` (``detail`` is Verloop's message id),
    ``busy`` (``retry_in_s`` until the other claim's lease ends), ``uncertain`` (an earlier
    call's outcome is unknown) or ``held`` (a hold key holds the send for ``retry_in_s``;
    nothing was claimed). ``after_uncertain`` marks a claim taken over from an uncertain one.
    """

    state: Literal["claimed", "sent", "busy", "uncertain", "held"]
    detail: str = ""
    retry_in_s: float = 0.0
    after_uncertain: bool = False


@dataclass(frozen=True, slots=True)
class LedgerKey:
    """A job's ledger entry (``name``), and the key an earlier version gave it (``legacy``), whose
    entries are honoured until they expire (``LEDGER_TTL_S``)."""

    name: str
    legacy: str | None = None

    @property
    def names(self) -> list[str]:
        """Both keys in Redis, the entry's first."""
        return [_PREFIX + self.name, _PREFIX + (self.legacy or self.name)]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger entry, as the dead-letter tooling reads it."""

    key: str
    state: Literal["sent", "pending", "absent"]
    message_id: str | None = None


class Ledger:
    """The Redis ledger (see the module docstring). Every method raises
    :class:`~worker.errors.RedisUnavailable` when Redis does not answer: the caller holds the
    job."""

    def __init__(
        self,
        cache: redis.Redis,
        *,
        ttl_s: int,
        lease_s: float,
        connections: ThreadConnections | None = None,
        replicas: int = 0,
        replica_timeout_ms: int = 250,
        carry_s: float = 0.0,
    ) -> None:
        self.cache = cache
        #: A record counts once this many replicas confirm it (``WAIT``); 0: once written.
        self._wait = ("WAIT", replicas, replica_timeout_ms) if replicas > 0 else None
        self._replicas = replicas
        self._late_after = 0.0
        self.ttl_s = ttl_s
        self.lease_ms = max(1, int(lease_s * 1000))
        self._claim = cache.register_script(_CLAIM)
        self._release = cache.register_script(_RELEASE)
        self._uncertain = cache.register_script(_UNCERTAIN)
        self._forget = cache.register_script(_FORGET)
        #: The send path's two calls per job (claim, record) go on a connection per thread
        #: (the worker shares one set with the limiter).
        self._direct = connections or ThreadConnections(cache)
        self._owner_prefix = f"{socket.gethostname()}:{os.getpid()}:"
        #: Records of sends Redis did not take (it was down): written with the next claim that
        #: reaches Redis, so a blip does not leave a sent job looking uncertain for 30 days.
        self._unrecorded: deque[tuple[str, str]] = deque(maxlen=MAX_UNRECORDED)
        #: Records waiting for a claim to carry them (none with replicas: WAIT is per record).
        self.carried: CarriedWrites | None = None
        if carry_s > 0 and replicas == 0:
            self.carried = CarriedWrites(self._execute_carried, max_delay_s=carry_s)

    def claim(
        self, key: LedgerKey, owner: str, *, take_over_uncertain: bool, holds: Sequence[str] = ()
    ) -> Claim:
        """Claim ``key`` for one call to Verloop by ``owner`` (e.g. the dramatiq message id),
        unless one of the ``holds`` keys exists."""
        keys = [*key.names, *holds]
        args = [self.lease_ms, self.ttl_s, self._owner_prefix + owner, int(take_over_uncertain)]
        carried = self.carried.take() if self.carried is not None else []
        if carried:
            state, detail = self._claim_carrying(carried, keys, args)
        else:
            with _REDIS:
                state, detail = self._direct.evalsha(self._claim, keys, args)
        if self._unrecorded and time.monotonic() >= self._late_after:
            self._record_late()
        state, detail = as_text(state), as_text(detail)
        if state in ("busy", "held"):
            return Claim(state, retry_in_s=int(detail) / 1000)  # type: ignore[arg-type]
        if state == "claimed":
            return Claim("claimed", after_uncertain=detail == "after_uncertain")
        if state == "sent":
            return Claim("sent", detail=detail)
        return Claim("uncertain", detail=detail)

    def _claim_carrying(self, carried: Any, keys: list[str], args: list[Any]) -> Any:
        """The claim, in one round trip with the records ``carried`` (written first)."""
        assert self.carried is not None
        command = ("EVALSHA", self._claim.sha, len(keys), *keys, *args)
        try:
            replies = self._direct.execute(
                [*self.carried.commands(carried), command], raise_refusals=False
            )
        except Exception as exc:
            self.carried.settle(carried, exc)
            if isinstance(exc, redis.RedisError):
                raise _REDIS.translate(exc) from None
            raise
        self.carried.settle(carried, replies)
        reply = replies[-1]
        if isinstance(reply, redis.exceptions.NoScriptError):  # Redis restarted: load it
            with _REDIS:
                return self._direct.evalsha(self._claim, keys, args)
        if isinstance(reply, redis.RedisError):
            raise _REDIS.translate(reply)
        return reply

    def _execute_carried(self, commands: list[Sequence[Any]]) -> list[Any]:
        return self._direct.execute(commands, raise_refusals=False)

    def mark_sent_later(
        self,
        key: LedgerKey,
        message_id: str | None,
        on_written: Callable[[list[Any] | RedisUnavailable], None],
        *,
        also: Sequence[Sequence[Any]] = (),
    ) -> None:
        """:meth:`mark_sent`, carried by the next claim's round trip (or written alone within
        ``carry_s``): ``on_written`` gets the replies of ``also``, or the
        :class:`~worker.errors.RedisUnavailable` that :meth:`mark_sent` would have raised (the
        record is then kept to be written later, as there). Only with :attr:`carried`."""
        carried = self.carried
        if carried is None:
            raise RuntimeError("this ledger writes records at once (no carry_s, or replicas)")
        record = self._record(key.name, message_id or "")

        def written(replies: Written) -> None:
            failed = replies if isinstance(replies, BaseException) else replies[0]
            if isinstance(failed, BaseException):
                self._unrecorded.append((key.name, message_id or ""))
                on_written(_REDIS.translate(failed))  # type: ignore[arg-type]
            else:
                on_written(replies[1:])  # type: ignore[index]

        carried.add([record, *also], written)

    def _record(self, name: str, message_id: str) -> tuple[Any, ...]:
        """The command that records a send of entry ``name`` (Verloop's ``message_id``)."""
        return ("SET", _PREFIX + name, "s:" + message_id, "EX", self.ttl_s)

    def mark_sent(
        self, key: LedgerKey, message_id: str | None, *, also: Sequence[Sequence[Any]] = ()
    ) -> list[Any]:
        """Record that Verloop accepted the job's message; the commands ``also`` go with the
        record, in one round trip. Returns their replies (a refused one's is its error).

        Raises:
            RedisUnavailable: the record was not written (the others may not have been either).
            LedgerNotReplicated: the record and the others were written on the primary, no
                replica confirmed them in time (``replicas``); it is written again later.
        """
        record = self._record(key.name, message_id or "")
        commands = [record, *also, self._wait] if self._wait else [record, *also]
        try:
            replies = self._direct.execute(commands, raise_refusals=False)
        except redis.RedisError as exc:
            failed: redis.RedisError | None = exc
        else:
            failed = replies[0] if isinstance(replies[0], redis.RedisError) else None
        if failed is not None:  # not sent, or refused: written with a later claim
            self._unrecorded.append((key.name, message_id or ""))
            raise _REDIS.translate(failed) from None
        if self._wait is None:
            return replies[1:]
        if not self._replicated(replies[-1]):
            self._unrecorded.append((key.name, message_id or ""))
            raise LedgerNotReplicated(
                "idempotency ledger: no replica confirmed the record in time", replies[1:-1]
            )
        return replies[1:-1]

    def _replicated(self, reply: Any) -> bool:
        """Whether ``WAIT``'s reply counts enough replicas."""
        return isinstance(reply, int) and reply >= self._replicas

    @property
    def unrecorded(self) -> int:
        """Sends waiting to be recorded (Redis did not take their record yet)."""
        return len(self._unrecorded)

    def _record_late(self) -> None:
        """Write the records Redis did not take before (a sent record is only ever replaced by
        a sent record: whichever message id it names, the job was sent)."""
        taken: list[tuple[str, str]] = []
        while self._unrecorded and len(taken) < _LATE_BATCH:
            try:
                taken.append(self._unrecorded.popleft())
            except IndexError:  # another thread took the last one
                break
        commands: list[Sequence[Any]] = [self._record(k, m) for k, m in taken]
        try:
            replies = self._direct.execute(
                [*commands, self._wait] if self._wait else commands, raise_refusals=False
            )
        except redis.RedisError:
            self._unrecorded.extendleft(reversed(taken))
            return
        if self._wait is not None and not self._replicated(replies.pop()):
            # All kept: none of them is known to be on a replica.
            self._unrecorded.extendleft(reversed(taken))
            self._late_after = time.monotonic() + _LATE_EVERY_S
            return
        for (key, message_id), reply in zip(taken, replies, strict=True):
            if isinstance(reply, redis.RedisError):
                self._unrecorded.append((key, message_id))

    def mark_uncertain(self, key: LedgerKey, owner: str) -> None:
        """This owner's call went out and no answer came back: its claim becomes uncertain now
        (what a later delivery does with it is ``UNCERTAIN_SEND_POLICY``'s choice)."""
        with _REDIS:
            self._uncertain(
                keys=[_PREFIX + key.name], args=[self._owner_prefix + owner, self.ttl_s]
            )

    def close(self) -> None:
        """Write the records still waiting for a claim, and close the connections of the send
        path's calls (the client is the caller's)."""
        if self.carried is not None:
            self.carried.stop()
        self._direct.close()

    def release(self, key: LedgerKey, owner: str) -> None:
        """Give up this owner's claim after a failed call, so a retry may send."""
        with _REDIS:
            self._release(keys=[_PREFIX + key.name], args=[self._owner_prefix + owner])

    def lookup(self, key: LedgerKey) -> LedgerEntry:
        """What the ledger knows of ``key`` (for dead-letter replay and the CLI)."""
        with _REDIS:
            values = self.cache.mget(key.names)
        texts = [as_text(v) for v in values if v is not None]
        sent = next((t for t in texts if t.startswith("s:")), None)
        if sent is not None:
            return LedgerEntry(key.name, "sent", sent[2:] or None)
        return LedgerEntry(key.name, "pending" if texts else "absent")

    def forget_pending(self, key: LedgerKey) -> bool:
        """Drop an unfinished claim whose lease has ended (an operator chose to resend an
        ``outcome unknown`` job), in one atomic step: a claim still in its lease, or a record
        of a send (even one written a moment ago), is never dropped. Returns whether something
        was dropped."""
        with _REDIS:
            return bool(self._forget(keys=key.names))
