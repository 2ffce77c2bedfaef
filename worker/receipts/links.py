"""The link from a sent message's id (its wamid) to its job, and the record of its statuses.

When a send is recorded, the finisher writes ``verloop:wamid:<wamid>``: a small hash naming the
job (dramatiq message id, client, number, recipient, campaign, idempotency key, lane, sent-at),
kept as long as the ledger keeps the send (``LEDGER_TTL_S``), since statuses may arrive that
late. A status job reads the links of its statuses (one round trip), then records each status
with one script (all in a second round trip): each (wamid, status) once, the best status kept,
the campaign's funnel counters moved and the status's event queued in the outbox, all or nothing
per status. See :data:`_RECORD` for the funnel's rules.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis

from worker.campaigns.funnel import (
    DELIVERED_FIELD,
    FAILED_CODE_PREFIX,
    FAILED_FIELD,
    READ_FIELD,
)
from worker.campaigns.store import CampaignRef
from worker.connections.redis import RedisErrors, as_text
from worker.connections.redis_direct import ThreadConnections
from worker.receipts.models import FUNNEL_STATUSES, WAMID_PATTERN

__all__ = ["LINK_PREFIX", "Link", "Receipts", "StatusEffect", "StatusRecord", "status_rank"]

LINK_PREFIX: Final = "verloop:wamid:"
_WAMID = re.compile(WAMID_PATTERN)
#: Every Redis error here becomes RedisUnavailable("delivery receipts: <error>").
_REDIS: Final = RedisErrors("delivery receipts: {error}")

#: What recording a status did: ``recorded`` (new), ``duplicate`` (seen before), ``unknown``
#: (no send is linked to the wamid).
StatusEffect = Literal["recorded", "duplicate", "unknown"]

# KEYS: 1 the link, 2 the campaign's hash (or the link: none), 3 the outbox stream (or the link).
# ARGV: 1 status, 2 its rank (sent 1, delivered 2, read 3; 0: failed or a word outside the
# funnel), 3 the failure's code, 4 1 if the send had a campaign, 5 the outbox's length bound
# ('' = no event), 6... the event's fields and values.
# Funnel counters (the campaign's hash, named in worker.campaigns.funnel): delivered counts
# messages that reached delivered or read, read those read, failed (and failed:<code>) those
# that failed and were never delivered. A delivered after a failed (multi-device) moves the message
# from failed to delivered; a failed after delivered is recorded and moves nothing.
# Returns {effect, previous best rank}.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', '0'} end
if redis.call('HSETNX', KEYS[1], 'seen:' .. ARGV[1], '1') == 0 then return {'duplicate', '0'} end
local best = tonumber(redis.call('HGET', KEYS[1], 'best') or '0')
local failed = redis.call('HGET', KEYS[1], 'failed')
local rank = tonumber(ARGV[2])
local counts = ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1
local function count(field, by)
  if counts then redis.call('HINCRBY', KEYS[2], field, by) end
end
if rank >= 2 and best < 2 then
  count('{delivered}', 1)
  if failed then
    count('{failed}', -1)
    count('{failed_code}' .. failed, -1)
    redis.call('HDEL', KEYS[1], 'failed')
  end
end
if rank == 3 and best < 3 then count('{read}', 1) end
if rank > best then redis.call('HSET', KEYS[1], 'best', rank) end
if ARGV[1] == 'failed' and best < 2 and not failed then
  redis.call('HSET', KEYS[1], 'failed', ARGV[3])
  count('{failed}', 1)
  count('{failed_code}' .. ARGV[3], 1)
end
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))
end
return {'recorded', tostring(best)}
"""
for _name, _field in (
    ("delivered", DELIVERED_FIELD),
    ("read", READ_FIELD),
    ("failed_code", FAILED_CODE_PREFIX),
    ("failed", FAILED_FIELD),
):
    _RECORD = _RECORD.replace("{" + _name + "}", _field)


def status_rank(status: str) -> int:
    """Where a status stands in the funnel (0: failed, or outside it)."""
    try:
        return FUNNEL_STATUSES.index(status) + 1
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class Link:
    """The job a wamid was sent by."""

    message_id: str
    client_id: str
    phone_id: str
    to: str
    lane: str
    sent_at: float
    campaign_id: str | None = None
    idempotency_key: str | None = None

    @property
    def campaign(self) -> CampaignRef | None:
        return CampaignRef(self.client_id, self.campaign_id) if self.campaign_id else None


