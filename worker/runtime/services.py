"""The long-lived resources of one worker process, opened at boot and closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import redis
from dramatiq.middleware import Middleware

from worker.campaigns.store import CampaignStore
from worker.connections.redis import open_redis
from worker.connections.redis_direct import ThreadConnections
from worker.errors import ConfigurationError
from worker.finish.outbox import EventOutbox, OutboxRelay
from worker.limits import LimitPolicy, MemoryLimiter, RateLimiter, RedisLimiter
from worker.observability.metrics import Metrics
from worker.receipts.links import Receipts
from worker.send.gate import GateSettings, SendGate
from worker.send.ledger import Ledger
from worker.settings import Settings
from worker.verloop.client import VerloopClient
from worker.verloop.endpoints import resolve_endpoints
from worker.verloop.tokens import PhoneTokens, SystemToken

__all__ = ["Lifecycle", "Services", "open_limiter", "open_redis", "open_verloop_client"]


def open_verloop_client(settings: Settings, *, metrics: Metrics | None = None) -> VerloopClient:
    """The HTTP client: each thread that calls Verloop keeps a connection of its own (and opens a
    spare should it ever be busy)."""
    return VerloopClient(
        base_url=settings.verloop_base_url,
        api_prefix=settings.verloop_api_prefix,
        endpoints=resolve_endpoints(settings.verloop_endpoints),
        timeout=httpx.Timeout(
            settings.verloop_timeout_s, connect=settings.verloop_connect_timeout_s
        ),
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
        observe=metrics.observe_api_call if metrics is not None else None,
    )


def open_limiter(
    settings: Settings, cache: redis.Redis, connections: ThreadConnections | None = None
) -> RateLimiter:
    """The rate limiter settings ask for (Redis unless memory is chosen explicitly)."""
    policy = LimitPolicy(
        default_rate=settings.rate_limit_per_number,
        overrides=dict(settings.rate_limit_overrides),
        reserve=settings.rate_limit_reserve,
        max_wait_s=settings.rate_limit_max_wait_s,
        account_rate=settings.rate_limit_account_per_s,
        campaign_lookahead_s=settings.rate_limit_campaign_lookahead_s,
    )
    if settings.rate_limit_backend == "memory":
        return MemoryLimiter(policy)
    return RedisLimiter(cache, policy, connections)


@dataclass
class Services:
    """Everything a job needs besides its own arguments."""

    settings: Settings
    verloop: VerloopClient
    cache: redis.Redis
    system_token: SystemToken
    phone_tokens: PhoneTokens
    gate: SendGate
    ledger: Ledger
    campaigns: CampaignStore
    #: One Redis connection per worker thread (the ledger's and the finisher's round trips).
    connections: ThreadConnections
    #: Sent messages' links to their jobs, and the record of their statuses.
    receipts: Receipts
    #: Where outcome events go first (None: events are off, or published directly).
    outbox: EventOutbox | None = None

    @classmethod
    def open(cls, settings: Settings, *, metrics: Metrics | None = None) -> Services:
        """Open the HTTP pool and the Redis client, and read the tokens file."""
        configured = settings.load_phone_tokens()
        verloop = open_verloop_client(settings, metrics=metrics)
        cache = open_redis(settings)
        # One connection per worker thread, shared by the ledger, the limiter and the finisher.
        connections = ThreadConnections(cache)
        system = SystemToken(
            verloop,
            token=settings.verloop_system_token,
            username=settings.verloop_username,
            password=settings.verloop_password,
            check_interval_s=settings.system_token_check_interval_s,
        )
        phone_tokens = PhoneTokens(
            verloop,
            cache,
            system,
            configured=configured,
            legacy_lookup=settings.verloop_phone_token_variant == "legacy",  # noqa: S105
            local_ttl_s=settings.token_local_ttl_s,
            cache_ttl_s=settings.token_cache_ttl_s,
            refusal_ttl_s=settings.token_refusal_ttl_s,
            max_entries=settings.token_local_max_entries,
        )
        gate = SendGate(
            open_limiter(settings, cache, connections),
            GateSettings(
                max_wait_s=settings.rate_limit_max_wait_s,
                penalty_factor=settings.rate_limit_penalty_factor,
                penalty_s=settings.rate_limit_penalty_s,
                quality_pause_s=settings.quality_pause_s,
                marketing_hold_s=settings.marketing_hold_s,
            ),
        )
        ledger = Ledger(
            cache,
            ttl_s=settings.ledger_ttl_s,
            lease_s=settings.ledger_lease,
            connections=connections,
            replicas=1 if settings.ledger_durability == "replica" else 0,
            replica_timeout_ms=settings.ledger_replica_timeout_ms,
            carry_s=settings.ledger_record_carry_ms / 1000,
        )
        campaigns = CampaignStore(
            cache,
            state_cache_s=settings.campaign_state_cache_s,
            unknown_ttl_s=settings.ledger_ttl_s,
        )
        outbox = (
            EventOutbox(cache, max_len=settings.events_outbox_max_len)
            if settings.outcome_exchange and settings.events_delivery == "outbox"
            else None
        )
        receipts = Receipts(cache, ttl_s=settings.ledger_ttl_s, connections=connections)
        return cls(
            settings,
            verloop,
            cache,
            system,
            phone_tokens,
            gate,
            ledger,
            campaigns,
            connections,
            receipts,
            outbox,
        )

    def close(self) -> None:
        """Close the HTTP pool and the Redis connections."""
        self.gate.limiter.close()
        self.verloop.close()
        self.ledger.close()
        self.cache.close()


class Lifecycle(Middleware):
    """Opens :class:`Services` before the worker's threads start and closes them after."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._services: Services | None = None
        self._relay: OutboxRelay | None = None

    @property
    def services(self) -> Services:
        """The open services; only valid inside a running worker."""
        if self._services is None:
            raise ConfigurationError("worker services used before the worker booted")
        return self._services

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        services = self._services = Services.open(self.settings, metrics=self.metrics)
        carried = services.ledger.carried
        if carried is not None and hasattr(broker, "held_acks"):
            # A consumer closing writes the records its held acknowledgements wait for.
            broker.held_acks.flush = carried.flush
        if self.metrics is not None:
            # Numbers known from settings get their series at zero before their first job.
            self.metrics.add_known_numbers(
                services.phone_tokens.configured_pairs, self.settings.rate_limit_overrides
            )
        if services.outbox is not None:
            settings = self.settings
            self._relay = OutboxRelay(
                services.cache,
                settings.amqp_url.get_secret_value(),
                settings.outcome_exchange,
                block_ms=settings.events_relay_block_ms,
                linger_ms=settings.events_relay_linger_ms,
                retry_s=settings.events_relay_retry_s,
                reclaim_s=settings.events_relay_reclaim_s,
                on_published=self.metrics.observe_relay if self.metrics is not None else None,
                on_parked=self.metrics.observe_parked if self.metrics is not None else None,
                on_length=self.metrics.observe_outbox_length if self.metrics is not None else None,
            )
            if self.metrics is not None:
                self.metrics.outbox_max_length.set(settings.events_outbox_max_len)
            self._relay.start()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        if hasattr(broker, "held_acks"):
            broker.held_acks.flush = None
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        if self._services is not None:
            self._services.close()
            self._services = None
