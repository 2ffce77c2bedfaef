"""The one immutable settings object, loaded once at the entry point.

Values come from, highest precedence first: the environment, then an optional dotenv-style
file (``--env-file`` or ``VERLOOP_WORKER_ENV_FILE``; see ``config/example.env``), then the
defaults below. Nothing reads the environment at import time: call :meth:`Settings.load`.
The names are a public contract; ``config/example.env`` documents each one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from worker.errors import ConfigurationError

__all__ = ["DEFAULT_BASE_URL", "EndpointOverride", "Settings"]

#: Verloop's production host; the API prefix is added by the client (docs/verloop-api.md).
DEFAULT_BASE_URL = "https://partners.verloop.io"

#: RabbitMQ closes a channel whose delivery stays unacked for 30 minutes (its default
#: ``consumer_timeout``). A delayed retry is held unacked in dramatiq's delay queue consumer, so
#: every single delay must stay well below that.
MAX_SINGLE_DELAY_S = 25 * 60

#: A Redis call that has not been answered in this long fails (the worker then holds the send:
#: Redis down never means sending without the ledger or the limiter).
REDIS_TIMEOUT_S = 2.0
#: The events relay's blocking read must come back well within that timeout, or every idle
#: read would fail as a timeout.
MAX_RELAY_BLOCK_MS = int(REDIS_TIMEOUT_S * 1000 * 0.75)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unparsable_field(exc: Exception) -> str:
    # pydantic-settings names the field in its message; the value is deliberately not repeated.
    found = re.search(r'field "(\w+)"', str(exc))
    name = found.group(1).upper() if found else "a setting"
    return f"{name}: could not parse the value (expected JSON)"


class EndpointOverride(BaseModel):
    """A deployment's correction to one entry of the Verloop endpoint table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["GET", "POST", "PUT"] | None = None
    path: str | None = None
    response_keys: tuple[str, ...] | None = None