class Receipts:
    """Links and status records in Redis. Every method raises
    :class:`~worker.errors.RedisUnavailable` when Redis does not answer."""

    def __init__(
        self, cache: redis.Redis, *, ttl_s: int, connections: ThreadConnections | None = None
    ) -> None:
        self.ttl_s = ttl_s
        self._cache = cache
        self._script = cache.register_script(_RECORD)
        self._direct = connections or ThreadConnections(cache)

    def link_commands(self, wamid: str | None, link: Link) -> tuple[tuple[Any, ...], ...]:
        """The commands that link ``wamid`` to its job, for the finisher's round trip (none
        when Verloop's id is not one a status could name: it is logged by the caller)."""
        if not wamid or not _WAMID.match(wamid):
            return ()
        key = LINK_PREFIX + wamid
        fields = {
            "m": link.message_id,
            "c": link.client_id,
            "p": link.phone_id,
            "to": link.to,
            "l": link.lane,
            "t": f"{link.sent_at:.3f}",
            "k": link.campaign_id or "",
            "i": link.idempotency_key or "",
        }
        return (
            ("HSET", key, *(part for item in fields.items() for part in item)),
            ("EXPIRE", key, self.ttl_s),
        )

    def links(self, wamids: Sequence[str]) -> list[Link | None]:
        """The job each wamid was sent by, if this worker recorded it (one round trip)."""
        with _REDIS:
            replies = self._direct.execute([("HGETALL", LINK_PREFIX + w) for w in wamids])
        return [_parse_link(reply) for reply in replies]

    def record(self, statuses: Sequence[StatusRecord]) -> list[tuple[StatusEffect, int]]:
        """Record statuses (see the module docstring), in one round trip; for each, the effect
        and the best rank its message had before."""
        commands = [self._command(record) for record in statuses]
        with _REDIS:
            replies = self._direct.execute(commands, raise_refusals=False)
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                # Redis restarted or its scripts were flushed: load it, and run them again
                # (a status the first try recorded is then a duplicate, changing nothing).
                self._script.sha = self._cache.script_load(self._script.script)
                replies = self._direct.execute(commands, raise_refusals=False)
            for reply in replies:
                if isinstance(reply, redis.RedisError):
                    raise reply
        return [(as_text(effect), int(as_text(best))) for effect, best in replies]  # type: ignore[misc]

    def _command(self, record: StatusRecord) -> tuple[Any, ...]:
        campaign = record.link.campaign
        key = LINK_PREFIX + record.wamid
        stream, max_len, entry = record.event or (key, 0, {})
        keys = (key, campaign.key if campaign else key, stream)
        return (
            "EVALSHA",
            self._script.sha,
            len(keys),
            *keys,
            record.status,
            status_rank(record.status),
            record.code or "none",
            int(campaign is not None),
            max_len if record.event else "",
            *_pairs(entry),
        )

    def close(self) -> None:
        self._direct.close()


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """One status to record: ``event`` is the outbox stream, its length bound and the entry to
    add if the status is new (None: no event)."""

    wamid: str
    link: Link
    status: str
    code: str | None
    event: tuple[str, int, Mapping[str, Any]] | None = None


def _parse_link(raw: Any) -> Link | None:
    if not isinstance(raw, dict):  # RESP2 on a plain connection: field, value, ...
        raw = dict(zip(raw[::2], raw[1::2], strict=True)) if raw else {}
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    if "m" not in fields:
        return None
    return Link(
        message_id=fields["m"],
        client_id=fields.get("c", ""),
        phone_id=fields.get("p", ""),
        to=fields.get("to", ""),
        lane=fields.get("l", "transactional"),
        sent_at=_float(fields.get("t")),
        campaign_id=fields.get("k") or None,
        idempotency_key=fields.get("i") or None,
    )


def _pairs(entry: Mapping[str, Any]) -> Sequence[Any]:
    return [part for item in entry.items() for part in item]


def _float(value: str | None) -> float:
    try:
        return float(value) if value else time.time()
    except ValueError:
        return time.time()