class Settings(BaseSettings):
    """Every knob of the worker, validated at start. Secrets are ``SecretStr``: they print as
    ``**********`` and must be unwrapped on purpose."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        env_file_encoding="utf-8",
        env_ignore_empty=True,  # VERLOOP_PASSWORD= means "not set", not "the empty password"
        hide_input_in_errors=True,
    )

    # --- services -------------------------------------------------------------------------
    #: One URL, or the nodes of a cluster as several URLs separated by commas (tried in order;
    #: worker/connections/amqp.py).
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F")
    #: The type every queue of the worker is declared with: classic (one node), or quorum
    #: (replicated across a cluster; worker/connections/queues.py). Immutable once declared.
    queue_type: Literal["classic", "quorum"] = "classic"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    #: Redis through Sentinel: the sentinels, ``host:port,host:port,...`` (unset: REDIS_URL's
    #: host). REDIS_URL then gives only the primary's scheme (TLS), credentials and database.
    redis_sentinels: str | None = None
    #: The name the sentinels monitor the primary under (``sentinel monitor <name> ...``).
    redis_sentinel_service: str = Field(default="mymaster", pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    #: The sentinels' own credentials (``requirepass``/ACL of the sentinel processes), if any.
    redis_sentinel_username: str | None = None
    redis_sentinel_password: SecretStr | None = None
    #: Talk to the sentinels over TLS (with REDIS_URL's ``ssl_*`` query parameters).
    redis_sentinel_tls: bool = False

    # --- Verloop ----------------------------------------------------------------------------
    verloop_base_url: str = DEFAULT_BASE_URL
    #: Accept a plain ``http://`` base URL on another machine (a simulator in another
    #: container). Tokens travel in clear over it; loopback addresses never need this.
    verloop_allow_plain_http: bool = False
    verloop_api_prefix: str = "/api/v2/whatsapp"
    verloop_system_token: SecretStr | None = None
    verloop_username: str | None = None
    verloop_password: SecretStr | None = None
    #: JSON file ``{"<client_id>": {"<phone_id>": "<token>"}}`` of tokens made in Verloop's UI.
    verloop_phone_tokens_file: Path | None = None
    #: Which documented get_phone_token call to use: ``current`` (GET) or ``legacy`` (POST).
    verloop_phone_token_variant: Literal["current", "legacy"] = "current"  # noqa: S105 - a mode
    #: Corrections to the endpoint table, e.g. ``{"send": {"path": "/messages"}}`` as JSON.
    verloop_endpoints: dict[str, EndpointOverride] = Field(default_factory=dict)
    verloop_connect_timeout_s: float = Field(default=5.0, gt=0)
    verloop_timeout_s: float = Field(default=15.0, gt=0)
    #: No longer used: each worker thread keeps one connection of its own (still accepted, so
    #: existing environment files load).
    verloop_max_connections: int = Field(default=64, ge=1)

    # --- tokens ------------------------------------------------------------------------------
    #: How long a process trusts a phone token it read, before asking Redis again.
    token_local_ttl_s: float = Field(default=300.0, ge=0)
    #: How long Redis keeps a phone token (they never expire at Verloop; this bounds staleness).
    token_cache_ttl_s: int = Field(default=86_400, ge=60)

    # --- retries -----------------------------------------------------------------------------
    retry_max_retries: int = Field(default=8, ge=0, le=100)
    retry_min_backoff_s: float = Field(default=2.0, gt=0)
    retry_max_backoff_s: float = Field(default=600.0, gt=0, le=MAX_SINGLE_DELAY_S)

    # --- rate limits ---------------------------------------------------------------------------
    #: ``redis`` (shared by the fleet) or ``memory`` (one development process only).
    rate_limit_backend: Literal["redis", "memory"] = "redis"
    #: Messages per second per sending number (WhatsApp: 80 by default, 1,000 upgraded, 20 for
    #: numbers shared with the Business app).
    rate_limit_per_number: float = Field(default=80.0, gt=0, le=10_000)
    #: Per-number limits, as JSON: ``{"<phone_id>": 1000}``.
    rate_limit_overrides: dict[str, float] = Field(default_factory=dict)
    #: Share of a second's worth of a number's messages kept free for transactional sends
    #: while a campaign saturates it (at least one message).
    rate_limit_reserve: float = Field(default=0.1, ge=0, le=0.5)
    #: A send waits up to this long for its slot; further away, it is re-delayed (no retry used).
    rate_limit_max_wait_s: float = Field(default=2.0, gt=0, le=30)
    #: How far ahead a campaign send may reserve its slot (transactional sends get this much
    #: extra tolerance, so they still never wait behind a campaign).
    rate_limit_campaign_lookahead_s: float = Field(default=0.05, ge=0, le=1)
    #: Optional limit on all calls to Verloop, across every number.
    rate_limit_account_per_s: float | None = Field(default=None, gt=0)
    #: After a 429/130429 a number's rate is multiplied by this, for this long.
    rate_limit_penalty_factor: float = Field(default=0.5, gt=0, lt=1)
    rate_limit_penalty_s: float = Field(default=30.0, gt=0)
    #: 131048 (spam rate limit): campaign sends from that number pause this long.
    quality_pause_s: float = Field(default=3600.0, gt=0)

    # --- jobs --------------------------------------------------------------------------------
    #: Bodies larger than this are dead-lettered unread.
    max_job_bytes: int = Field(default=256 * 1024, ge=1024)
    #: A job's ``options.eta`` may be at most this far ahead; further is an invalid job.
    max_job_delay_s: int = Field(default=7 * 86_400, ge=60, le=90 * 86_400)

    # --- idempotency, campaigns, events -------------------------------------------------------
    #: How long the ledger remembers a send (longer than dead letters live: 7 days).
    ledger_ttl_s: int = Field(default=30 * 86_400, ge=3600)
    #: What a redelivered job does when an earlier delivery was mid-call to Verloop when its
    #: worker died (it may or may not have been delivered): ``by_lane`` resends transactional
    #: jobs (a missing one-time password is worse than two) and dead-letters campaign jobs for
    #: an operator to decide (a customer must not get a marketing message twice).
    uncertain_send_policy: Literal["by_lane", "resend", "dead_letter"] = "by_lane"
    #: How long a claim on a job's ledger entry lasts while it is being sent; by default long
    #: enough for the slot wait and the call (VERLOOP_CONNECT_TIMEOUT_S + VERLOOP_TIMEOUT_S).
    ledger_lease_s: float | None = Field(default=None, gt=0)
    #: ``primary``: a send's record counts once the Redis primary wrote it (a failover may lose
    #: it). ``replica``: it counts once a replica has it too (``WAIT 1``); a record no replica
    #: took in LEDGER_REPLICA_TIMEOUT_MS is kept to be written again later.
    ledger_durability: Literal["primary", "replica"] = "primary"
    ledger_replica_timeout_ms: int = Field(default=250, ge=1, le=int(REDIS_TIMEOUT_S * 1000 / 2))
    #: A sent job's record waits at most this long for the next claim's round trip to carry
    #: it (its acknowledgement waits too); 0: written at once. Not with ``replica``.
    ledger_record_carry_ms: int = Field(default=10, ge=0, le=1000)
    #: How long a process trusts a campaign's state (running/paused/cancelled) it read.
    campaign_state_cache_s: float = Field(default=1.0, ge=0, le=30)
    #: A paused campaign's job looks again after this long (it is re-delayed, no retry used).
    campaign_pause_recheck_s: float = Field(default=15.0, gt=0, le=600)
    #: Publish every job's final outcome to ``events_exchange`` (a topic exchange).
    events_enabled: bool = True
    events_exchange: str = Field(default="verloop.events", min_length=1, max_length=255)
    #: ``outbox``: events are kept in a Redis stream with the job's ledger write and published
    #: by a relay thread in batches (:mod:`worker.finish.outbox`). ``direct``: each is published and
    #: confirmed on the worker thread before its job's ack (slower; no Redis in between).
    events_delivery: Literal["outbox", "direct"] = "outbox"
    #: How long the relay waits for new events before looking again (its added latency).
    events_relay_block_ms: int = Field(default=100, ge=1, le=MAX_RELAY_BLOCK_MS)
    #: After relaying a part-full batch, the relay waits this long so its next batch carries
    #: more events (fewer Redis and RabbitMQ round trips per event; 0: no wait).
    events_relay_linger_ms: int = Field(default=100, ge=0, le=5000)
    #: How long a relay waits after RabbitMQ refused a batch before trying it again.
    events_relay_retry_s: float = Field(default=1.0, gt=0, le=300)
    #: A batch another relay took and left unconfirmed this long is taken over (its process
    #: died, or lost RabbitMQ).
    events_relay_reclaim_s: float = Field(default=30.0, ge=1, le=3600)
    #: The outbox stream keeps at most about this many events: past it, the oldest are dropped
    #: (an alert fires at half of it; the relays normally keep it near zero).
    events_outbox_max_len: int = Field(default=1_000_000, ge=1000)

    #: A direct exchange each worker declares and binds to the job queues (routing key =
    #: queue name), so a producer may be allowed to write to it alone (runtime/jobs_exchange.py).
    jobs_exchange: str = Field(default="verloop.jobs", min_length=1, max_length=255)
    #: Producer side (`send`, `campaign start`): publish jobs to JOBS_EXCHANGE instead of the
    #: default exchange, for a RabbitMQ user that may write to that exchange only.
    publish_to_jobs_exchange: bool = False

    #: A direct exchange each worker declares and binds to the status queue alone: the webhook
    #: receiver publishes there, so its RabbitMQ user can reach no other queue.
    status_exchange: str = Field(default="verloop.statuses", min_length=1, max_length=255)

    @field_validator("jobs_exchange", "status_exchange")
    @classmethod
    def _jobs_exchange_is_declarable(cls, value: str) -> str:
        if value.startswith("amq."):
            raise ValueError("names starting with amq. are RabbitMQ's own; choose another")
        return value

    @property
    def producer_exchange(self) -> str:
        """Where producers publish jobs: JOBS_EXCHANGE, or "" (the default exchange)."""
        return self.jobs_exchange if self.publish_to_jobs_exchange else ""

    @property
    def outcome_exchange(self) -> str:
        """The events exchange, or "" when events are off."""
        return self.events_exchange if self.events_enabled else ""

    # --- delivery receipts (status webhooks) ---------------------------------------------------
    #: ``verloop-worker webhooks`` listens here for WhatsApp's status webhooks.
    webhook_port: int = Field(default=8088, ge=1, le=65535)
    webhook_bind: str = "0.0.0.0"  # noqa: S104 - reached through the ingress or load balancer
    webhook_path: str = Field(default="/webhooks/whatsapp", pattern=r"^/[A-Za-z0-9._~/-]{0,200}$")
    #: The app secret the sender signs bodies with (``X-Hub-Signature-256``); required.
    webhook_app_secret: SecretStr | None = None
    #: The token the sender's verification GET must carry (``hub.verify_token``).
    webhook_verify_token: SecretStr | None = None
    #: The header carrying ``sha256=<hex HMAC-SHA256 of the body>``.
    webhook_signature_header: str = Field(
        default="X-Hub-Signature-256", pattern=r"^[A-Za-z0-9-]{1,64}$"
    )
    #: Larger bodies are refused (413) unread.
    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    #: A body is answered 503 (the sender retries) when RabbitMQ has not confirmed it by then.
    webhook_publish_timeout_s: float = Field(default=5.0, gt=0, le=60)
    #: Statuses arriving together (one body, or requests a few ms apart) go out as one job of
    #: at most this many; each request is answered once its batch is confirmed.
    webhook_batch_max: int = Field(default=100, ge=1, le=500)
    #: How long the first status of a batch waits for others (the answer's added latency).
    webhook_batch_linger_ms: float = Field(default=10.0, ge=0, le=1000)
    #: The receiver's /metrics and /healthz (not on the public port); 0 turns them off.
    webhook_metrics_port: int = Field(default=9193, ge=0, le=65535)
    #: A status whose message is not known yet (its send is still being recorded) is looked
    #: for again until it is this old; then it is counted as unknown.
    status_unknown_grace_s: float = Field(default=120.0, ge=0, le=3600)
    #: 131049 (the recipient's marketing cap): campaign sends to that recipient wait this long.
    marketing_hold_s: float = Field(default=86_400.0, gt=0, le=7 * 86_400)

    # --- process -----------------------------------------------------------------------------
    metrics_port: int = Field(default=9191, ge=0, le=65535)
    metrics_bind: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod/host address
    #: Where worker processes keep their metrics files (a per-port folder is made inside).
    metrics_dir: Path | None = None
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    #: A job still running after this long is reported as stuck (metrics, `check --live`);
    #: every wait inside a job has its own, much shorter, timeout.
    job_stuck_after_s: float = Field(default=600.0, ge=10)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- refused credentials and bounded per-process state ----------------------------------
    #: How long a process remembers that Verloop refused (or did not know) a client's number
    #: when asked for its token: its jobs are dead-lettered at once meanwhile (0: not remembered).
    token_refusal_ttl_s: float = Field(default=60.0, ge=0, le=86_400)
    #: After get_phone_token is refused, the system user token is checked (list_clients) at most
    #: once per this interval per process; a refused VERLOOP_SYSTEM_TOKEN (without a username
    #: and password) or a refused login is not tried again before it has passed.
    system_token_check_interval_s: float = Field(default=60.0, gt=0, le=3600)
    #: Numbers a process keeps per-number token state for (tokens, fetch locks, refusals), each;
    #: the least recently used are forgotten beyond it.
    token_local_max_entries: int = Field(default=10_000, ge=1)
    #: Distinct values a worker process gives each of the metric labels client_id, phone_id and
    #: campaign_id; later ones are counted under "_other".
    metrics_max_label_values: int = Field(default=500, ge=1, le=100_000)

    @model_validator(mode="after")
    def _backoff_bounds_are_ordered(self) -> Settings:
        if self.retry_min_backoff_s > self.retry_max_backoff_s:
            raise ValueError("RETRY_MIN_BACKOFF_S must not exceed RETRY_MAX_BACKOFF_S")
        return self

    @model_validator(mode="after")
    def _plain_http_stays_on_this_machine(self) -> Settings:
        parts = urlsplit(self.verloop_base_url)
        remote = not _is_loopback(parts.hostname or "")
        if parts.scheme == "http" and remote and not self.verloop_allow_plain_http:
            raise ValueError(
                "VERLOOP_BASE_URL is plain http:// to another machine, which would send the "
                "tokens in clear: use https://, or set VERLOOP_ALLOW_PLAIN_HTTP=true for a "
                "test server"
            )
        return self

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_addresses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("expected host:port,host:port,... (a port from 1 to 65535)")
        return value

    @model_validator(mode="after")
    def _sentinel_primary_url_is_tcp(self) -> Settings:
        if self.redis_sentinels and not self.redis_url.get_secret_value().startswith(
            ("redis://", "rediss://")
        ):
            raise ValueError("with REDIS_SENTINELS, REDIS_URL must be redis:// or rediss://")
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs (empty: no Sentinel)."""
        if not self.redis_sentinels:
            return []
        pairs = [a.strip().rpartition(":") for a in self.redis_sentinels.split(",")]
        return [(host.strip("[]"), int(port)) for host, _, port in pairs]

    @field_validator("rate_limit_overrides")
    @classmethod
    def _overrides_are_positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [phone for phone, rate in value.items() if not 0 < rate <= 10_000]
        if bad:
            raise ValueError(f"rates must be in (0, 10000] messages/s; check {', '.join(bad)}")
        return value

    @field_validator("verloop_base_url")
    @classmethod
    def _base_url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    def instance_dir(self, kind: str) -> Path:
        """This instance's folder of ``kind`` files (``metrics``, ``health``): one instance per
        metrics port on a host, under ``METRICS_DIR``, else the temporary folder."""
        root = self.metrics_dir or Path(tempfile.gettempdir())
        return root / f"verloop-worker-{kind}-{self.metrics_port}"

    @property
    def ledger_lease(self) -> float:
        """Seconds a send's ledger claim lasts (see ``LEDGER_LEASE_S``)."""
        if self.ledger_lease_s is not None:
            return self.ledger_lease_s
        call = self.verloop_connect_timeout_s + self.verloop_timeout_s
        return self.rate_limit_max_wait_s + call + 5.0

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, env_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Read settings from the environment and ``env_file`` (or ``VERLOOP_WORKER_ENV_FILE``).

        Raises:
            ConfigurationError: with one line per bad setting, naming it; values are not echoed.
        """
        path = env_file or os.environ.get("VERLOOP_WORKER_ENV_FILE") or None
        if path is not None and not Path(path).is_file():
            raise ConfigurationError(f"settings file {path} does not exist")
        try:
            return cls(_env_file=path, **overrides)  # type: ignore[call-arg]
        except SettingsError as exc:
            # Raised before validation, e.g. VERLOOP_ENDPOINTS that is not JSON.
            raise ConfigurationError(f"invalid settings:\n  {_unparsable_field(exc)}") from None
        except ValidationError as exc:
            lines = [
                f"  {'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}"
                for err in exc.errors()
            ]
            raise ConfigurationError("invalid settings:\n" + "\n".join(lines)) from None

    def rate_for(self, phone_id: str) -> float:
        """The configured messages/s of one sending number."""
        return self.rate_limit_overrides.get(phone_id, self.rate_limit_per_number)

    @property
    def has_verloop_credentials(self) -> bool:
        """True when a system token, or a username and password to get one, are set."""
        return self.verloop_system_token is not None or (
            self.verloop_username is not None and self.verloop_password is not None
        )

    def load_phone_tokens(self) -> dict[tuple[str, str], SecretStr]:
        """Read ``VERLOOP_PHONE_TOKENS_FILE`` into ``{(client_id, phone_id): token}``."""
        if self.verloop_phone_tokens_file is None:
            return {}
        path = self.verloop_phone_tokens_file
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"VERLOOP_PHONE_TOKENS_FILE {path}: cannot read JSON ({type(exc).__name__})"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigurationError(f"VERLOOP_PHONE_TOKENS_FILE {path}: expected a JSON object")
        tokens: dict[tuple[str, str], SecretStr] = {}
        for client_id, phones in raw.items():
            if not isinstance(phones, dict):
                raise ConfigurationError(
                    f"VERLOOP_PHONE_TOKENS_FILE {path}: client {client_id!r} must map phone ids "
                    "to tokens"
                )
            for phone_id, token in phones.items():
                if not isinstance(token, str) or not token:
                    raise ConfigurationError(
                        f"VERLOOP_PHONE_TOKENS_FILE {path}: token for {client_id}/{phone_id} "
                        "must be a non-empty string"
                    )
                tokens[(str(client_id), str(phone_id))] = SecretStr(token)
        return tokens
